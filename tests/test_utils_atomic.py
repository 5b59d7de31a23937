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
