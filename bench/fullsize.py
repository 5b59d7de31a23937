"""Model presets for the benchmarks: the released Qwen-Image-Edit-2511 sizes ("full") and a toy
version of the same architecture ("tiny", for the CPU smoke test). Weights are random: they cost
the same FLOPs and bytes as the real ones, and nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRANSFORMER_2511 = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56), zero_cond_t=True,
)
VAE_QWEN = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TEXT_QWEN25VL_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
VISION_QWEN25VL_7B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)

# DiffSynth-Studio's default LoRA targets for Qwen-Image.
LORA_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
]


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: dict
    vae: dict
    text: dict
    vision: dict
    size: int
    """Target and condition image side in pixels."""
    text_tokens: int
    """Prompt tokens after the dropped system prompt (the 2511 prompt with one image is ~230)."""
    vlm_image_area: int = 384 * 384
    extra: dict = field(default_factory=dict)

    def tokens_per_image(self) -> int:
        return (self.size // 16) ** 2

    def total_tokens(self) -> int:
        return 2 * self.tokens_per_image() + self.text_tokens


PRESETS = {
    "full": Preset("full", TRANSFORMER_2511, VAE_QWEN, TEXT_QWEN25VL_7B, VISION_QWEN25VL_7B, size=1024, text_tokens=230),
    "tiny": Preset(
        "tiny",
        dict(TRANSFORMER_2511, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
             axes_dims_rope=(4, 6, 6)),
        dict(VAE_QWEN, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        dict(TEXT_QWEN25VL_7B, vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        dict(VISION_QWEN25VL_7B, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
             fullatt_block_indexes=[1]),
        size=64, text_tokens=12, vlm_image_area=56 * 56,
    ),
}


def bench_dtype(device) -> torch.dtype:
    """bf16 on GPUs (what is measured); float32 on the CPU, where bf16 kernels are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_transformer(preset: Preset, device, seed: int = 0):
    """The 2511 transformer with seeded random weights, built directly on `device`."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(bench_dtype(device)):
        model = QwenImageTransformer2DModel(**preset.transformer)
    return model.eval().requires_grad_(False)


def build_vae(preset: Preset, device):
    from diffusers import AutoencoderKLQwenImage

    with torch.device(device), _default_dtype(bench_dtype(device)):
        return AutoencoderKLQwenImage(**preset.vae).eval().requires_grad_(False)


def build_text_encoder(preset: Preset, tokenizer, device):
    """Qwen2.5-VL with the preset's sizes; special-token ids point at the in-memory tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from editkit.models.tiny import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(preset.text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=preset.vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.device(device), _default_dtype(bench_dtype(device)):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval().requires_grad_(False)


def build_components(preset: Preset, device, seed: int = 0) -> dict:
    """Every component of an Edit-Plus (2511) pipeline at the preset's size."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from editkit.models.qwen_image_edit import QWEN_IMAGE_SCHEDULER
    from editkit.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    return dict(
        transformer=build_transformer(preset, device, seed),
        vae=build_vae(preset, device),
        text_encoder=build_text_encoder(preset, tokenizer, device),
        tokenizer=tokenizer,
        image_processor=Qwen2VLImageProcessorPil() if preset.name == "full"
        else Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56),
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
    )


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)
