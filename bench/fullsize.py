"""What the benchmarks add to editkit's architecture presets (`editkit.models.presets`: "full", the
released Qwen-Image-Edit-2511 sizes; "tiny", for the CPU smoke tests): the image side and prompt
length a benchmark feeds them (token counts for the FLOP maths), and bf16 on GPUs. Weights are
random: they cost the same FLOPs and bytes as the real ones, and nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editkit.models.presets import QwenImageEditPreset, get_preset

FAMILY = "qwen-image-edit-2511"


@dataclass(frozen=True)
class Preset:
    """A benchmark setting of an editkit architecture preset of the same name."""

    name: str
    size: int
    """Target and condition image side in pixels."""
    text_tokens: int
    """Prompt tokens after the dropped system prompt (the 2511 prompt with one image is ~230)."""

    @property
    def arch(self) -> QwenImageEditPreset:
        return get_preset(self.name)

    def tokens_per_image(self) -> int:
        return (self.size // 16) ** 2

    def total_tokens(self) -> int:
        return 2 * self.tokens_per_image() + self.text_tokens


PRESETS = {"full": Preset("full", size=1024, text_tokens=230), "tiny": Preset("tiny", size=64, text_tokens=12)}


def bench_dtype(device) -> torch.dtype:
    """bf16 on GPUs (what is measured); float32 on the CPU, where bf16 kernels are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def lora_targets() -> tuple[str, ...]:
    """DiffSynth-Studio's default LoRA targets for Qwen-Image (the family's "default" preset)."""
    from editkit.models.families import get_family

    return get_family(FAMILY).lora_targets["default"]


def build_model(preset: Preset, device, seed: int = 0, areas: dict[str, int] | None = None):
    """A 2511 model of the preset with seeded random weights built directly on `device` in
    `bench_dtype`, frozen; `areas` overrides its views."""
    from editkit.models.families import get_family

    model = get_family(FAMILY).build_preset(preset.name, seed=seed, areas=areas, device=device,
                                            dtype=bench_dtype(device))
    for module in model.modules().values():
        module.requires_grad_(False)
    return model


def build_transformer(preset: Preset, device, seed: int = 0):
    """The 2511 transformer alone with seeded random weights, built directly on `device`, frozen."""
    from editkit.models.presets import build_transformer as build

    return build(preset.name, FAMILY, seed=seed, device=device, dtype=bench_dtype(device)).requires_grad_(False)
