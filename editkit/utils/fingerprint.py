"""Fingerprints: what determines a job's outputs, so a re-run never mixes with stale work.

A resumable job (infer, cache, eval, train, data build) skips what it finds finished. That is
only safe when the finished work was made from the same settings, model and inputs. Each job
describes those as a plain dict (`inputs`), and `claim_folder` keeps the dict beside the
outputs (`fingerprint.json`):

- no fingerprint yet: it is written, the job starts;
- the same fingerprint: the job resumes;
- a different one: `UserError` naming the first settings that differ, unless the caller passes
  `overwrite=True`, in which case its `clear` callback removes the old outputs first.

Files enter a fingerprint by `file_stamp` (size and modification time, cheap for thousands of
images) or `file_digest` (sha256, for small files whose content matters: manifests, configs,
LoRAs). A model folder enters by `folder_stamp` (every file's size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from editkit.errors import UserError
from editkit.utils.atomic import write_json

FILE_NAME = "fingerprint.json"


def file_stamp(path: str | os.PathLike) -> list:
    """[size, mtime_ns] of a file, or ["missing"] when it does not exist."""
    try:
        st = Path(path).stat()
    except OSError:
        return ["missing"]
    return [st.st_size, st.st_mtime_ns]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes ("missing" when it does not exist)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return "missing"
    return h.hexdigest()


def folder_stamp(path: str | os.PathLike) -> str:
    """One digest of the relative names, sizes and mtimes of every file under a folder (a model
    folder of tens of GB is stamped without reading it). A non-folder spec (e.g. "tiny") is
    returned as it is."""
    root = Path(path)
    if not root.is_dir():
        return str(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")):
        h.update(json.dumps([file.relative_to(root).as_posix(), *file_stamp(file)]).encode())
    return h.hexdigest()


def records_stamp(records) -> str:
    """One digest of the records' ids, texts and the stamps of every file they name."""
    h = hashlib.sha256()
    for r in records:
        files = [*r.sources, r.target, r.mask, r.ref_gt]
        h.update(json.dumps([r.id, r.instruction, [str(f) for f in files],
                             [file_stamp(f) if f else None for f in files]], default=str).encode())
    return h.hexdigest()


def digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]


def claim_folder(folder: str | os.PathLike, job: str, inputs: dict, overwrite: bool = False,
                 clear: Callable[[], None] | None = None, write: bool = True) -> bool:
    """Check (and record) that `folder` holds work of `job` made from `inputs`.

    Returns True when earlier work of the same fingerprint may be resumed, False when the folder
    starts fresh. `write=False` checks only (for processes other than the one that records).
    """
    folder = Path(folder)
    path = folder / FILE_NAME
    new = json.loads(json.dumps(inputs, sort_keys=True, default=str))
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {"job": job, "digest": "damaged", "inputs": {"fingerprint.json": "damaged"}}
        if old.get("digest") == digest(new) and old.get("job") == job:
            return True
        if not overwrite:
            changed = _differences(old.get("inputs", {}), new) or ["job"]
            shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
            raise UserError(f"{folder}: holds {old.get('job', job)} outputs made with other settings or inputs "
                            f"(differs in: {shown}); pass --overwrite to redo them, or choose a new folder")
    if overwrite and clear is not None:
        clear()
    if write:
        write_json(path, {"job": job, "digest": digest(new), "inputs": new})
    return False
