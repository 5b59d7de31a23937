"""Manifest files: the DiffSynth-style and the "pairs" schemas, in JSON list, JSONL or CSV files.

Two schemas name the same record fields differently:

| record field             | diffsynth    | pairs                    |
|--------------------------|--------------|--------------------------|
| instruction              | prompt       | instruction              |
| sources                  | edit_image   | source_image             |
| target                   | image        | target_image             |
| mask (white = edit area) | back_mask    | mask                     |
| ref_gt                   | ref_gt       | ref_gt                   |

Both also know `id`, `task`, `instruction_cn`, `inverse_instruction`, `inverse_instruction_cn`,
and both read the mask from either name (`FIELD_ALIASES`: a pairs manifest's `back_mask`, a
DiffSynth one's `mask`); writers use the schema's own name. Any other field goes to the record's
metadata (a nested `metadata` object is merged in), and writers put metadata back as top-level
fields, so a conversion loses nothing. An unknown field that looks like a misspelt known one
(`instrution`, `edit_images`, `target` in a pairs file) while the known one is absent gets one
warning line per field and file on stderr (`near_miss_warnings`); it is still kept as metadata.
The container comes from the file extension: `.json` (a list of objects), `.jsonl`, `.csv`
(lists and non-text values as JSON in the cell).

`fields` overrides map a field name (either schema's name or the record's) to the column the
file really uses, e.g. `{"prompt": "caption"}`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.utils.atomic import write_text

CONTAINERS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}

# record attribute -> field name, per schema
SCHEMAS: dict[str, dict[str, str]] = {
    "diffsynth": {"instruction": "prompt", "sources": "edit_image", "target": "image", "mask": "back_mask"},
    "pairs": {"instruction": "instruction", "sources": "source_image", "target": "target_image", "mask": "mask"},
}
_COMMON = ("id", "ref_gt", "task", "instruction_cn", "inverse_instruction", "inverse_instruction_cn")
for _schema in SCHEMAS.values():
    _schema.update({name: name for name in _COMMON})
FIELD_ALIASES: dict[str, tuple[str, ...]] = {"mask": ("mask", "back_mask")}
"""Every field name a record attribute is read from in any schema (beside the schema's own name)."""

# metadata keys that would read back as a record field (in either schema), and blank keys (no CSV
# column can have them), are written nested under "metadata"
_RESERVED = ({name for schema in SCHEMAS.values() for name in schema.values()}
             | {name for names in FIELD_ALIASES.values() for name in names} | {"metadata"})
_SOURCE_COLUMNS = {schema["sources"] for schema in SCHEMAS.values()}
TEXT_FIELDS = ("id", "instruction", "task", "instruction_cn", "inverse_instruction", "inverse_instruction_cn")
PATH_FIELDS = ("target", "mask", "ref_gt")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DETECT_ROWS = 100


class RowError(UserError):
    """A problem with one manifest entry: where ('file:line' / 'file[index]'), field, kind, detail."""

    def __init__(self, where: str, field: str | None, kind: str, detail: str):
        self.where, self.field, self.kind, self.detail = where, field, kind, detail
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + detail)


class Row:
    """One manifest entry with the place it came from; `error` when the entry could not be parsed."""

    __slots__ = ("where", "data", "csv", "error")

    def __init__(self, where: str, data: Any, csv: bool = False, error: RowError | None = None):
        self.where, self.data, self.csv, self.error = where, data, csv, error


def container_of(path: Path) -> str:
    try:
        return CONTAINERS[path.suffix.lower()]
    except KeyError:
        raise UserError(f"{path}: unknown manifest extension {path.suffix!r}; "
                        "use .json, .jsonl, .csv or a folder") from None


