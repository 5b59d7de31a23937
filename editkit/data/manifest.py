"""Read and write any supported manifest: format detection and dispatch.

Formats: "diffsynth" and "pairs" (alias "editkit") as .json / .jsonl / .csv files, and
"folder" (see editkit.data.folder). Reading detects the format when none is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from editkit.data.folder import is_folder_dataset, parse_folder, write_folder
from editkit.data.formats import SCHEMAS, RowError, check_fields, detect_schema, parse_table, read_rows, write_table
from editkit.data.records import EditRecord
from editkit.errors import UserError

FORMATS = ("diffsynth", "pairs", "folder")
# what-ran records and job fingerprints written beside datasets, not manifests
RUN_RECORDS = ("run.json", "build.json", "synth.json", "fingerprint.json")
_ALIASES = {"editkit": "pairs"}


def normalize_format(format: str | None) -> str | None:
    if format is None:
        return None
    name = _ALIASES.get(format.lower(), format.lower())
    if name not in FORMATS:
        raise UserError(f"unknown manifest format {format!r}; use one of {', '.join(FORMATS)}")
    return name


def parse_field_overrides(items: list[str] | None) -> dict[str, str]:
    """`["prompt=caption", ...]` (the CLI's --field) to {"prompt": "caption"}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--field {item!r}: write NAME=COLUMN, e.g. --field prompt=caption")
        out[key.strip()] = value.strip()
    check_fields(out)
    return out


def detect_format(path: str | os.PathLike, format: str | None = None, fields: dict[str, str] | None = None) -> str:
    """The manifest's format: the given one, "folder" for a folder, else the schema its fields match."""
    path = Path(path)
    format = normalize_format(format)
    if format is not None:
        return format
    if path.is_dir():
        return "folder"
    check_fields(fields)
    rows = []
    for row in read_rows(path):
        rows.append(row)
        if len(rows) >= 100:
            break
    return detect_schema(rows, fields, path) if rows else "pairs"


def parse_manifest(path: str | os.PathLike, format: str | None = None, fields: dict[str, str] | None = None,
                   ) -> tuple[list[tuple[str, EditRecord]], list[RowError]]:
    """Every good record with where it came from, and every bad entry as a RowError (for validate).
    A manifest without a single entry is a UserError: every job would silently do nothing."""
    path = Path(path)
    format = normalize_format(format)
    if "://" in str(path):
        raise UserError(f"{path}: manifests are read from local files only; download it first")
    if format == "folder" or (format is None and path.is_dir()):
        if not is_folder_dataset(path):
            manifests = sorted(p.name for p in path.glob("*") if p.suffix.lower() in (".json", ".jsonl", ".csv")
                               and p.name not in RUN_RECORDS)
            hint = f"give one of its manifests ({', '.join(manifests[:5])})" if manifests else \
                "a dataset folder needs a prompts file and sources/ or targets/"
            raise UserError(f"{path}: not a dataset folder; {hint}")
        return _non_empty(path, parse_folder(path, fields))
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give --format folder or point at a .json/.jsonl/.csv manifest")
    return _non_empty(path, parse_table(path, format, fields))


def _non_empty(path: Path, parsed: tuple[list, list[RowError]]) -> tuple[list, list[RowError]]:
    good, problems = parsed
    if not good and not problems:
        raise UserError(f"no records in {path}; add entries to it (or check that this is the right file)")
    return parsed


def read_manifest(path: str | os.PathLike, format: str | None = None,
                  fields: dict[str, str] | None = None) -> list[EditRecord]:
    """Records of a manifest (file or dataset folder); the first bad entry raises a UserError naming it."""
    good, problems = parse_manifest(path, format, fields)
    raise_first_problem(problems)
    return [record for _, record in good]


def raise_first_problem(problems: list[RowError]) -> None:
    """A UserError naming the first bad entry and how many more there are (none: nothing)."""
    if problems:
        more = len(problems) - 1
        extra = f" (and {more} more problem{'s' * (more > 1)}; run `editkit data validate`)" if more else ""
        raise UserError(f"{problems[0]}{extra}")


def write_manifest(records: list[EditRecord], path: str | os.PathLike, format: str = "pairs") -> Path:
    """Write records as `format`; a table's container comes from the extension. Atomic."""
    path = Path(path)
    format = normalize_format(format) or "pairs"
    if format == "folder":
        write_folder(records, path)
    elif format in SCHEMAS:
        write_table(records, path, format)
    return path
