"""The speed switches of every command that runs a model: one checked `SpeedOptions`, and the
`editkit.models.accel.Accel` it becomes.

- `--speed lossless`: regional compile + fused block ops + the prompt-length split + the chosen
  attention (the same function within bf16 rounding); `--speed eager`: none of them but the
  chosen attention; `--speed auto` (default): on a CUDA device `CUDA_SPEED` (`SINGLE_EDIT_SPEED`
  for `edit`), eager elsewhere (inductor compiles for minutes on the CPU).
- `--attention auto|cudnn|fa3|flash|sdpa`: `auto` keeps `accel.pick_attention_backend`'s rule.
- Lossy (change the images; they go into resumable runs' fingerprints): `--fp8 matmul|weights`,
  `--cache-threshold T` (diffusers' first-block cache).
- Memory (lossless): `--offload group|model`. With offload the compile step is left out: the
  offload hooks move weights inside the compiled blocks (the low-memory figures in
  docs/benchmarks.md are eager).

Kept free of torch imports (the CLI modules import the option types at start-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from editkit.errors import UserError

if TYPE_CHECKING:
    from editkit.models.accel import Accel

SPEEDS = ("auto", "lossless", "eager")
CUDA_SPEED = "lossless"
"""What `--speed auto` means on a CUDA device for commands that run many denoising steps on one
model (infer, chat, serve). Measured on an H200 (full-size 2511, 1024², 20 steps, through the CLI):
one `editkit edit` took 63.7 s eager and 70.2 s lossless (compiling costs more than it saves on one
edit), while a step is 0.60 s lossless vs 0.81 s eager, so a second edit already repays it."""
SINGLE_EDIT_SPEED = "eager"
"""What `--speed auto` means on a CUDA device for `editkit edit` (one image: see CUDA_SPEED)."""
ATTENTIONS = ("auto", "cudnn", "fa3", "flash", "sdpa")
FP8_MODES = ("matmul", "weights")
OFFLOADS = ("group", "model")
OFF = ("off", "none")
"""Spellings of "switch off" that `--fp8` and `--offload` accept."""
LOSSY_SWITCHES = ("fp8", "cache_threshold")
"""The switches that change the images (resumable runs fingerprint them)."""

SpeedOpt = Annotated[str, typer.Option(
    "--speed", help="auto (lossless on CUDA, eager on the CPU), lossless (compile + fused ops + prompt-length "
                    "split; the first edit at a new size compiles) or eager.")]
AttentionOpt = Annotated[str, typer.Option(
    "--attention", help="auto (cuDNN on Hopper+ GPUs, else the diffusers default), cudnn, fa3 (FlashAttention-3, "
                        "Hopper, needs fa3-fwd), flash or sdpa.")]
Fp8Opt = Annotated[str, typer.Option(
    "--fp8", help="off, matmul (float8 matmuls, Hopper) or weights (float8 storage); lossy, needs torchao.")]
OffloadOpt = Annotated[str, typer.Option(
    "--offload", help="none, group (layers streamed from CPU memory) or model (whole components moved to the "
                      "GPU when used); lossless, for small GPUs.")]
CacheThresholdOpt = Annotated[Optional[float], typer.Option(
    "--cache-threshold", help="First-block cache threshold, e.g. 0.1 (lossy; higher skips more). Off when left "
                              "out.")]


def _off(value):
    return None if value is None or str(value).lower() in OFF else value


def _choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{option} {value!r} is unknown; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class SpeedOptions:
    """Checked speed switches (a UserError names the flag of a bad value). `fp8` and `offload`
    are None when off ("off"/"none" are accepted; `fp8=True` means "matmul")."""

    speed: str = "auto"
    attention: str = "auto"
    fp8: str | None = None
    offload: str | None = None
    cache_threshold: float | None = None

    def __post_init__(self):
        fp8 = "matmul" if self.fp8 is True else (None if self.fp8 is False else _off(self.fp8))
        object.__setattr__(self, "fp8", fp8)
        object.__setattr__(self, "offload", _off(self.offload))
        _choice("--speed", self.speed, SPEEDS)
        _choice("--attention", self.attention, ATTENTIONS)
        if self.fp8 is not None:
            _choice("--fp8", self.fp8, ("off", *FP8_MODES))
        if self.offload is not None:
            _choice("--offload", self.offload, ("none", *OFFLOADS))
        t = self.cache_threshold
        if t is not None and not (math.isfinite(t) and 0 < t <= 1):
            raise UserError(f"--cache-threshold {t}: give a threshold above 0 and at most 1 (e.g. 0.1), or leave "
                            "it out")

    def resolved(self, device: str, single_edit: bool = False) -> SpeedOptions:
        """These options with `speed="auto"` made concrete for `device` (and for a command that makes
        one image, `single_edit`)."""
        if self.speed != "auto":
            return self
        cuda = SINGLE_EDIT_SPEED if single_edit else CUDA_SPEED
        return replace(self, speed=cuda if str(device).startswith("cuda") else "eager")

    def to_accel(self) -> Accel:
        """The `accel.Accel` of these options (resolve `speed="auto"` with `resolved` first)."""
        from editkit.models.accel import Accel

        if self.speed == "auto":
            raise ValueError("SpeedOptions.to_accel: resolve speed='auto' for the device first (resolved)")
        lossless = self.speed == "lossless"
        return Accel(attention=self.attention, compile=lossless and self.offload is None, fused=lossless,
                     split_lengths=lossless, fp8=self.fp8, cache_threshold=self.cache_threshold,
                     offload=self.offload)

    def encoder_accel(self) -> Accel:
        """What applies where only the VLM and VAE run (`editkit cache`): offload alone; the other
        switches concern the transformer (its attention stays "auto": it does not run)."""
        from editkit.models.accel import Accel

        return Accel(attention="auto", compile=False, fused=False, split_lengths=False, offload=self.offload)

    def settings(self) -> dict:
        """For outputs' settings and run manifests."""
        return {"speed": self.speed, "attention": self.attention, "fp8": self.fp8, "offload": self.offload,
                "cache_threshold": self.cache_threshold}

    def lossy(self) -> dict:
        """The switches that change the images and are on (empty when none is), for fingerprints."""
        return {k: v for k, v in self.settings().items() if k in LOSSY_SWITCHES and v is not None}


def apply_speed(model, options: SpeedOptions) -> None:
    """`accel.apply_accel(model, options.to_accel())`, left out where it would change nothing (eager,
    `--attention auto` on a device where auto keeps the diffusers default, no other switch): so a
    default CPU run stays as it was, without diffusers' warning on every attention reset."""
    from editkit.models import accel

    wanted = options.to_accel()
    unchanged = accel.Accel(attention="auto", compile=False, fused=False, split_lengths=False)
    if wanted == unchanged and accel.pick_attention_backend(model.device, model.dtype) is None:
        return
    accel.apply_accel(model, wanted)


def run_settings(speed, preset) -> dict:
    """What an engine records in every output's settings: the few-step preset and the speed switches."""
    return {"preset": preset.name if preset else None, "speed": speed.settings()}
