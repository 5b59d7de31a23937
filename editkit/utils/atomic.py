"""Atomic writes: write beside the destination, then rename over it.

A killed job leaves either the old file or the new one, never half a file. Temporary names
start with '.tmp-' so readers (and resumable jobs) can ignore them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; give them the usual umask-based mode."""
    os.chmod(path, mode & ~_umask())


def _file_mode(path: Path) -> int:
    return 0o777 if os.stat(path).st_mode & 0o100 else 0o666


def _as_if_created_tree(root: Path) -> None:
    """The umask-based mode for a finished folder and everything in it. Writers that go through
    their own temporary file — safetensors' `save_file`, so every `save_pretrained` — leave
    0600 files behind; without this a model or checkpoint folder is unreadable to the group."""
    _as_if_created(root, 0o777)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _as_if_created(Path(folder) / name, 0o777)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                _as_if_created(path, _file_mode(path))


_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


@contextlib.contextmanager
def _disk_full_as_oserror(dest: Path) -> Iterator[None]:
    """Writers in Rust or C++ (safetensors, torch.save) report a full disk as their own exception
    type with the OS message inside; re-raise those as OSError(ENOSPC) naming `dest`, so the CLI's
    one disk-full line covers every writer that goes through this module."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        if not any(text in str(err).lower() for text in _DISK_FULL_TEXTS):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest)) from err


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in dest's folder; on success rename it to dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    _as_if_created(tmp, 0o666)
    try:
        with _disk_full_as_oserror(dest):
            yield tmp
        _as_if_created(tmp, _file_mode(tmp))  # the writer may have replaced it (safetensors writes 0600)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp(dest: str | os.PathLike) -> None:
    """Drop what a killed `atomic_path` write of `dest` left behind. Only for jobs in which one
    process writes `dest` (a live writer's temporary file would go too)."""
    dest = Path(dest)
    for stale in dest.parent.glob(f".tmp-{dest.name}.????????{dest.suffix}"):  # mkstemp's name above
        stale.unlink(missing_ok=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(dest, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside dest; on success it replaces dest (old one removed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}.", dir=dest.parent))
    _as_if_created(tmp, 0o777)
    try:
        with _disk_full_as_oserror(dest):
            yield tmp
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the finished folder tmp to dest, replacing an old dest (used by atomic_dir, and by
    writers whose folder is filled by several processes before one of them commits it)."""
    tmp, dest = Path(tmp), Path(dest)
    _as_if_created_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".tmp-old-{dest.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
