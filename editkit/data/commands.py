"""`editkit data ...`: validate, convert, build, split, select and synth (thin wrappers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

data_app = typer.Typer(help="Prepare datasets: validate, convert, build, split, select, synthesize.",
                       no_args_is_help=True)

FormatOpt = Annotated[Optional[str], typer.Option("--format", "-f", help="diffsynth, pairs or folder (detected when left out).")]
FieldOpt = Annotated[Optional[list[str]], typer.Option("--field", help="NAME=COLUMN when the file names a field differently, e.g. prompt=caption (repeatable).")]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (created; replaced only if it holds an earlier synthetic set).")],
    n: Annotated[int, typer.Option(help="Number of samples.")] = 1000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of samples in val.jsonl.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of samples in test.jsonl.")] = 0.1,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Draw the synthetic shapes-editing dataset (PNGs + train/val/test .jsonl in the pairs format)."""
    from editkit.data.synth import synthesize

    paths = synthesize(out, n=n, size=size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                       workers=workers)
    typer.echo(f"wrote {n} samples to {out} ({', '.join(p.name for p in paths.values())}, preview.png)")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.add_typer(data_app, name="data")
