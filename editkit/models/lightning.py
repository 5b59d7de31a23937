"""Lightning few-step sampling: lightx2v's Qwen-Image-Edit-2511-Lightning LoRAs and their scheduler.

The LoRAs (`Qwen-Image-Edit-2511-Lightning-{4,8}steps-V1.0-{bf16,fp32}.safetensors` in the
`lightx2v/Qwen-Image-Edit-2511-Lightning` repository) were distilled for 4 or 8 steps without CFG
under a fixed shift of 3: the scheduler below (`LIGHTNING_SCHEDULER`, lightx2v's diffusers example)
keeps dynamic shifting on with base_shift = max_shift = log 3 (so mu = log 3 at every size) and
drops the terminal shift. A preset sets the steps, CFG 1 and this scheduler; the user still gives
the LoRA file with `--lora`.

`--preset auto` (the CLI default) picks the preset a LoRA's file name or safetensors metadata names
("Lightning-8steps"); `--preset lightning-8step|lightning-4step` asks for one and refuses a LoRA
that names the other step count; `--preset none` samples as without a Lightning LoRA.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from editkit.errors import UserError

LIGHTNING_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": math.log(3),  # the Lightning LoRAs were distilled with shift 3
    "max_shift": math.log(3),
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
"""`FlowMatchEulerDiscreteScheduler` config the Lightning LoRAs sample with."""


@dataclass(frozen=True)
class SamplingPreset:
    """Steps, CFG scale and scheduler config a distilled LoRA needs."""

    name: str
    steps: int
    true_cfg_scale: float
    scheduler: dict


PRESETS = {p.name: p for p in (SamplingPreset("lightning-8step", 8, 1.0, LIGHTNING_SCHEDULER),
                               SamplingPreset("lightning-4step", 4, 1.0, LIGHTNING_SCHEDULER))}
PRESET_CHOICES = ("auto", "none", *PRESETS)

_LIGHTNING_STEPS = re.compile(r"lightning[^a-z0-9]*(\d+)[^a-z0-9]*steps?", re.IGNORECASE)


def lightning_steps(path: str | os.PathLike) -> int | None:
    """The step count a LoRA file says it is distilled for ("...Lightning-8steps..." in its file
    name or a safetensors metadata value), or None."""
    texts = [Path(path).name]
    if Path(path).suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                texts += [str(v) for v in (f.metadata() or {}).values()]
        except (SafetensorError, OSError):
            pass  # a damaged file is reported (one line) when the LoRA is loaded
    for text in texts:
        found = _LIGHTNING_STEPS.search(text)
        if found:
            return int(found.group(1))
    return None


def resolve_preset(name: str, lora_paths: Sequence[str | os.PathLike] = (),
                   sampler: str = "flow") -> tuple[SamplingPreset | None, str | None]:
    """The preset to sample with, and a note to show when it was detected from a LoRA.

    `name` is "auto" (the preset a LoRA names, if any), "none", or a preset name; a LoRA naming
    another Lightning step count than the preset asked for, or LoRAs naming different ones, is a
    UserError, as is a preset with the bridge sampler (presets are flow-matching schedules).
    """
    if name not in PRESET_CHOICES:
        raise UserError(f"--preset {name!r} is unknown; use one of {', '.join(PRESET_CHOICES)}")
    if name == "none":
        return None, None
    detected = {str(p): n for p in lora_paths if (n := lightning_steps(p)) is not None}
    if name == "auto":
        if sampler != "flow" or not detected:
            return None, None
        if len(set(detected.values())) > 1:
            listed = ", ".join(f"{p} ({n} steps)" for p, n in detected.items())
            raise UserError(f"--lora: the LoRAs are Lightning LoRAs for different step counts ({listed}); "
                            "give one of them")
        path, steps = next(iter(detected.items()))
        preset = PRESETS.get(f"lightning-{steps}step")
        if preset is None:
            return None, None
        return preset, (f"using --preset {preset.name} ({preset.steps} steps, CFG 1, its scheduler): {path} "
                        f"is a Lightning {steps}-step LoRA; --preset none turns this off")
    preset = PRESETS[name]
    if sampler != "flow":
        raise UserError(f"--preset {name}: presets are for the flow sampler; leave --preset out with "
                        f"--sampler {sampler}")
    for path, steps in detected.items():
        if steps != preset.steps:
            other = PRESETS.get(f"lightning-{steps}step")
            hint = f"use --preset {other.name}" if other else "use --preset none"
            raise UserError(f"--preset {name} samples {preset.steps} steps but {path} is a Lightning {steps}-step "
                            f"LoRA; {hint}")
    return preset, None
