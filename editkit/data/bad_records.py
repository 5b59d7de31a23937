"""Records a job cannot use (a missing or corrupt image, a bad mask): one line naming each, and
`--skip-bad` semantics shared by every record job (infer, cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from editkit.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class BadRecord:
    """A record a job could not use: its name (`record.origin or record.id`) and the one-line problem."""

    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


def record_name(record) -> str:
    return record.origin or record.id


def load_record(record, load: Callable[[], T], skip_bad: bool, bad: list[BadRecord]) -> T | None:
    """`load()` for one record. A UserError from it (missing or corrupt file, bad mask) becomes one
    line naming the record; with `skip_bad` it is appended to `bad` and None is returned instead."""
    try:
        return load()
    except UserError as err:
        problem = BadRecord(record_name(record), str(err))
        if not skip_bad:
            raise UserError(f"record {problem}; fix it, or pass --skip-bad to go on without it") from None
        bad.append(problem)
        return None


def bad_summary(bad: Sequence[BadRecord], shown: int = 3) -> str:
    """One line for the end of a job: how many records were left out, and the first few."""
    first = "; ".join(str(b) for b in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    return f"skipped {len(bad)} bad record(s): {first}{more}"
