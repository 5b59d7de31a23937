"""`editkit demo`: the whole loop on the embedded synthetic dataset — data, VAE, cache, editor
training, a CFG sweep on the test split, evaluation against a copy-the-source baseline, report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes; "
                                                               "run again with the same folder to resume."),
    quick: bool = typer.Option(False, "--quick", help="Every stage at toy size (well under 2 minutes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the weights and the sampling."),
    train_vae: bool = typer.Option(False, "--train-vae", help="Train the demo's VAE (about 2 minutes) instead of "
                                                              "using the packaged one."),
    layers: bool = typer.Option(False, "--layers", help="The layer-decomposition loop instead: layered scenes, "
                                                         "a tiny Qwen-Image-Layered decomposer, LayerD against the "
                                                         "untrained model."),
) -> None:
    """Synthesise data, train a tiny 2511 editor from scratch (on the packaged tiny VAE), edit, evaluate, report."""
    if layers:
        from editkit.demo.layers import demo_layers

        demo_layers(out, quick, seed, train_vae, typer.echo)
        return
    from editkit.demo.pipeline import run_demo
    from editkit.demo.presets import FULL, QUICK

    preset = QUICK if quick else FULL
    if train_vae:
        preset = replace(preset, packaged_vae=False)
    result = run_demo(out, preset, seed=seed)
    typer.echo(f"report: {result['report']}")
    typer.echo(f"edit-region MSE {result['edit_mse']:.4f} vs copy-the-source {result['baseline_edit_mse']:.4f} "
               f"(ratio {result['edit_mse_ratio']:.2f}, bar <= 0.5) with {result['best_run']}; "
               f"background PSNR {result['background_psnr']:.2f} dB (bar >= 25)")
    typer.echo(f"wall time {result['seconds']:.0f} s")


def register(app: typer.Typer) -> None:
    """Add the demo command to the editkit app."""
    app.command("demo")(demo_command)
