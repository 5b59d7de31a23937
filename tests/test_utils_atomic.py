import os
import stat

import pytest

from editkit.utils.atomic import atomic_dir, atomic_path, write_text


def test_write_replaces_whole_file_and_uses_umask_mode(tmp_path):
    dest = tmp_path / "a.txt"
    write_text(dest, "old")
    write_text(dest, "new")
    assert dest.read_text() == "new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "a.txt"
    write_text(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_swaps_folder_in_one_step(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "w.bin").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "w.bin").write_text("2")
            raise RuntimeError("killed")
    assert (dest / "w.bin").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def umask_027():
    """A umask that differs from both 0600 and the usual 022, so the mode shows where it came from."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_safetensors_written_through_atomic_path_get_the_umask_mode(tmp_path, umask_027):
    import numpy as np
    from safetensors.numpy import save_file

    dest = tmp_path / "w.safetensors"
    with atomic_path(dest) as tmp:
        save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp))  # writes its own 0600 file
    assert _mode(dest) == 0o640


def test_model_folder_from_atomic_dir_gets_the_umask_mode_throughout(tmp_path, umask_027):
    from editkit.models.loading import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    weights = sorted(folder.glob("*/*.safetensors"))
    assert len(weights) == 3
    assert {_mode(p) for p in weights} == {0o640}
    assert {_mode(p) for p in folder.rglob("*") if p.is_file()} == {0o640}
    assert {_mode(p) for p in [folder, *folder.rglob("*")] if p.is_dir()} == {0o750}


def test_a_writer_reporting_a_full_disk_its_own_way_becomes_enospc(tmp_path):
    """safetensors and torch raise their own types with the OS text inside; the CLI needs OSError."""
    import errno

    import pytest

    from editkit.utils.atomic import atomic_dir, atomic_path

    for writer in (atomic_path(tmp_path / "a.safetensors"), atomic_dir(tmp_path / "folder")):
        with pytest.raises(OSError) as err:
            with writer:
                raise RuntimeError("Error while serializing: No space left on device (os error 28)")
        assert err.value.errno == errno.ENOSPC
    with pytest.raises(ValueError):  # other errors pass through untouched
        with atomic_path(tmp_path / "b.bin"):
            raise ValueError("not a disk problem")
    assert not list(tmp_path.iterdir())
