"""Progress bars for long jobs: count, rate and ETA, on stderr (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
R = TypeVar("R")
console = Console(stderr=True)


class RateColumn(TextColumn):
    """Items per second, with the unit the job counts in."""

    def __init__(self, unit: str = "it"):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def make_progress(unit: str = "it", disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=disable,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it",
          disable: bool = False) -> Iterator[T]:
    """Iterate with a progress bar (rate + ETA)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress(unit, disable) as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], description: str, unit: str = "it",
                 workers: int = 1, chunksize: int = 1, disable: bool = False) -> list[R]:
    """[fn(x) for x in items], in order, on a process pool when workers > 1, with a progress bar."""
    if workers > 1 and len(items) > 1:
        import multiprocessing as mp

        with mp.Pool(workers) as pool:
            return list(track(pool.imap(fn, items, chunksize=chunksize), description, len(items), unit, disable))
    return list(track(map(fn, items), description, len(items), unit, disable))
