"""`editkit data validate`: every problem of a manifest, one line each, with counts per kind.

Checks: entries parse (see formats/folder), the manifest has at least one entry, every
referenced file exists and decodes through the image policy (`editkit.data.images`: a mode it
refuses is a problem), masks have their image's size (the target's, or the first source's when
there is no target), instructions are not empty. Each distinct file is decoded once per role
(image or mask), in a process pool.

Warnings are informational and do not fail validation: a high-bit-depth file (16-bit, 32-bit
or float; editkit reads it scaled to 8 bits by the range of its type) and an empty mask (all
black after binarising: no edit region, so a masked edit changes nothing).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from editkit.data.formats import SCHEMAS, column_name
from editkit.data.images import binarize_mask, mask_size_problem, open_8bit
from editkit.data.manifest import detect_format, parse_manifest
from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.utils.progress import parallel_map

_WHERE = re.compile(r"^(.*?)(?::(\d+)|\[(\d+)\])$")


@dataclass(frozen=True)
class Problem:
    where: str  # manifest file:line, file[index] or image path
    field: str | None
    kind: str
    detail: str
    warning: bool = False  # informational: does not fail validation

    def line(self) -> str:
        return (f"{self.where}: " + (f"field {self.field!r}: " if self.field else "")
                + ("warning: " if self.warning else "") + self.detail)


@dataclass
class Report:
    records: int
    problems: list[Problem]
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def warning_counts(self) -> Counter:
        return Counter(w.kind for w in self.warnings)

    def lines(self, warnings_per_kind: int = 20) -> list[str]:
        """Every problem and the first warnings of each kind, in manifest order, then a line per
        kind saying how many warnings were left out (a folder of 16-bit files warns per file)."""
        seen: Counter = Counter()
        shown = []
        for item in self.warnings:
            seen[item.kind] += 1
            if seen[item.kind] <= warnings_per_kind:
                shown.append(item)
        lines = [p.line() for p in sorted([*self.problems, *shown], key=lambda p: _place(p.where))]
        return lines + [f"... and {n - warnings_per_kind} more {kind} warnings"
                        for kind, n in sorted(seen.items()) if n > warnings_per_kind]


@dataclass(frozen=True)
class FileCheck:
    """What validate learns from decoding one file in one role (image or mask)."""
    kind: str | None  # problem kind, None when the file decodes
    detail: str = ""
    size: tuple[int, int] | None = None  # of the decoded, EXIF-transposed image (= oriented_size)
    depth_note: str | None = None  # how a high-bit-depth file is reduced to 8 bits
    empty_mask: bool = False


def check_image(job: tuple[Path, bool]) -> FileCheck:
    """Decode one file (path, as_mask) the way every editkit job will."""
    path, as_mask = job
    if not path.is_file():
        return FileCheck("missing-file", f"{path} not found")
    try:
        img, note = open_8bit(path, "mask" if as_mask else "image")
        empty = as_mask and binarize_mask(img).getextrema()[1] == 0
    except UserError as err:
        return FileCheck("undecodable", str(err))
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's problem
        return FileCheck("undecodable", f"{path} cannot be decoded ({err.__class__.__name__}: {str(err)[:80]}); "
                         "replace or re-export the file")
    return FileCheck(None, size=img.size, depth_note=note, empty_mask=empty)


def _field_names(format: str, fields: dict[str, str] | None) -> dict[str, str]:
    if format == "folder":
        return {"sources": "sources", "target": "targets", "mask": "masks", "ref_gt": "ref_gt",
                "instruction": "instruction"}
    schema = SCHEMAS[format]
    return {attr: column_name(schema, attr, fields) for attr in ("sources", "target", "mask", "ref_gt", "instruction")}


def _image_fields(record: EditRecord, names: dict[str, str]) -> list[tuple[str, Path, bool]]:
    """(column, path, read as a mask) for every file a record names."""
    out = [(f"{names['sources']}[{i}]" if len(record.sources) > 1 else names["sources"], p, False)
           for i, p in enumerate(record.sources)]
    out += [(names[attr], getattr(record, attr), attr == "mask") for attr in ("target", "mask", "ref_gt")
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
            problems.append(Problem(where, names["instruction"], "empty-instruction",
                                    "is empty; write the edit instruction"))
    if check_images:
        problems += _image_problems(good, names, workers, progress)
    errors = sorted((p for p in problems if not p.warning), key=lambda p: _place(p.where))
    warnings = sorted((p for p in problems if p.warning), key=lambda p: _place(p.where))
    return Report(len(good) + len(row_errors), errors, warnings)


def _place(where: str) -> tuple[str, int]:
    """Sort key: manifest file, then line/index number ('file:12' / 'file[3]')."""
    match = _WHERE.match(where)
    if match is None:
        return where, -1
    return match.group(1), int(match.group(2) or match.group(3))


def _image_problems(good: list[tuple[str, EditRecord]], names: dict[str, str], workers: int,
                    progress: bool) -> list[Problem]:
    """Problems and warnings of every file the records name, each file decoded once per role."""
    unique = sorted({(p, as_mask) for _, r in good for _, p, as_mask in _image_fields(r, names)})
    pool_workers = workers if len(unique) > 64 else 1  # a pool costs more than checking a few images
    results = parallel_map(check_image, unique, "checking images", "images", pool_workers, chunksize=16,
                           disable=not progress)
    checked = dict(zip(unique, results))
    problems = []
    for where, record in good:
        for column, path, as_mask in _image_fields(record, names):
            problems += _file_problems(where, column, checked[(path, as_mask)])
        if record.mask is not None:
            reference = record.target or (record.sources[0] if record.sources else None)
            mask_size = checked[(record.mask, True)].size
            ref_size = checked[(reference, False)].size if reference is not None else None
            problem = mask_size_problem(mask_size, ref_size, "target" if record.target else "source") \
                if mask_size and ref_size else None
            if problem:
                problems.append(Problem(where, names["mask"], "mask-size", problem))
    return problems


def _file_problems(where: str, column: str, check: FileCheck) -> list[Problem]:
    if check.kind == "missing-file":
        return [Problem(where, column, check.kind, check.detail + "; fix the path")]
    if check.kind:
        return [Problem(where, column, check.kind, check.detail)]
    out = []
    if check.depth_note:
        out.append(Problem(where, column, "high-bit-depth", f"{check.depth_note} (informational)", warning=True))
    if check.empty_mask:
        out.append(Problem(where, column, "empty-mask", "is all black (no edit region), so a masked edit changes "
                           "nothing; white (or any bright colour) marks the edit region", warning=True))
    return out