def read_rows(path: Path) -> Iterator[Row]:
    """Raw entries of a JSON list / JSONL / CSV manifest, each with 'file:line' or 'file[index]'."""
    container = container_of(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # no newline translation: a quoted CSV "\r" stays
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the manifest as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the manifest ({err.strerror})") from None
    if container == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix the file") from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply; fix the file") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json manifest must hold a list of objects, found {type(data).__name__}")
        for i, item in enumerate(data):
            yield Row(f"{path}[{i}]", item)
    elif container == "jsonl":
        for lineno, line in enumerate(split_lines(text), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield Row(where, json.loads(line))
            except (json.JSONDecodeError, RecursionError) as err:
                msg = getattr(err, "msg", "nested too deeply")
                yield Row(where, None, error=RowError(where, None, "bad-json", f"invalid JSON ({msg}); fix the line"))
    else:
        yield from _read_csv_rows(path, text)


def split_lines(text: str) -> list[str]:
    """Lines split at \\n only (str.splitlines also splits at U+2028 etc., which JSON text may hold)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _read_csv_rows(path: Path, text: str) -> Iterator[Row]:
    if "\x00" in text:
        raise UserError(f"{path}: contains NUL bytes; is it really a CSV file?")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or any(not h.strip() for h in header):
            raise UserError(f"{path}:1: CSV header has empty or repeated column names; fix the header")
        start = reader.line_num
        for cells in reader:
            where = f"{path}:{start + 1}"
            start = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield Row(where, None, csv=True, error=RowError(
                    where, None, "bad-row", f"{len(cells)} cells for {len(header)} columns; fix the row"))
                continue
            yield Row(where, dict(zip(header, cells)), csv=True)
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({err}); fix the file") from None


def _csv_cell(cell: str) -> Any:
    """A metadata cell: a JSON list/object/number/bool/null/quoted string is decoded, else text."""
    if cell and cell[0] in '[{"-0123456789tfnNI':
        try:
            return json.loads(cell)
        except (json.JSONDecodeError, RecursionError):
            pass
    return cell


def _csv_text(value: Any) -> str:
    """Inverse of _csv_cell: plain text stays plain unless it would decode as something else."""
    if isinstance(value, str):  # "" would read back as absent
        return json.dumps(value, ensure_ascii=False) if value == "" or _csv_cell(value) != value else value
    return json.dumps(value, ensure_ascii=False)


def _csv_cell_for(column: str, row: dict[str, Any], plain: set[str]) -> str:
    """Schema columns are written as text (lists of sources as JSON); metadata as _csv_text."""
    if column not in row:
        return ""
    value = row[column]
    if column in plain:
        if value is None:
            return ""
        if isinstance(value, str) and not (column in _SOURCE_COLUMNS and value.startswith("[")):
            return value
        return json.dumps(value if not isinstance(value, str) else [value], ensure_ascii=False)
    return "null" if value is None else _csv_text(value)


def detect_schema(rows: list[Row], fields: dict[str, str] | None, where: Path) -> str:
    """Which schema the first rows use: by their keys (after field overrides)."""
    keys: set[str] = set()
    for row in rows[:_DETECT_ROWS]:
        if isinstance(row.data, dict):
            keys.update(row.data)
    if not keys:
        return "pairs"  # no object to judge by: each entry reports its own problem
    votes = {}
    for name, schema in SCHEMAS.items():
        columns = {column_name(schema, attr, fields) for attr in ("instruction", "sources", "target")}
        votes[name] = len(columns & keys)
    best = max(votes.values())
    winners = [n for n, v in votes.items() if v == best]
    if best == 0 or len(winners) > 1:
        raise UserError(f"{where}: cannot tell the manifest schema from its fields {sorted(keys)[:8]}; "
                        "give --format diffsynth or --format pairs (and --field NAME=COLUMN for renamed columns)")
    return winners[0]


def column_name(schema: dict[str, str], attr: str, fields: dict[str, str] | None) -> str:
    """The file's column for a record attribute, after overrides keyed by schema or record name."""
    name = schema[attr]
    if fields:
        return fields.get(name, fields.get(attr, name))
    return name


def check_fields(fields: dict[str, str] | None) -> None:
    known = {n for s in SCHEMAS.values() for pair in s.items() for n in pair}
    for key in fields or {}:
        if key not in known:
            raise UserError(f"--field {key}=...: unknown field {key!r}; known: {', '.join(sorted(known))}")


def row_to_record(row: Row, schema_name: str, base_dir: Path, fields: dict[str, str] | None = None) -> EditRecord:
    """One raw entry to an EditRecord; paths resolved against base_dir. Raises RowError."""
    if row.error is not None:
        raise row.error
    if not isinstance(row.data, dict):
        raise RowError(row.where, None, "bad-row", f"expected an object with fields, found {type(row.data).__name__}")
    schema = SCHEMAS[schema_name]
    data = dict(row.data)
    values: dict[str, Any] = {}
    for attr in schema:
        column = column_name(schema, attr, fields)
        if column in data:
            values[attr] = data.pop(column)
    _read_aliases(row, schema, data, values, fields)
    if row.csv:  # an empty cell is an absent value (an empty instruction stays "", for validate to flag)
        values = {k: v for k, v in values.items() if v != "" or k == "instruction"}
        values["sources"] = _csv_list(values.get("sources"), row, column_name(schema, "sources", fields))
        data = {k: _csv_cell(v) for k, v in data.items() if v != ""}

    kwargs: dict[str, Any] = {}
    for attr in TEXT_FIELDS:
        value = values.get(attr)
        column = column_name(schema, attr, fields)
        if attr == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise RowError(row.where, column, "not-text", f"must be text, found {type(value).__name__}")
        kwargs[attr] = value
    if kwargs["instruction"] is None:
        raise RowError(row.where, column_name(schema, "instruction", fields), "missing-instruction",
                       "is missing; every record needs an instruction (use --field to name another column)")
    for attr in PATH_FIELDS:
        kwargs[attr] = _path(values.get(attr), row, column_name(schema, attr, fields), base_dir)
    kwargs["sources"] = _sources(values.get("sources"), row, column_name(schema, "sources", fields), base_dir)

    metadata = data.pop("metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        data["metadata"] = metadata
        metadata = None
    kwargs["metadata"] = {**(metadata or {}), **data}
    for attr in TEXT_FIELDS:  # empty optional text is absent, the same in every container
        if attr != "instruction" and kwargs[attr] == "":
            kwargs[attr] = None
    return EditRecord(**kwargs, origin=row.where)


def _blank(value: Any) -> bool:
    return value is None or value == ""


def _alias_columns(schema: dict[str, str], attr: str, fields: dict[str, str] | None) -> tuple[str, ...]:
    """The other names `attr` is read from (none when a field override names its one column)."""
    if fields and (attr in fields or schema[attr] in fields):
        return ()
    return tuple(name for name in FIELD_ALIASES.get(attr, ()) if name != schema[attr])


def _read_aliases(row: Row, schema: dict[str, str], data: dict, values: dict, fields: dict[str, str] | None) -> None:
    """Move alias columns (`back_mask` in a pairs row) from `data` into `values`; two different
    non-empty values for one attribute are a RowError."""
    for attr in FIELD_ALIASES:
        for column in _alias_columns(schema, attr, fields):
            if column not in data:
                continue
            value = data.pop(column)
            if _blank(values.get(attr)):
                values[attr] = value
            elif not _blank(value) and value != values[attr]:
                own = column_name(schema, attr, fields)
                raise RowError(row.where, column, "conflicting-fields",
                               f"and field {own!r} name different files ({value!r} and {values[attr]!r}) for the "
                               f"record's {attr}; keep one of them")


def _looks_like_path(value: Any) -> bool:
    """A file name with an extension, or a non-empty list of them (a misspelt image field's value)."""
    items = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, str) and bool(Path(v).suffix) for v in items)


