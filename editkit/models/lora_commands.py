"""`editkit lora convert | inspect`: LoRA files (editkit.models.lora), registered by editkit.models.commands."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

lora_app = typer.Typer(help="LoRA files: convert between key layouts, inspect.", no_args_is_help=True)


@lora_app.command("convert")
def lora_convert(
    src: Annotated[Path, typer.Argument(help="LoRA file (any layout: diffusers, peft, diffsynth, comfyui).")],
    dest: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    to: Annotated[str, typer.Option("--to", help="Layout to write: diffusers, peft, diffsynth or comfyui.")] = "diffusers",
) -> None:
    """Rewrite a LoRA in another key layout (tensors and alphas kept exactly)."""
    from editkit.errors import UserError
    from editkit.models import lora

    if to not in lora.LAYOUTS:
        raise UserError(f"--to {to!r}: use one of {', '.join(lora.LAYOUTS)}")
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: is the input file; write the converted LoRA to another path")
    if dest.is_dir():
        raise UserError(f"{dest}: is a folder; give the converted LoRA a file name such as {dest / 'lora.safetensors'}")
    state_dict, header = lora.load_lora(src)
    source_layout = lora.detect_layout(state_dict, str(src))
    keep = {k: v for k, v in header.items() if k not in ("format", "editkit_layout", lora.METADATA_KEY)}
    lora.save_lora(dest, lora.convert(state_dict, to=to, source=str(src)), to, keep)
    typer.echo(f"converted {src} ({source_layout}) -> {dest} ({to})")


@lora_app.command("inspect")
def lora_inspect(path: Annotated[Path, typer.Argument(help="LoRA file.")]) -> None:
    """Print a LoRA's layout, modules, ranks, alphas and metadata."""
    from collections import Counter

    from editkit.models import lora

    state_dict, header = lora.load_lora(path)
    layout = lora.detect_layout(state_dict, str(path))
    modules = lora.parse(state_dict, layout, str(path))
    ranks = Counter(m.rank for m in modules.values())
    scales = Counter(round(m.scale, 4) for m in modules.values())
    typer.echo(f"{path}: {layout} layout, {len(modules)} module(s)")
    typer.echo("ranks: " + ", ".join(f"{r} x{n}" for r, n in sorted(ranks.items())))
    typer.echo("scales (alpha/rank): " + ", ".join(f"{s} x{n}" for s, n in sorted(scales.items())))
    kinds = Counter(re.sub(r"^transformer_blocks\.\d+\.", "", name) for name in modules)
    typer.echo("targets: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    params = sum(m.A.numel() + m.B.numel() for m in modules.values())
    typer.echo(f"parameters: {params:,}")
    for key, value in sorted(header.items()):
        if key != lora.METADATA_KEY:
            typer.echo(f"meta {key}: {value[:200]}")
