"""Start the web app: load the model once, build the page, queue GPU jobs one at a time, launch.

Nothing reaches the network: analytics and Gradio's version check are off, fonts are Gradio's
bundled ones, `share` is never enabled, and the server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from editkit.app.actions import AppController, AppDefaults, LoraChoice
from editkit.app.address import DEFAULT_HOST, DEFAULT_PORT
from editkit.app.limits import AppLimits
from editkit.errors import UserError
from editkit.infer.speed import SpeedOptions, apply_speed, run_settings

TINY_STEPS = 4  # the tiny preset is random: more steps only cost time
MAX_QUEUE = 32  # waiting jobs beyond this get "queue is full" instead of an endless wait
MAX_PORT = 65535


def checked_port(host: str, port: int) -> int:
    """`port` if it is a TCP port number; 0 picks a free one on `host` (Gradio itself cannot)."""
    if not 0 <= port <= MAX_PORT:
        raise UserError(f"--port {port}: not a TCP port; choose 1 to {MAX_PORT}, or 0 for any free port")
    if port:
        return port
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]
    except OSError as err:
        raise UserError(f"--host {host}: cannot listen there ({err}); use 127.0.0.1 or an address of this "
                        "machine") from None


def lora_choices(texts: Sequence[str]) -> list[LoraChoice]:
    """`PATH[:SCALE]` flags as named choices (the file name without its extension, made unique)."""
    from editkit.models.lora import LoraSpec

    choices = []
    for text in texts:
        spec = LoraSpec.parse(text)
        name = base = Path(spec.path).stem
        n = 2
        while any(c.name == name for c in choices):
            name, n = f"{base}-{n}", n + 1
        choices.append(LoraChoice(name=name, path=spec.path, scale=spec.scale))
    return choices


def build_controller(model: str, loras: Sequence[str] = (), limits: AppLimits | None = None,
                     device: str | None = None, dtype: str = "auto",
                     output_dir: str | os.PathLike | None = None, speed: SpeedOptions | None = None,
                     preset: str = "auto", echo=None, adapter=None) -> AppController:
    """Load the model (a diffusers folder, or "tiny") and its `--lora` files into an app controller.

    `dtype="auto"` is bf16 on a GPU and fp32 on the CPU. `speed` (default: `SpeedOptions()`) is
    applied to the loaded model; `preset` ("auto": the one a `--lora` file names,
    `editkit.models.lightning`) sets the scheduler and the page's starting steps and CFG, and
    `echo(text)` is told when a preset was detected. `adapter` (an
    `editkit.models.adapter_bundle.AdapterChoice`) sets the RoPE frame mode and the adapter bundle,
    whose extra modules the page then switches. The LoRA, preset and device flags are checked
    before the slow load.
    """
    from editkit.infer.engine import Engine
    from editkit.models import load_model, rope_frames
    from editkit.models.lightning import resolve_preset
    from editkit.models.loading import is_tiny_spec, resolve_dtype
    from editkit.utils.dist import resolve_device

    choices = lora_choices(loras)
    chosen, note = resolve_preset(preset, [c.path for c in choices])
    if note and echo is not None:
        echo(note)
    device = resolve_device(device, "--device")
    speed = (speed or SpeedOptions()).resolved(device)
    loaded = load_model(model, dtype=resolve_dtype(dtype, device), device=device)
    if adapter is not None:
        loaded = rope_frames.view(loaded, adapter.rope_frames)
    engine = Engine(loaded.with_scheduler(chosen.scheduler) if chosen else loaded, model_name=str(model),
                    run_settings=run_settings(speed, chosen))
    if adapter is not None and adapter.path:
        engine.load_adapter(adapter.path, adapter.without)
    apply_speed(engine.model, speed)
    if chosen:
        defaults = AppDefaults(steps=chosen.steps, true_cfg_scale=chosen.true_cfg_scale)
    else:
        sampling = engine.model.family.sampling
        defaults = AppDefaults(steps=TINY_STEPS if is_tiny_spec(model) else sampling.steps, true_cfg_scale=sampling.cfg)
    return AppController(engine, limits=limits, loras=choices, defaults=defaults, output_dir=output_dir)


def launch(controller: AppController, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True):
    """Serve the page; returns the running `gr.Blocks` (call `.close()` to stop) when `block=False`."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from editkit.app.layout import build_blocks

    blocks = build_blocks(controller)
    blocks.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    try:
        blocks.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
            show_error=False,  # handlers show short messages themselves (layout._errors_as_popups)
            max_file_size=f"{controller.limits.max_file_mb}mb", prevent_thread_lock=not block,
            quiet=not block, allowed_paths=[str(controller.output_dir)],
        )
    except OSError as err:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err}); choose another --port") from None
    return blocks
