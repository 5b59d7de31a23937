"""Record-list tools behind `editkit data split` and `editkit data select`."""

from __future__ import annotations

import math

import numpy as np

from editkit.data.records import EditRecord
from editkit.errors import UserError


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
    total = sum(fractions.values())
    if total <= 0:
        raise UserError("split fractions must sum to more than 0")
    n = len(records)
    exact = {name: n * f / total for name, f in fractions.items()}
    counts = {name: math.floor(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(exact).index(k)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
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
            raise UserError(f"record {record.id!r}: metadata has no field {field!r}; "
                            "choose --by from the manifest's extra fields")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"record {record.id!r}: field {field!r} is {value!r}, not a number")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"record {record.id!r}: field {field!r} is {value!r}, not a number") from None
    if math.isnan(number):
        raise UserError(f"record {record.id!r}: field {field!r} is NaN; fix or drop the record")
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
