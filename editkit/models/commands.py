"""CLI commands of this area (registered by editkit.cli): `editkit model save-tiny | info` and
`editkit lora convert | inspect` (editkit.models.lora_commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from editkit.models.families import DEFAULT_FAMILY, FAMILY_NAMES
from editkit.models.lora_commands import lora_app

model_app = typer.Typer(help="Model folders: write tiny presets, inspect a model.", no_args_is_help=True)


@model_app.command("save-tiny")
def save_tiny_command(
    out_dir: Path = typer.Argument(..., help="Folder to write (an earlier model folder there is replaced atomically)."),
    family: str = typer.Option(DEFAULT_FAMILY, "--family", help=f"One of: {', '.join(FAMILY_NAMES)}."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write the tiny preset of a family as a diffusers-format model folder."""
    from editkit.models.loading import save_tiny

    _check_replaceable(out_dir)
    path = save_tiny(out_dir, family=family, seed=seed)
    typer.echo(f"wrote tiny {family} model to {path}")


@model_app.command("info")
def info_command(
    model: str = typer.Argument(..., help="A diffusers-format folder, or tiny / tiny:<family>."),
    family: str = typer.Option(None, "--family", help="Family, when the folder does not say."),
    transformer: Path = typer.Option(None, "--transformer", help="Take the transformer from this folder."),
) -> None:
    """Print a model's family, view sizes, transformer flags and parameter counts (reads no weights)."""
    from editkit.models.families import get_family
    from editkit.models.loading import describe

    info = describe(model, family=family, transformer=transformer)
    typer.echo(f"family: {info['family']} ({get_family(info['family']).description})")
    typer.echo(f"VLM view area: {info['vlm_image_area']} px, VAE view area: {info['vae_image_area']} px")
    typer.echo(f"default output area: {info['output_area']} px")
    config = info["transformer_config"]
    flags = {k: config.get(k, False) for k in ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond")}
    typer.echo(f"transformer: {config.get('num_layers')} layers, in_channels {config.get('in_channels')}, {flags}")
    for name, count in info["parameters"].items():
        typer.echo(f"{name}: {count:,} parameters")


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or an earlier model folder may be replaced: never a file or other work."""
    from editkit.errors import UserError

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; give a folder path for the model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise UserError(f"{out_dir}: is a folder that holds no model (no model_index.json) and would be replaced; "
                        "give a new or empty folder")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.add_typer(model_app, name="model")
    app.add_typer(lora_app, name="lora")