def _probable_field(key: str, schema: dict[str, str], fields: dict[str, str] | None) -> tuple[str, str] | None:
    """(record attribute, the schema's column) an unknown field name is a near miss of: one spelled
    almost the same (difflib ratio >= 0.8), or a record attribute's name in a schema that names it
    otherwise (`target` in a pairs file means `target_image`). None when it is far from every name."""
    spellings: dict[str, str] = {}
    for attr in schema:
        spellings.setdefault(column_name(schema, attr, fields), attr)
        spellings.setdefault(attr, attr)
    match = difflib.get_close_matches(key.lower(), list(spellings), n=1, cutoff=0.8)
    if not match:
        return None
    attr = spellings[match[0]]
    return attr, column_name(schema, attr, fields)


def near_miss_warnings(rows: list[Row], schema_name: str, fields: dict[str, str] | None) -> dict[str, str]:
    """Unknown field -> one line for each field that is probably a misspelt known one, naming where it is first seen
    and the field it probably means: only in rows where that field is absent (and, for an image
    field, where the value looks like a file path), so metadata that merely resembles a name is quiet."""
    schema = SCHEMAS[schema_name]
    known = ({column_name(schema, attr, fields) for attr in schema} | {"metadata"}
             | {name for attr in FIELD_ALIASES for name in _alias_columns(schema, attr, fields)})
    guesses: dict[str, tuple[str, str] | None] = {}
    lines: dict[str, str] = {}
    for row in rows:
        if not isinstance(row.data, dict):
            continue
        for key, value in row.data.items():
            if key in known or key in lines or not isinstance(key, str) or _blank(value):
                continue
            if key not in guesses:
                guesses[key] = _probable_field(key, schema, fields)
            if guesses[key] is None:
                continue
            attr, column = guesses[key]
            present = {column, *_alias_columns(schema, attr, fields)} & set(row.data)
            if present or (attr in PATH_FIELDS + ("sources",) and not _looks_like_path(value)):
                continue
            lines[key] = (f"{row.where}: field {key!r} is not a {schema_name} manifest field (kept as metadata); "
                          f"did you mean {column!r}?")
    return lines


