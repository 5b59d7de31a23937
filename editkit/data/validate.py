"""`editkit data validate`: every problem of a manifest, one line each, with counts per kind.

Checks: entries parse (see formats/folder), every referenced file exists and decodes, masks
have their image's size (the target's, or the first source's when there is no target),
instructions are not empty. Each distinct image file is decoded once, in a process pool.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from editkit.data.formats import SCHEMAS, column_name
from editkit.data.manifest import detect_format, parse_manifest
from editkit.data.records import EditRecord
from editkit.utils.progress import parallel_map

_WHERE = re.compile(r"^(.*?)(?::(\d+)|\[(\d+)\])$")


@dataclass(frozen=True)
class Problem:
    where: str  # manifest file:line, file[index] or image path
    field: str | None
    kind: str
    detail: str

    def line(self) -> str:
        return f"{self.where}: " + (f"field {self.field!r}: " if self.field else "") + self.detail


@dataclass
class Report:
    records: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)


def check_image(path: Path) -> tuple[str | None, str, tuple[int, int] | None]:
    """(problem kind or None, detail, size after EXIF orientation) for one image file."""
    if not path.is_file():
        return "missing-file", f"{path} not found", None
    try:
        with Image.open(path) as img:
            img.load()
            return None, "", ImageOps.exif_transpose(img).size
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's problem
        return "undecodable", f"{path} cannot be decoded ({err.__class__.__name__}: {str(err)[:80]})", None


def _field_names(format: str, fields: dict[str, str] | None) -> dict[str, str]:
    if format == "folder":
        return {"sources": "sources", "target": "targets", "mask": "masks", "ref_gt": "ref_gt",
                "instruction": "instruction"}
    schema = SCHEMAS[format]
    return {attr: column_name(schema, attr, fields) for attr in ("sources", "target", "mask", "ref_gt", "instruction")}


def _image_fields(record: EditRecord, names: dict[str, str]) -> list[tuple[str, Path]]:
    out = [(f"{names['sources']}[{i}]" if len(record.sources) > 1 else names["sources"], p)
           for i, p in enumerate(record.sources)]
    out += [(names[attr], getattr(record, attr)) for attr in ("target", "mask", "ref_gt")
            if getattr(record, attr) is not None]
    return out


def validate_manifest(path: str | os.PathLike, format: str | None = None, fields: dict[str, str] | None = None,
                      workers: int = 1, check_images: bool = True, progress: bool = True) -> Report:
    """Find every problem of a manifest (file or folder); a missing or unreadable manifest raises UserError."""
    path = Path(path)
    fmt = detect_format(path, format, fields)
    good, row_errors = parse_manifest(path, fmt, fields)
    problems = [Problem(e.where, e.field, e.kind, e.detail) for e in row_errors]
    names = _field_names(fmt, fields)
    for where, record in good:
        if not record.instruction.strip():
            problems.append(Problem(where, names["instruction"], "empty-instruction", "is empty; write the edit instruction"))
    if check_images:
        problems += _image_problems(good, names, workers, progress)
    return Report(len(good) + len(row_errors), sorted(problems, key=lambda p: _place(p.where)))


def _place(where: str) -> tuple[str, int]:
    """Sort key: manifest file, then line/index number ('file:12' / 'file[3]')."""
    match = _WHERE.match(where)
    if match is None:
        return where, -1
    return match.group(1), int(match.group(2) or match.group(3))


def _image_problems(good: list[tuple[str, EditRecord]], names: dict[str, str], workers: int,
                    progress: bool) -> list[Problem]:
    unique = sorted({p for _, r in good for _, p in _image_fields(r, names)})
    pool_workers = workers if len(unique) > 64 else 1  # a pool costs more than checking a few images
    results = parallel_map(check_image, unique, "checking images", "images", pool_workers, chunksize=16,
                           disable=not progress)
    checked = dict(zip(unique, results))
    problems = []
    for where, record in good:
        for field, p in _image_fields(record, names):
            kind, detail, _ = checked[p]
            if kind:
                problems.append(Problem(where, field, kind, detail + ("; fix the path" if kind == "missing-file"
                                                                      else "; replace or re-export the file")))
        if record.mask is not None:
            reference = record.target or (record.sources[0] if record.sources else None)
            mask_size = checked[record.mask][2]
            ref_size = checked[reference][2] if reference is not None else None
            if mask_size and ref_size and mask_size != ref_size:
                which = "target" if record.target else "source"
                problems.append(Problem(where, names["mask"], "mask-size",
                                        f"mask is {mask_size[0]}x{mask_size[1]} but the {which} is "
                                        f"{ref_size[0]}x{ref_size[1]}; resize the mask to its image"))
    return problems

