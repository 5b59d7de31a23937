"""`editkit layers convert-vae` and `editkit layers reconstruct-vae` (thin wrappers).

`register(group)` adds both to a typer app or group (the `layers` group: editkit/layers/commands.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def convert_vae_command(
    src: Annotated[Path, typer.Argument(help="An RGB Qwen-Image VAE folder (AutoencoderKLQwenImage), or a model folder holding vae/.")],
    out: Annotated[Path, typer.Argument(help="Folder for the RGBA VAE (diffusers format, input_channels=4).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT when it exists and is not empty.")] = False,
) -> None:
    """Widen an RGB Qwen-Image VAE to RGBA (Qwen-Image-Layered §3.1): RGB weights copied, alpha in 0, alpha out 1."""
    from editkit.layers.rgba_vae import convert_vae

    convert_vae(src, out, overwrite=overwrite)
    typer.echo(f"wrote the RGBA VAE to {out} (load it with AutoencoderKLQwenImage.from_pretrained)")


def reconstruct_vae_command(
    vae: Annotated[Path, typer.Argument(help="An RGBA VAE folder (an RGB one is widened in memory first).")],
    data: Annotated[Path, typer.Argument(help="A folder written by `editkit layers prep`.")],
    out: Annotated[Path, typer.Option(help="Output folder: pred/<id>.png and targets.jsonl.")],
    split: Annotated[str, typer.Option(help="Split to reconstruct: train or val.")] = "val",
    composites: Annotated[bool, typer.Option("--composites/--no-composites", help="Also reconstruct the composites.")] = True,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: the GPU when there is one, else the CPU).")] = None,
) -> None:
    """Reconstruct a prepared split with an RGBA VAE, for `editkit eval --metrics rgba`."""
    from editkit.layers.vae_recon import reconstruct_prepared

    manifest = reconstruct_prepared(vae, data, out, split=split, include_composites=composites, device=device)
    typer.echo(f"wrote {out / 'pred'} and {manifest}; score them with `editkit eval --pred {out / 'pred'} "
               f"--data {manifest} --metrics rgba --out EVAL_DIR`")


def register(group: typer.Typer) -> None:
    """Add convert-vae and reconstruct-vae to `group`."""
    group.command("convert-vae")(convert_vae_command)
    group.command("reconstruct-vae")(reconstruct_vae_command)
