"""`editkit layers ...`: prep, validate and synth for layered RGBA data (thin wrappers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

layers_app = typer.Typer(help="Layered RGBA data and the RGBA-VAE (Qwen-Image-Layered): prepare, validate, synthesize, convert.",
                         no_args_is_help=True)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@layers_app.command("prep")
def prep(
    input: Annotated[Path, typer.Option("--input", help="A .psd/.psb file, or a folder of PSDs, Crello-style sample folders or split-layer folders.")],
    out: Annotated[Path, typer.Option(help="Output folder ({split}/{WxH}/ PNGs and metadata/manifest.json); re-running resumes.")],
    train_count: Annotated[int, typer.Option(help="Samples in the train split.")],
    val_count: Annotated[int, typer.Option(help="Samples in the val split.")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="psd, crello or layers (detected when left out).")] = None,
    multiple: Annotated[int, typer.Option(help="Sides become multiples of this (8, 16, 32 or 64).")] = 32,
    max_side: Annotated[int, typer.Option(help="Longest side at most this many pixels.")] = 1024,
    max_pixels: Annotated[int, typer.Option(help="At most this many pixels per image.")] = 1024 * 1024,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
    seed: Annotated[int, typer.Option(help="Shuffle seed of the train/val split.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo an OUT made with other settings or inputs (its outputs are removed first).")] = False,
) -> None:
    """Resize every sample's RGBA components and their composite into buckets, split train/val, resumably."""
    from editkit.layers.prep import prepare_layers

    result = prepare_layers(input, out, train_count, val_count, format=format, multiple=multiple, max_side=max_side,
                            max_pixels=max_pixels, workers=workers, seed=seed, overwrite=overwrite)
    splits = ", ".join(f"{name} {sum(1 for s in result.samples if s.split == name)}" for name in ("train", "val"))
    kept = f"; {result.reused} already prepared (kept)" if result.reused else ""
    failed = f"; {len(result.failed)} skipped (see above)" if result.failed else ""
    typer.echo(f"wrote {len(result.samples)} samples ({splits}){kept}{failed} to {result.manifest}")


@layers_app.command("validate")
def validate(
    out: Annotated[Path, typer.Argument(help="A folder written by `editkit layers prep`.")],
    tolerance: Annotated[float, typer.Option(help="Largest composite error allowed, in 8-bit levels.")] = 2.0,
    worst: Annotated[int, typer.Option(help="How many samples with the largest composite errors to list.")] = 5,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Check alpha, sizes, z-order and that each composite is the over-composition of its components. Exit 2 on problems."""
    from editkit.layers.validate import validate_prepared

    report = validate_prepared(out, tolerance=tolerance, workers=workers)
    if report.errors and worst > 0:
        shown = ", ".join(f"{sid} {err:.2f}" for sid, err in report.errors[:worst])
        typer.echo(f"largest composite errors (8-bit levels): {shown}")
    for line in report.problems:
        typer.echo(line)
    splits = ", ".join(f"{name} {count}" for name, count in report.counts.items())
    status = "no problems" if report.ok else f"{len(report.problems)} problems"
    typer.echo(f"{out}: {report.samples} samples ({splits}), {report.layers} components, {status}")
    if not report.ok:
        raise typer.Exit(2)


@layers_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (created; replaced only if it holds an earlier synthetic set).")],
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same scenes).")] = 0,
    size: Annotated[int, typer.Option(help="Long side of each scene in pixels.")] = 256,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Draw synthetic layered scenes (2-8 RGBA layers with descriptions) as split-layer folders."""
    from editkit.layers.synth import synthesize_layers

    synthesize_layers(out, n=n, size=size, seed=seed, workers=workers)
    typer.echo(f"wrote {n} layered scenes to {out} (read them with `editkit layers prep --input {out}`)")


def register(app: typer.Typer) -> None:
    """Add this area's commands (and the RGBA-VAE's, editkit.layers.vae_commands) to the editkit app."""
    from editkit.layers.vae_commands import register as register_vae

    register_vae(layers_app)
    app.add_typer(layers_app, name="layers")
