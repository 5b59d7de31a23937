"""Architecture presets of Qwen-Image-Edit, built in code with seeded random weights.

One table (`PRESETS`) of the sizes editkit builds without a download: "full" is the released
Qwen-Image-Edit-2511 architecture (QwenImage transformer 20.4 B, Qwen2.5-VL-7B text encoder
8.3 B, Qwen VAE 127 M; what the benchmarks run), "tiny" the same architectures at toy widths
(tests, the demo; a 2-step 64x64 edit with true CFG runs in well under a second on a CPU). The
tokenizer is a byte-level Qwen2 tokenizer built in memory for every preset (so its ids, not the
released tokenizer's, are the text encoder's special-token ids) and the image processor
transformers' PIL Qwen2-VL one. A family's transformer flags (2511's `zero_cond_t`) and
scheduler come from the family, not the preset.

`build_components` makes every part for one seed; `QwenImageEditFamily.build_preset` wraps them
in the facade.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from editkit.errors import UserError

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class QwenImageEditPreset:
    """The sizes of every network of one preset (the arguments of their diffusers / transformers classes)."""

    name: str
    transformer: dict
    """`QwenImageTransformer2DModel` arguments (the family adds its flags)."""
    vae: dict
    """`AutoencoderKLQwenImage` arguments."""
    text: dict
    """Qwen2.5-VL `text_config` (special-token ids come from the tokenizer; the vocabulary is at least its size)."""
    vision: dict
    """Qwen2.5-VL `vision_config`."""
    image_processor: dict = field(default_factory=dict)
    """`Qwen2VLImageProcessorPil` arguments."""
    view_area: int | None = None
    """VLM view, VAE view and default output area of a model of this preset (pixels; None: the family's)."""


FULL = QwenImageEditPreset(
    name="full",
    transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
)

TINY = QwenImageEditPreset(
    name="tiny",
    transformer=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
    # 3 downsamplings (8x), 4 latent channels with a non-trivial latent mean/std
    vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0]),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=112,
                fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    image_processor=dict(min_pixels=28 * 28, max_pixels=56 * 56),
    view_area=64 * 64,
)

PRESETS = {preset.name: preset for preset in (TINY, FULL)}


def get_preset(preset: str | QwenImageEditPreset) -> QwenImageEditPreset:
    """The preset called `preset` (or `preset` itself); a UserError lists the known ones otherwise."""
    if isinstance(preset, QwenImageEditPreset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class Components:
    """Every part of a Qwen-Image-Edit model (what the facade is built from)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_processor: object
    scheduler: object


def build_tokenizer():
    """A byte-level Qwen2 tokenizer: the 256 ByteLevel symbols, no merges, Qwen special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]}
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_components(preset: str | QwenImageEditPreset, family, seed: int = 0, device=None,
                     dtype: torch.dtype | None = None) -> Components:
    """Every part of `preset` for `family` (a family object or its name), identical for the same seed.

    With `device` / `dtype` the networks are created there, in that dtype (the full preset: its
    bf16 weights straight on the GPU, no 115 GB float32 copy on the CPU first). The global RNG is
    left as it was.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec, family = get_preset(preset), _family(family)
    with _forked_rng(device), _created_on(device, dtype):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        text_encoder = _text_encoder(spec, tokenizer).eval()
        vae = _vae(spec).eval()
        transformer = _transformer(spec, family).eval()
    return Components(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_processor=_image_processor(spec),
        scheduler=FlowMatchEulerDiscreteScheduler(**family.scheduler),
    )


def build_transformer(preset: str | QwenImageEditPreset, family, seed: int = 0, device=None,
                      dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformer of `preset` alone (transformer benchmarks), seeded; not the weights of
    `build_components`' transformer for the same seed (there the other parts are drawn first)."""
    spec, family = get_preset(preset), _family(family)
    with _forked_rng(device), _created_on(device, dtype):
        torch.manual_seed(seed)
        return _transformer(spec, family).eval()


def _family(family):
    from editkit.models.families import get_family

    return get_family(family) if isinstance(family, str) else family


def _text_encoder(preset: QwenImageEditPreset, tokenizer):
    """Qwen2.5-VL (text + vision) whose special-token ids point at the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        **copy.deepcopy(preset.text),
        "vocab_size": max(preset.text.get("vocab_size", 0), len(tokenizer)),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=copy.deepcopy(preset.vision),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _vae(preset: QwenImageEditPreset):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**copy.deepcopy(preset.vae))


def _transformer(preset: QwenImageEditPreset, family):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**copy.deepcopy(preset.transformer), **family.transformer_flags)


def _image_processor(preset: QwenImageEditPreset):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**copy.deepcopy(preset.image_processor))


def _forked_rng(device):
    """Seeding inside leaves the CPU RNG (and that of a CUDA `device`) as it was."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index or 0], device_type="cuda")
    return torch.random.fork_rng(devices=[])


@contextlib.contextmanager
def _created_on(device, dtype: torch.dtype | None):
    """New tensors are made on `device` and floating-point ones in `dtype` (either None: unchanged)."""
    old = torch.get_default_dtype()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)
