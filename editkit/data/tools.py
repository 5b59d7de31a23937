"""Record-list tools behind `editkit data split` and `editkit data select`, and the check that a
name which becomes a file or folder name stays inside its output folder."""

from __future__ import annotations

import math
from pathlib import Path

from editkit.data.records import EditRecord
from editkit.errors import UserError

SPLIT_EXTENSIONS = ("jsonl", "json", "csv")


def plain_name(name: str, what: str) -> str:
    """`name` when it can be a file or folder name inside an output folder, else a UserError
    naming `what` (a split name like '../evil' would write outside it)."""
    if not name or name in (".", "..") or any(c in "/\\" or ord(c) < 32 for c in name):
        raise UserError(f"{what}: {name!r} is not a plain name (it becomes a file name inside the output folder); "
                        "use letters, digits, '-', '_' or '.', without '/', '\\' or '..'")
    return name


def split_paths(out: Path, names: list[str], ext: str) -> dict[str, Path]:
    """OUT/<name>.<ext> for each split name; names must be plain, ext one of SPLIT_EXTENSIONS."""
    ext = ext.lower().lstrip(".")
    if ext not in SPLIT_EXTENSIONS:
        raise UserError(f"--ext {ext!r}: use one of {', '.join(SPLIT_EXTENSIONS)}")
    return {name: out / f"{plain_name(name, '--fractions')}.{ext}" for name in names}


def where(record: EditRecord) -> str:
    """How messages name a record: where it was read, else its id."""
    return record.origin or f"record {record.id!r}"


def parse_weights(text: str, what: str = "--fractions") -> dict[str, float]:
    """'train=0.9,val=0.1' -> {'train': 0.9, 'val': 0.1}; UserError on anything malformed."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or not math.isfinite(number) or number < 0:
            raise UserError(f"{what} {text!r}: write NAME=NUMBER,... with non-negative numbers (at {part!r})")
        if name in out:
            raise UserError(f"{what} {text!r}: {name!r} is given twice")
        out[name] = number
    if not out or sum(out.values()) <= 0:
        raise UserError(f"{what} {text!r}: at least one weight must be positive")
    return out


def split_records(records: list[EditRecord], fractions: dict[str, float], seed: int = 0) -> dict[str, list[EditRecord]]:
    """Deterministic split by seed: shuffle once, then cut by the (normalised) fractions.

    Counts use the largest-remainder rule so they sum to len(records); each split keeps the
    manifest's order.
    """
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    total = sum(fractions.values())
    if total <= 0:
        raise UserError("split fractions must sum to more than 0")
    n = len(records)
    exact = {name: n * f / total for name, f in fractions.items()}
    counts = {name: math.floor(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(exact).index(k)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    assignment = [""] * n
    start = 0
    for name, count in counts.items():
        for i in order[start:start + count]:
            assignment[i] = name
        start += count
    return {name: [r for r, a in zip(records, assignment) if a == name] for name in fractions}


def score_of(record: EditRecord, field: str) -> float:
    """A record's numeric score from its metadata (dotted names reach nested values)."""
    value = record.metadata
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"{where(record)}: metadata has no field {field!r}; "
                            "choose --by from the manifest's extra fields")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where(record)}: field {field!r} is {value!r:.60}, not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise UserError(f"{where(record)}: field {field!r} is {value!r:.60}, not a number") from None
    if math.isnan(number):
        raise UserError(f"{where(record)}: field {field!r} is NaN; fix or drop the record")
    return number


def select_top(records: list[EditRecord], n: int, by: str, ascending: bool = False,
               skip_missing: bool = False) -> list[EditRecord]:
    """The n records with the highest (or lowest) metadata score; ties broken by id, so it is deterministic."""
    if n < 1:
        raise UserError(f"--top must be at least 1, got {n}")
    scored = []
    for record in records:
        try:
            scored.append((score_of(record, by), record))
        except UserError:
            if not skip_missing:
                raise
    sign = 1 if ascending else -1
    scored.sort(key=lambda item: (sign * item[0], item[1].id))
    return [record for _, record in scored[:n]]
