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
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Delete the output_dir's earlier run (checkpoints, final/, metrics, previews) "
                                        "and start again."),
) -> None:
    """Train a model (LoRA / full, flow matching / LBM, or the `vae` stage); runs under accelerate launch too.

    Relative paths in the YAML are relative to the YAML's folder; those in key=value overrides to
    the working directory.
    """
    from editkit.train.config import load_config
    from editkit.train.trainer import train as run
    from editkit.utils.dist import rank

    cfg = load_config(config, overrides or [])
    summary = run(cfg, resume=resume, overwrite=overwrite)
    if rank() == 0:
        typer.echo(summary.get("note") or f"trained to step {summary['steps']} in {summary['output_dir']}"
                   + (f"; weights in {summary['final']}" if summary["final"] else ""))


def cache(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Model folder (diffusers format) or tiny[:family]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest of the records to encode."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (created; rerun to resume)."),
    area: int = typer.Option(1024 * 1024, "--area", help="Target pixel area of the aspect-ratio buckets."),
    multiple: int = typer.Option(32, "--multiple", help="Bucket sides are multiples of this."),
    max_ratio: float = typer.Option(4.0, "--max-ratio", help="Most elongated bucket (long side / short side)."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family if the folder does not say."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: this rank's GPU, else CPU)."),
    field: Optional[list[str]] = typer.Option(None, "--field", help="NAME=COLUMN: read a manifest field from another "
                                                                    "column, e.g. --field prompt=caption (repeat)."),
    shard_records: int = typer.Option(64, "--shard-records", help="Records per safetensors shard."),
    batch_size: int = typer.Option(16, "--batch-size",
                                   help="Records of one shape encoded together (VLM and VAE); 1 = one at a time."),
    vae_image_size: Optional[int] = typer.Option(None, "--vae-image-size", help="Side of the VAE view of sources."),
    vlm_image_size: Optional[int] = typer.Option(None, "--vlm-image-size", help="Side of the VLM view of sources."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Take the VAE from this folder (a vae/ folder, or a model "
                                                           "folder holding one)."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="Take the text encoder from this folder "
                                                                             "(or a model folder holding one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild the cache from scratch (its shards and "
                                                              "indexes deleted first); needed when it was made with "
                                                              "other settings or data."),
    repair: bool = typer.Option(False, "--repair", help="Drop the records of bad shards (see `editkit cache verify`) "
                                                        "and encode exactly those again."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out records whose images cannot be read and list "
                                                            "them at the end (default: stop at the first)."),
    offload: str = typer.Option("none", "--offload", help="none, group or model: keep the networks in CPU memory and "
                                                          "move them to the GPU as they run (lossless, for small "
                                                          "GPUs). The other speed switches concern the transformer, "
                                                          "which the cache does not run."),
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
    from editkit.data.manifest import parse_field_overrides
    from editkit.infer.speed import SpeedOptions
    from editkit.models.loading import component_paths
    from editkit.train.cache import build_cache

    speed = SpeedOptions(offload=offload)
    result = build_cache(model, data, out, area, multiple, max_ratio, family=family, dtype=dtype, device=device,
                         shard_records=shard_records, batch_size=batch_size, fields=parse_field_overrides(field),
                         overwrite=overwrite, repair=repair, skip_bad=skip_bad, vae_image_size=vae_image_size,
                         vlm_image_size=vlm_image_size, speed=speed,
                         **component_paths(vae=vae, text_encoder=text_encoder))
    for what, reason in result["repaired"].items():
        typer.echo(f"repair: dropped {what} ({reason}); its records were encoded again")
    typer.echo(f"cached {result['records']} records ({result['skipped']} already done) in {result['out']}")
    if result["bad"]:
        from editkit.data.bad_records import bad_summary

        typer.echo(f"{bad_summary(result['bad'])} (not cached; fix them and run again to add them)", err=True)


def cache_verify(folder: Path = typer.Argument(..., help="Cache folder written by `editkit cache`.")) -> None:
    """Check every shard's sha256 and that every indexed tensor is there; list every bad shard (exit 2)."""
    from editkit.errors import UserError
    from editkit.train.cache import CacheReader, fix_command

    reader = CacheReader(folder)
    problems = reader.problems()
    if problems:
        for p in problems:
            typer.echo(f"{folder / 'shards' / p['shard']}: {p['reason']} ({len(p['records'])} record(s): "
                       f"{', '.join(p['records'][:5])}{' ...' if len(p['records']) > 5 else ''})", err=True)
        n_records = sum(len(p["records"]) for p in problems)
        raise UserError(f"{folder}: {len(problems)} bad shard(s) holding {n_records} record(s); re-encode exactly "
                        f"those with `{fix_command(folder)}`")
    report = reader.verify()
    typer.echo(f"{folder}: OK — {report['records']} records in {report['shards']} shards, "
               f"white latents for {', '.join(report['white']) or 'no buckets'}")
