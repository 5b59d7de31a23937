"""CLI commands of this area (registered by editkit.cli): `editkit serve`."""

from __future__ import annotations

from typing import Annotated

import typer

from editkit.app.address import DEFAULT_HOST, DEFAULT_PORT
from editkit.infer.commands import AdapterOpt, PresetOpt, RopeFramesOpt, WithoutOpt
from editkit.infer.speed import AttentionOpt, CacheThresholdOpt, Fp8Opt, OffloadOpt, SpeedOpt, SpeedOptions


def serve(
    model: Annotated[str, typer.Option("--model", help="Diffusers-format model folder, or 'tiny' / 'tiny:<family>' "
                                                       "(random tiny preset: try the interface without weights).")],
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", help="LoRA file as PATH or PATH:SCALE; repeat for several. Each gets a scale slider (0 = off).")]
    = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but 127.0.0.1 exposes the app to your network.")]
    = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on (0 = any free port).")] = DEFAULT_PORT,
    max_image_side: Annotated[int, typer.Option(help="Largest accepted image side in pixels (uploads and output).")]
    = 2048,
    max_sources: Annotated[int, typer.Option(help="Most source images per edit.")] = 3,
    max_file_mb: Annotated[int, typer.Option(help="Largest accepted upload in MB.")] = 25,
    device: Annotated[str | None, typer.Option(help="torch device: cuda, cuda:1, cpu (default: CUDA when available).")]
    = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    preset: PresetOpt = "auto",
    adapter: AdapterOpt = None,
    without: WithoutOpt = None,
    rope_frames: RopeFramesOpt = None,
    speed: SpeedOpt = "auto",
    attention: AttentionOpt = "auto",
    fp8: Fp8Opt = "off",
    offload: OffloadOpt = "none",
    cache_threshold: CacheThresholdOpt = None,
) -> None:
    """Serve the web app: upload, paint a mask, describe the edit, edit again; one GPU job at a time."""
    from editkit.app.limits import AppLimits
    from editkit.app.server import build_controller, checked_port, launch
    from editkit.models.adapter_bundle import AdapterChoice

    speed_options = SpeedOptions(speed, attention, fp8, offload, cache_threshold)
    port = checked_port(host, port)
    limits = AppLimits(max_image_side=max_image_side, max_sources=max_sources, max_file_mb=max_file_mb)
    controller = build_controller(model, lora or [], limits=limits, device=device, dtype=dtype, speed=speed_options,
                                  preset=preset, echo=lambda text: typer.echo(text, err=True),
                                  adapter=AdapterChoice.parse(adapter, without, rope_frames))
    typer.echo(f"editkit serve: model {model} ready; open http://{host}:{port} (Ctrl+C stops)")
    launch(controller, host=host, port=port, block=True)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.command("serve")(serve)
