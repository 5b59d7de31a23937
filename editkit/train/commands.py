"""CLI commands of this area: `editkit train`, `editkit cache`, `editkit cache verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.command(context_settings={"allow_extra_args": False})(train)
    cache_app = typer.Typer(help="Precompute VLM embeddings and VAE latents for training (and verify them).",
                            no_args_is_help=False, invoke_without_command=True)
    cache_app.callback(invoke_without_command=True)(cache)
    cache_app.command("verify")(cache_verify)
    app.add_typer(cache_app, name="cache")


def train(
    config: Path = typer.Argument(..., help="Training config YAML (see configs/ and docs/training.md)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=1e-4."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint folder (step-NNNNNN)."),
) -> None:
    """Train a model (LoRA / full, flow matching / LBM, or the `vae` stage); runs under accelerate launch too."""
    from editkit.train.config import load_config
    from editkit.train.trainer import train as run
    from editkit.utils.dist import rank

    cfg = load_config(config, overrides or [])
    summary = run(cfg, resume=resume)
    if rank() == 0:
        typer.echo(f"trained to step {summary['steps']} in {summary['output_dir']}"
                   + (f"; weights in {summary['final']}" if summary["final"] else ""))


def cache(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Model folder (diffusers format) or tiny[:family]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest of the records to encode."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (created; rerun to resume)."),
    area: int = typer.Option(1024 * 1024, "--area", help="Target pixel area of the aspect-ratio buckets."),
    multiple: int = typer.Option(32, "--multiple", help="Bucket sides are multiples of this."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family if the folder does not say."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    shard_records: int = typer.Option(64, "--shard-records", help="Records per safetensors shard."),
    batch_size: int = typer.Option(16, "--batch-size",
                                   help="Records of one shape encoded together (VLM and VAE); 1 = one at a time."),
    vae_image_size: Optional[int] = typer.Option(None, "--vae-image-size", help="Side of the VAE view of sources."),
    vlm_image_size: Optional[int] = typer.Option(None, "--vlm-image-size", help="Side of the VLM view of sources."),
) -> None:
    """Encode a manifest once (embeddings in en/cn/inverse/empty, latents, white latents) into a cache.

    Under torchrun / accelerate launch every process encodes its share and writes its own shards.
    """
    if ctx.invoked_subcommand is not None:
        return
    from editkit.errors import UserError

    missing = [name for name, v in (("--model", model), ("--data", data), ("--out", out)) if v is None]
    if missing:
        raise UserError(f"editkit cache: give {', '.join(missing)} (or `editkit cache verify DIR`)")
    from editkit.train.cache import build_cache

    result = build_cache(model, data, out, area, multiple, family=family, dtype=dtype,
                         shard_records=shard_records, batch_size=batch_size, vae_image_size=vae_image_size,
                         vlm_image_size=vlm_image_size)
    typer.echo(f"cached {result['records']} records ({result['skipped']} already done) in {result['out']}")


def cache_verify(folder: Path = typer.Argument(..., help="Cache folder written by `editkit cache`.")) -> None:
    """Check every shard's sha256 and that every indexed tensor is there."""
    from editkit.train.cache import CacheReader

    report = CacheReader(folder).verify()
    typer.echo(f"{folder}: OK — {report['records']} records in {report['shards']} shards, "
               f"white latents for {', '.join(report['white']) or 'no buckets'}")