_WARNED: set[tuple[str, str]] = set()
"""(manifest, field) already warned about by this process: a manifest read again warns no more."""


def _warn_near_misses(path: Path, rows: list[Row], schema_name: str, fields: dict[str, str] | None) -> None:
    for field, line in near_miss_warnings(rows, schema_name, fields).items():
        key = (str(path.absolute()), field)
        if key not in _WARNED:
            _WARNED.add(key)
            print(f"editkit: warning: {line}", file=sys.stderr)


def _csv_list(value: Any, row: Row, column: str) -> Any:
    """A CSV sources cell holding a JSON list ('["a.png", "b.png"]') becomes the list."""
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(row.where, column, "bad-path", "starts with '[' but is not a JSON list of paths") from None
    return value


def _path(value: Any, row: Row, column: str, base_dir: Path) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RowError(row.where, column, "bad-path", f"must be a file path, found {type(value).__name__}")
    if _URL.match(value):
        raise RowError(row.where, column, "url", f"is a URL ({value[:60]}); editkit reads local files only — "
                       "download the images and point the manifest at them")
    if "\x00" in value:
        raise RowError(row.where, column, "bad-path", "contains a NUL character; fix the path")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base_dir / path


def _sources(value: Any, row: Row, column: str, base_dir: Path) -> list[Path]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        path = _path(item, row, column, base_dir)
        if path is None:
            raise RowError(row.where, column, "bad-path", "has an empty entry; remove it or give a path")
        out.append(path)
    return out


def assign_ids(records: list[EditRecord]) -> None:
    """Fill missing ids deterministically: the target's (or first source's) file stem, made unique."""
    taken = {r.id for r in records if r.id is not None}
    for index, record in enumerate(records):
        if record.id is not None:
            continue
        anchor = record.target or (record.sources[0] if record.sources else None)
        base = anchor.stem if anchor is not None else "row"
        candidate, n = base, 0
        while candidate in taken:
            n += 1
            candidate = f"{base}-{index:06d}" + (f"-{n}" if n > 1 else "")
        record.id = candidate
        taken.add(candidate)


def parse_table(path: Path, schema: str | None = None, fields: dict[str, str] | None = None,
                ) -> tuple[list[tuple[str, EditRecord]], list[RowError]]:
    """(where, record) for every good entry of a table manifest and a RowError for every bad one."""
    check_fields(fields)
    rows = list(read_rows(path))
    schema = schema or (detect_schema(rows, fields, path) if rows else "pairs")
    _warn_near_misses(path, rows, schema, fields)
    good: list[tuple[str, EditRecord]] = []
    problems: list[RowError] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        try:
            record = row_to_record(row, schema, path.parent, fields)
        except RowError as err:
            problems.append(err)
            continue
        if record.id is not None:
            if record.id in first_seen:
                problems.append(RowError(row.where, column_name(SCHEMAS[schema], "id", fields), "duplicate-id",
                                         f"id {record.id!r} already used at {first_seen[record.id]}; "
                                         "ids must be unique"))
                continue
            first_seen[record.id] = row.where
        good.append((row.where, record))
    assign_ids([r for _, r in good])
    return good, problems


def record_to_row(record: EditRecord, schema_name: str, out_dir: Path) -> dict[str, Any]:
    """An EditRecord as a manifest entry; paths relative to out_dir when the file lies under it."""
    schema = SCHEMAS[schema_name]
    row: dict[str, Any] = {"id": record.id, schema["instruction"]: record.instruction}
    sources = [relative_path(p, out_dir) for p in record.sources]
    row[schema["sources"]] = sources[0] if len(sources) == 1 else (sources or None)
    row[schema["target"]] = None if record.target is None else relative_path(record.target, out_dir)
    for attr in ("mask", "ref_gt"):
        if getattr(record, attr) is not None:
            row[schema[attr]] = relative_path(getattr(record, attr), out_dir)
    for attr in ("task", "instruction_cn", "inverse_instruction", "inverse_instruction_cn"):
        if getattr(record, attr) is not None:
            row[attr] = getattr(record, attr)
    clashes = {k: v for k, v in record.metadata.items() if k in _RESERVED or not str(k).strip()}
    row.update({k: v for k, v in record.metadata.items() if k not in clashes})
    if clashes:
        row["metadata"] = clashes
    return row


def relative_path(path: Path, out_dir: Path) -> str:
    """`path` relative to out_dir when it lies inside it (so a dataset folder can move), else absolute."""
    path = Path(path)
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return absolute.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def write_table(records: list[EditRecord], path: Path, schema: str) -> None:
    """Write records as a JSON list / JSONL / CSV manifest (by extension), atomically."""
    container = container_of(path)
    out_dir = path.parent.resolve()
    rows = [record_to_row(r, schema, out_dir) for r in records]
    if container == "json":
        text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    elif container == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        columns: dict[str, None] = {}
        for r in rows:
            columns.update(dict.fromkeys(r))
        plain = set(SCHEMAS[schema].values())
        table = [list(columns)] + [[_csv_cell_for(c, r, plain) for c in columns] for r in rows]
        # with "\n" line ends the csv module leaves a lone "\r" unquoted, which readers take as a line end
        lone_cr = any("\r" in cell for line in table for cell in line)
        if any("\x00" in cell for line in table for cell in line):
            raise UserError(f"{path}: a record holds a NUL character, which CSV cannot store; write .jsonl instead")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL if lone_cr else csv.QUOTE_MINIMAL).writerows(table)
        text = buf.getvalue()
    write_text(path, text)
