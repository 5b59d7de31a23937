"""The Qwen-Image-2.1 family: one model for generation and editing, with its `EditModel` facade.

Reproduces diffusers' `QwenImage21Pipeline` on batches. The architecture differs from
Qwen-Image-Edit's in every part, so only the facade's views and placement are inherited
(`QwenImageEditModel`); what is new:

- **the condition encoder** is Qwen3-VL (8B in the release). The prompt is the pipeline's raw
  template (system prompt "Comprehend and analyze the provided prompt.", then per source image
  "<imageK><|vision_start|><|image_pad|><|vision_end|>", then the instruction), left-padded in a
  batch; the embeddings are the last decoder layer's output **before** the text model's final
  RMSNorm (what the transformer was trained on: transformers 5.x ties `hidden_states[-1]` to the
  normed `last_hidden_state`, so the pipeline hooks the norm out; so does `encode_prompt`), with
  the system prompt's tokens dropped. The VLM sees each source image at its VAE view, composited
  over white: each of its image tokens stands for 2x2 latent tokens of that image;
- **the transformer** (`QwenImage21Transformer2DModel`, single-stream, 32 blocks) puts each condition
  image's latent tokens into the prompt sequence in place of its image tokens (4 per token), then
  appends the target's; attention is block-causal; with `causal_condition` the text and condition
  tokens are modulated at t = 0, so their keys and values are the same at every step: the **prefix
  KV cache** (`use_kv_cache`, on by default as in the pipeline; `with_kv_cache`) computes them once;
- **the VAE** (`AutoencoderKLQwenImage21`) is RGBA in and out (4 channels), 16x downsampling, 64
  latent channels, no 2x2 packing: "packed" latents are the latent grid flattened, `(B, h*w, C)`.
  Source images are read with their alpha (an RGB image is opaque) and outputs are RGBA images;
- **sampling**: 40 steps, no CFG by default (`true_cfg_scale` 1); true CFG, when a sample has a
  negative prompt and a scale > 1, is `neg + s (cond - neg)` without the Qwen-Image rescale; the
  conditional and negative passes run with their own KV caches. A distilled checkpoint's
  `sample_sigmas` (model_index.json) are its schedule: they set the family's default step count for
  that folder, and any other `--steps N` samples the usual `linspace(1, 1/N, N)` grid;
- up to 10 source images (`max_images`); no image: text-to-image.

`predict` is the differentiable flow-matching velocity (`noise - target` at s in [0, 1]) for the
trainer and the bridge sampler; a batch of prompts of different lengths runs one pass per length
(the transformer lays out the sequence from the first sample, so padding would shift the target's
RoPE position). `sample_latents` is the pipeline's loop (its CFG rule, KV cache and sigmas).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.data.images import as_mode, fit_area
from editkit.errors import UserError
from editkit.models.family import VIEW_AREAS, EditInputs, SamplingDefaults, write_model_index
from editkit.models.qwen_image_edit import QwenImageEditModel, _device_map
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")  # `editkit model info` reads a family's facts without torch

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
IMAGE_PAD = "<|image_pad|>"
VAE_SCALE = 16
"""Pixels per latent token side (the pipeline's `vae_scale_factor`; the VAE is unpatched)."""
TOKENS_PER_SLOT = 4
"""Latent tokens per VLM image token (2x2)."""
MAX_IMAGES = 10

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen chat template's text part, for the tiny preset's processor (the pipeline derives the
dropped-token count from it)."""

SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
"""`FlowMatchEulerDiscreteScheduler` config of built models; the shift values are the pipeline's own
fallbacks (`calculate_shift`). A loaded folder's scheduler_config.json is what runs."""

LORA_TARGETS = {
    "default": ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"),
}
LORA_TARGETS["expanded"] = LORA_TARGETS["default"] + ("img_in", "txt_in.in_layer", "txt_in.out_layer", "proj_out",
                                                      "modulation.1")
"""LoRA presets of the single-stream transformer: every block's attention and SwiGLU projections
(`default`), plus the input, text and output projections and the shared modulation (`expanded`)."""

COMPONENT_FILES = {
    "transformer": ("config.json", "*.safetensors*"),
    "vae": ("config.json", "*.safetensors*"),
    "text_encoder": ("config.json", "*.safetensors*"),
    "processor": ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json|vocab.json"),
    "scheduler": ("scheduler_config.json",),
}


@dataclass(frozen=True)
class Qwen21Preset:
    """The sizes of every network of one preset (arguments of their diffusers / transformers classes)."""

    name: str
    transformer: dict
    vae: dict
    text: dict
    """Qwen3-VL `text_config` (special-token ids come from the tokenizer; the vocabulary is at least its size)."""
    vision: dict
    image_processor: dict
    view_area: int | None = None


PRESETS = {
    "full": Qwen21Preset(
        # the released sizes: the diffusers classes' defaults (7.0 B transformer, 32 blocks 4096 wide),
        # and Qwen3-VL-8B (context_in_dim 4096)
        name="full",
        transformer=dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                         num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56),
                         causal_condition=True),
        vae=dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2,
                 temperal_downsample=[False, True, True, True], is_residual=True, in_channels=4, out_channels=4),
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
        image_processor=dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                             max_pixels=4096 * 4096, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    ),
    "tiny": Qwen21Preset(
        # 2 blocks 32 wide; a 16x VAE (5 levels) of 8 channels with 16 latent channels (not 4: the
        # VAE image processor takes a 4-channel input for latents when the VAE has 4 latent channels)
        name="tiny",
        transformer=dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, context_in_dim=64, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
                         causal_condition=True),
        vae=dict(base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                 temperal_downsample=[False, True, True, True], is_residual=True, in_channels=4, out_channels=4,
                 latents_mean=[round(0.1 * (i - 8), 2) for i in range(16)],
                 latents_std=[round(0.8 + 0.1 * i, 2) for i in range(16)]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0]),
        image_processor=dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                             max_pixels=512 * 512, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        view_area=64 * 64,
    ),
}
"""Architecture presets built in code with seeded random weights: "full" (benchmarks), "tiny" (tests)."""


def prompt_text(instruction: str, num_images: int) -> str:
    """The pipeline's VLM text for one instruction with `num_images` source images (an empty
    instruction becomes " ", as the pipeline makes it)."""
    instruction = instruction or " "
    images = "".join(f"{' ' if i else ''}<image{i + 1}><|vision_start|>{IMAGE_PAD}<|vision_end|>"
                      for i in range(num_images))
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{images}{instruction}<|im_end|>\n"
            "<|im_start|>assistant\n")


@dataclass(frozen=True)
class QwenImage21Family:
    """Qwen-Image-2.1: facts, and how to build, load and write its models."""

    name: str = "qwen-image-2.1"
    pipeline_class: str = "QwenImage21Pipeline"
    description: str = ("Qwen-Image-2.1: generation and editing with up to 10 source images, single-stream "
                        "7B transformer, Qwen3-VL encoder, RGBA output")
    max_images: int | None = MAX_IMAGES
    image_mode: str = "RGBA"
    """Source images keep their alpha (the VAE is RGBA); an RGB image is opaque."""
    vlm_image_area: int = 1024 * 1024
    """The VLM sees each source image at its VAE view (an image token is 2x2 latent tokens)."""
    vae_image_area: int = 1024 * 1024
    output_area: int = 1024 * 1024
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER))
    lora_targets: dict = field(default_factory=lambda: dict(LORA_TARGETS))
    component_files: dict = field(default_factory=lambda: dict(COMPONENT_FILES))
    sampling: SamplingDefaults = SamplingDefaults(steps=40, cfg=1.0)
    """The pipeline's defaults: 40 steps, no CFG (`true_cfg_scale=1`)."""
    trainable: bool = True

    def unused_modules(self, transformer) -> list[str]:
        """None: every module is shared by the text, condition and target tokens (single stream)."""
        return []

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        return (model_index.get("_class_name") == self.pipeline_class
                or transformer_config.get("_class_name") == "QwenImage21Transformer2DModel")

    def check_transformer(self, transformer_config: dict) -> None:
        found = transformer_config.get("_class_name")
        if found is not None and found != "QwenImage21Transformer2DModel":
            raise UserError(f"family {self.name} needs a QwenImage21Transformer2DModel, but the transformer's "
                            f"config.json names {found}; pass the right --family (or --transformer)")

    def load_transformer(self, folder: Path, torch_dtype, device=None):
        from diffusers import QwenImage21Transformer2DModel

        return QwenImage21Transformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                                             **_device_map(device))

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int], device=None):
        """A snapshot's components as a facade (weights streamed to `device` when given). A distilled
        checkpoint's `sample_sigmas` (model_index.json) become the model's schedule and its family's
        default step count."""
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2Tokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        placed = _device_map(device)
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        sigmas = _sample_sigmas(index.get("sample_sigmas"), root / "model_index.json")
        family = self if sigmas is None else dataclasses.replace(
            self, sampling=dataclasses.replace(self.sampling, steps=len(sigmas)))
        processor = root / "processor"
        return QwenImage21Model(
            family,
            transformer=self.load_transformer(transformer_dir, torch_dtype, device),
            vae=AutoencoderKLQwenImage21.from_pretrained(root / "vae", torch_dtype=torch_dtype, local_files_only=True,
                                                         **placed),
            text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(
                root / "text_encoder", dtype=torch_dtype, local_files_only=True, **placed),
            tokenizer=Qwen2Tokenizer.from_pretrained(processor, local_files_only=True),
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(processor, local_files_only=True),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True),
            chat_template=_read_chat_template(processor),
            sample_sigmas=sigmas,
            **areas,
        )

    def build_tiny(self, seed: int = 0, areas: dict[str, int] | None = None):
        return self.build_preset("tiny", seed=seed, areas=areas)

    def build_preset(self, preset: str = "tiny", seed: int = 0, areas: dict[str, int] | None = None, device=None,
                     dtype=None, sample_sigmas: Sequence[float] | None = None):
        """A model of `PRESETS[preset]` with seeded random weights, created on `device` in `dtype`
        (default: the CPU, float32), identical for the same seed; the global RNG is left as it was."""
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from editkit.models.presets import _created_on, _forked_rng, build_tokenizer

        if preset not in PRESETS:
            raise UserError(f"unknown model preset {preset!r}; use one of {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        with _forked_rng(device), _created_on(device, dtype):
            torch.manual_seed(seed)
            tokenizer = build_tokenizer()
            text_encoder = _text_encoder(spec, tokenizer).eval()
            vae = AutoencoderKLQwenImage21(**copy.deepcopy(spec.vae)).eval()
            transformer = QwenImage21Transformer2DModel(**copy.deepcopy(spec.transformer)).eval()
        view = {key: spec.view_area for key in VIEW_AREAS} if spec.view_area else {}
        return QwenImage21Model(self, transformer, vae, text_encoder, tokenizer,
                                Qwen2VLImageProcessorPil(**copy.deepcopy(spec.image_processor)),
                                FlowMatchEulerDiscreteScheduler(**self.scheduler), chat_template=CHAT_TEMPLATE,
                                sample_sigmas=sample_sigmas, **{**view, **(areas or {})})

    def write_folder(self, model: QwenImage21Model, out: Path, extra: dict | None = None) -> None:
        """The components and model_index.json (with the model's `sample_sigmas`) into the empty `out`;
        `QwenImage21Pipeline.from_pretrained` loads it."""
        model.transformer.save_pretrained(out / "transformer")
        model.vae.save_pretrained(out / "vae")
        model.text_encoder.save_pretrained(out / "text_encoder")
        model.tokenizer.save_pretrained(out / "processor")
        model.processor.image_processor.save_pretrained(out / "processor")
        if model.processor.chat_template:
            (out / "processor" / "chat_template.jinja").write_text(model.processor.chat_template)
        model.scheduler.save_pretrained(out / "scheduler")
        components = {
            "processor": ["transformers", "Qwen3VLProcessor"],
            "sample_sigmas": None if model.sample_sigmas is None else [float(s) for s in model.sample_sigmas],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
            "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage21"],
        }
        write_model_index(self, model, out, components, extra)


FAMILIES = (QwenImage21Family(),)
"""Registered in editkit.models.families."""


def _sample_sigmas(value, where: Path) -> list[float] | None:
    """model_index.json's `sample_sigmas`: None, or a non-empty list of numbers in (0, 1]."""
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 1 for s in value)):
        raise UserError(f"{where}: sample_sigmas must be a list of sigmas in (0, 1] (the terminal 0 left out), "
                        f"got {value!r}; fix it or remove the entry")
    return [float(s) for s in value]


def _read_chat_template(folder: Path) -> str | None:
    """The processor's chat template as transformers stores it (chat_template.jinja, or the older
    chat_template.json), else the tokenizer's (None: the literal system prompt is tokenized)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{folder / 'chat_template.json'}: not a JSON object with a chat_template; "
                            "re-download it or restore it from the model snapshot") from None
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text()).get("chat_template") if config.is_file() else None


def _text_encoder(spec: Qwen21Preset, tokenizer):
    """Qwen3-VL (text + vision) whose special-token ids point at the tokenizer's."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from editkit.models.presets import SPECIAL_TOKENS

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {**copy.deepcopy(spec.text), "vocab_size": max(spec.text.get("vocab_size", 0), len(tokenizer)),
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen3VLConfig(text_config=text, vision_config=copy.deepcopy(spec.vision),
                           image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen3VLForConditionalGeneration(config)


def _make_processor(image_processor, tokenizer, chat_template: str | None):
    """A Qwen3-VL processor for images and text only (transformers type-checks the video processor
    against a class that needs torchvision; editing never uses video)."""
    from transformers import Qwen3VLProcessor

    class ImageTextProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=chat_template)


@contextlib.contextmanager
def _before_final_norm(text_encoder):
    """The text model's final RMSNorm passes its input through (as the pipeline's forward hook)."""
    text_model = getattr(text_encoder.model, "language_model", text_encoder.model)
    handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        yield
    finally:
        handle.remove()


class QwenImage21Model(QwenImageEditModel):
    """Transformer + RGBA VAE + Qwen3-VL of Qwen-Image-2.1 (the views and placement are Qwen-Image-Edit's).

    Shapes: latents `(B, C, h, w)` with h, w = pixels / 16; packed latents `(B, h*w, C)`;
    `img_shapes` lists each condition image, then the target, in latent tokens.
    """

    def __init__(self, family: QwenImage21Family, transformer, vae, text_encoder, tokenizer, image_processor,
                 scheduler, vlm_image_area: int | None = None, vae_image_area: int | None = None,
                 output_area: int | None = None, chat_template: str | None = None,
                 sample_sigmas: Sequence[float] | None = None):
        from diffusers.image_processor import VaeImageProcessor

        scale = 2 ** (len(vae.config.dim_mult) - 1) * (vae.config.patch_size or 1)
        if scale != VAE_SCALE:
            raise UserError(f"the VAE downsamples {scale}x; {family.pipeline_class} needs a {VAE_SCALE}x "
                            "AutoencoderKLQwenImage21 (check vae/config.json)")
        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.processor = _make_processor(image_processor, tokenizer, chat_template)
        self.scheduler = scheduler
        self.vae_image_area = vae_image_area or family.vae_image_area
        self.vlm_image_area = self.vae_image_area  # the VLM sees the VAE view (`vlm_image_area` has no say)
        self.output_area = output_area or family.output_area
        self.sample_sigmas = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
        self.vae_scale_factor = VAE_SCALE
        self.latent_channels = vae.config.z_dim
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE, vae_latent_channels=self.latent_channels)
        self.drop_idx = self._system_tokens()
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._slots: dict[tuple[int, ...], list[int]] = {}
        first = next(transformer.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.kv_cache = True
        """The prefix KV cache in `sample_latents` (the pipeline's `use_kv_cache`): `with_kv_cache`."""
        self._velocity_hooks: tuple = ()
        self._split_lengths = True
        self._batch_split = None
        self.rope_frames = "own"

    def _system_tokens(self) -> int:
        """How many leading tokens (the system message) are dropped: from the processor's chat template
        as the pipeline counts them, else the literal system message's."""
        if self.processor.chat_template:
            message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
            return len(self.processor.apply_chat_template(message, tokenize=True, return_dict=False)[0])
        return len(self.tokenizer(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")["input_ids"])

    # ----- views -----------------------------------------------------------------------------

    def with_kv_cache(self, enabled: bool = True) -> QwenImage21Model:
        """The same model sampling with (or without) the prefix KV cache, sharing the weights. Both
        are the same function; in bf16 they round differently (the pipeline's note on `use_kv_cache`)."""
        view = copy.copy(self)
        view.kv_cache = bool(enabled)
        return view

    def with_rope_frames(self, mode: str) -> QwenImage21Model:
        from editkit.models import rope_frames

        rope_frames.check(mode)
        if mode != "own":
            raise UserError(f"--rope-frames {mode}: family {self.family.name} lays out its RoPE over the joint "
                            "text/image sequence and has no per-image frames to share; use --rope-frames own")
        return self

    def split_prompt_lengths(self, enabled: bool = True) -> None:
        """Always on for this family: prompts of different lengths never share a pass (see `predict`)."""

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Output sides are multiples of 32: a VLM image token covers 2x2 latent tokens of 16 pixels."""
        return VAE_SCALE * 2

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): given, or the output area at the last source image's aspect
        (as the pipeline), or a square without images; multiples of 32."""
        if (width is None or height is None) and images:
            auto_w, auto_h = fit_area(self.output_area, images[-1].width / images[-1].height)
            width, height = width or auto_w, height or auto_h
        elif width is None or height is None:
            side = math.isqrt(self.output_area)
            width, height = width or side, height or side
        m = self.size_multiple
        return width // m * m, height // m * m

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VAE, and the VLM, see a source image."""
        return fit_area(self.vae_image_area, image.width / image.height)

    def vlm_size(self, image: Image.Image) -> tuple[int, int]:
        return self.vae_size(image)

    def vlm_view(self, image: Image.Image) -> Image.Image:
        """A source image as the VLM gets it: at its VAE view, composited over white."""
        from PIL import Image as PILImage

        width, height = self.vae_size(image)
        resized = self.image_processor.resize(as_mode(image, "RGBA"), height, width)
        white = PILImage.new("RGB", resized.size, (255, 255, 255))
        white.paste(resized, mask=resized.getchannel("A"))
        return white

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        return height // VAE_SCALE, width // VAE_SCALE

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]):
        """The transformer's blocks of one sample in latent tokens: each condition image, then the target."""
        return [*[(1, h // VAE_SCALE, w // VAE_SCALE) for w, h in cond_sizes], (1, height // VAE_SCALE,
                                                                                 width // VAE_SCALE)]

    # ----- prompt ----------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """Qwen3-VL embeddings of instructions, each with its own source images: `(embeds (B, L, D),
        mask (B, L) long)`, the last decoder layer's output before the final norm without the system
        message, right-padded to the longest prompt of the batch."""
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        for sample in images:
            if len(sample) > MAX_IMAGES:
                raise UserError(f"family {self.family.name} takes at most {MAX_IMAGES} source images, got "
                                f"{len(sample)}; pass fewer images")
        texts = [prompt_text(p, len(imgs)) for p, imgs in zip(prompts, images)]
        flat = [img for imgs in images for img in imgs]
        call = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
        if flat:
            call["images"] = [self.vlm_view(img) for img in flat]
        inputs = self.processor(**call).to(self.device)
        if flat:
            self._check_grids(flat, inputs["image_grid_thw"])
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            if key in inputs:
                forward[key] = inputs[key]
        with _before_final_norm(self.text_encoder):
            hidden = self.text_encoder.model(**forward).last_hidden_state
        valid = inputs["attention_mask"].bool()
        tokens = [int(g.prod()) // TOKENS_PER_SLOT for g in inputs["image_grid_thw"]] if flat else []
        kept, start = [], 0
        for i, sample in enumerate(images):
            counts, start = tuple(tokens[start:start + len(sample)]), start + len(sample)
            ids = inputs["input_ids"][i][valid[i]][self.drop_idx:]
            if (ids == self.image_token_id).nonzero().flatten().tolist() != self.image_slots(counts):
                # `predict` places the condition latents at `image_slots`
                raise RuntimeError("the VLM's image tokens are not where the template puts them")
            kept.append(hidden[i][valid[i]][self.drop_idx:])
        length = max(k.shape[0] for k in kept)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.long, device=hidden.device)
        for i, k in enumerate(kept):
            embeds[i, : k.shape[0]] = k
            mask[i, : k.shape[0]] = 1
        return embeds.to(self.dtype), mask

    def _check_grids(self, images: Sequence[Image.Image], grids) -> None:
        """Each image's VLM patch grid is its VAE view's (one VLM image token per 2x2 latent tokens);
        an image processor that resizes it (its min/max pixels) would misplace the latent tokens."""
        patch = self.processor.image_processor.patch_size
        for image, grid in zip(images, grids.tolist()):
            width, height = self.vae_size(image)
            if grid != [1, height // patch, width // patch]:
                raise UserError(f"a {width}x{height} source view is resized by the VLM's image processor (its "
                                "min/max pixels in processor/preprocessor_config.json); choose a --vae-image-size "
                                "inside those bounds")

    def image_slots(self, counts: tuple[int, ...]) -> list[int]:
        """Positions of the VLM image tokens in a prompt's embeddings (system message dropped) for
        source images with `counts` image tokens each; the instruction comes after them, so they do
        not depend on it."""
        if counts not in self._slots:
            parts = prompt_text(" ", len(counts)).split(IMAGE_PAD)
            text = "".join(part + IMAGE_PAD * count for part, count in zip(parts, counts)) + parts[-1]
            ids = self.tokenizer(text)["input_ids"][self.drop_idx:]
            self._slots[counts] = [i for i, token in enumerate(ids) if token == self.image_token_id]
        return self._slots[counts]

    def _image_mask(self, length: int, shapes: Sequence[tuple[int, int, int]], device) -> torch.Tensor:
        """The transformer's `img_mask` row for prompts of `length` tokens: the condition images' VLM
        image tokens, then one slot per 2x2 target latent tokens (the pipeline's `append_target_slots`)."""
        counts = tuple(f * h * w // TOKENS_PER_SLOT for f, h, w in shapes[:-1])
        slots = self.image_slots(counts)
        if slots and slots[-1] >= length:
            raise ValueError(f"prompt embeddings of {length} tokens lack their image tokens; encode them with "
                             "the same source images (model.encode_prompt)")
        f, h, w = shapes[-1]
        mask = torch.zeros(length + f * h * w // TOKENS_PER_SLOT, dtype=torch.bool, device=device)
        mask[slots] = True
        mask[length:] = True
        return mask

    # ----- latents ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 4, H, W) straight-alpha RGBA tensor in [-1, 1]
        (an image without alpha is opaque)."""
        return torch.cat([self.image_processor.preprocess(as_mode(img, "RGBA"), height, width) for img in images])

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` of RGBA pixels `(B, 4, H, W)` in [-1, 1] (RGB: opaque)."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        if pixels.shape[1] == 3:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        latents = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std)[:, :, 0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """RGBA pixels `(B, 4, H, W)` in [-1, 1] from normalised latents `(B, C, h, w)`."""
        latents = latents.unsqueeze(2).to(self.vae.dtype)
        mean, std = self._latent_stats(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]

    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]:
        """RGBA PIL images of decoded pixels (the pipeline's output)."""
        return self.image_processor.postprocess(pixels, output_type="pil")

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents to `(B, h*w, C)` tokens (the transformer takes them unpatched)."""
        return latents.flatten(2).transpose(1, 2)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        b, _, channels = packed.shape
        return packed.transpose(1, 2).reshape(b, channels, latent_height, latent_width)

    # ----- transformer -----------------------------------------------------------------------

    def _predict_batch(self, *args):
        """One pass per prompt length (`predict`'s batch, or this process's share under `with_cfg_parallel`)."""
        from editkit.models.accel import predict_by_prompt_length

        return predict_by_prompt_length(self._predict_once, *args)

    def _predict_once(self, latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents,
                      attention_kwargs):
        if prompt_mask is not None and not bool(prompt_mask.all()):
            raise ValueError("prompt embeddings must be right-padded (model.encode_prompt's layout)")
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])
        return self._transformer_call(latents, timestep, prompt_embeds, img_shapes, cond_latents, attention_kwargs)

    def _transformer_call(self, latents, timestep, prompt_embeds, img_shapes, cond_latents, attention_kwargs,
                          kv_cache=None, kv_mode=None):
        """The transformer's velocity for the target tokens of unpadded prompts of one length."""
        if any(shapes != img_shapes[0] for shapes in img_shapes):
            raise ValueError("all samples of a batch must share img_shapes; group requests by shape")
        batch, num_target = latents.shape[:2]
        hidden = latents if cond_latents is None else torch.cat([cond_latents.to(latents.dtype), latents], dim=1)
        img_mask = self._image_mask(prompt_embeds.shape[1], img_shapes[0], latents.device).expand(batch, -1)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds,
            timestep=timestep.to(device=latents.device, dtype=latents.dtype),
            img_shapes=list(img_shapes),
            img_mask=img_mask,
            attention_kwargs=attention_kwargs,
            kv_cache=kv_cache,
            kv_cache_mode=kv_mode,
            return_dict=False,
        )[0]
        return out[:, -num_target:]

    # ----- sampling --------------------------------------------------------------------------

    def schedule_sigmas(self, steps: int) -> list[float]:
        """The sigmas of a `steps`-step run: the checkpoint's `sample_sigmas` when they have that
        many, else `linspace(1, 1/steps, steps)` (the pipeline's default grid)."""
        import numpy as np

        if self.sample_sigmas is not None and len(self.sample_sigmas) == steps:
            return list(self.sample_sigmas)
        return np.linspace(1.0, 1 / steps, steps).tolist()

    def sample_latents(self, inputs: EditInputs, steps: int, cfg: Sequence[float], seeds: Sequence[int],
                       latents: torch.Tensor, callback=None, attention_kwargs: dict | None = None,
                       image_cfg: Sequence[float | None] | None = None) -> torch.Tensor:
        """Denoise packed `latents` as the pipeline does; returns the packed target latents.

        Sample i runs true CFG when `cfg[i] > 1` and it has a negative prompt: `neg + cfg[i] (cond -
        neg)`. Its conditional and negative passes run in groups of equal prompt length, each group
        with its own prefix KV cache (filled at the first step) when the cache is on; under
        `with_cfg_parallel` the passes are shared between processes and run without the cache.
        Velocity hooks (latent-mask fusion) act on the guided velocity. `image_cfg` is not used.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        from editkit.infer.sampler import dynamic_shift_mu

        batch = inputs.batch_size
        has_negative = inputs.has_negative or [False] * batch
        guided = [i for i in range(batch) if cfg[i] > 1 and has_negative[i]]
        rows = self._rows(inputs, guided)
        sample_of = torch.tensor([i for i, _ in rows], device=latents.device)
        transformer = getattr(self.transformer, "module", self.transformer)
        cached = self.kv_cache and self._batch_split is None and bool(transformer.config.causal_condition)
        groups: dict[int, list[int]] = {}
        for r, (_, embeds) in enumerate(rows):
            groups.setdefault(embeds.shape[0], []).append(r)
        caches = {length: QwenImage21KVCache(len(transformer.transformer_blocks)) if cached else None
                  for length in groups}

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=self.schedule_sigmas(steps), device=self.device,
                                mu=dynamic_shift_mu(scheduler.config, latents.shape[1]))
        scheduler.set_begin_index(0)
        with torch.no_grad(), self.denoising():
            for step, t in enumerate(scheduler.timesteps):
                timestep = t.expand(batch).to(latents.dtype) / 1000
                x, ts = latents[sample_of], timestep[sample_of]
                if cached or self._batch_split is None:
                    pred = x.new_empty(x.shape)
                    for length, members in groups.items():
                        idx = torch.tensor(members, device=latents.device)
                        cond = None if inputs.cond_latents is None else inputs.cond_latents[sample_of[idx]]
                        mode = None if not cached else ("extract" if step == 0 else "cached")
                        pred[idx] = self._transformer_call(
                            x[idx], ts[idx], torch.stack([rows[r][1] for r in members]),
                            [inputs.img_shapes[0]] * len(members), cond, attention_kwargs, caches[length], mode)
                else:
                    embeds, mask = _padded([e for _, e in rows])
                    cond = None if inputs.cond_latents is None else inputs.cond_latents[sample_of]
                    pred = self._batch_split(self._predict_batch, x, ts, embeds, mask,
                                             [inputs.img_shapes[0]] * len(rows), cond, attention_kwargs)
                velocity = pred[:batch].clone()
                for k, i in enumerate(guided):
                    negative = pred[batch + k]
                    velocity[i] = negative + cfg[i] * (pred[i] - negative)
                for hook in self._velocity_hooks:
                    velocity = hook(velocity)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(step + 1, steps)
        return latents

    @staticmethod
    def _rows(inputs: EditInputs, guided: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """(sample, unpadded prompt embeddings) of every transformer pass: each sample's prompt, then
        the negatives of the guided samples."""
        def unpadded(embeds, mask, i):
            return embeds[i, : int(mask[i].sum())] if mask is not None else embeds[i]

        rows = [(i, unpadded(inputs.prompt_embeds, inputs.prompt_mask, i)) for i in range(inputs.batch_size)]
        return rows + [(i, unpadded(inputs.negative_embeds, inputs.negative_mask, i)) for i in guided]


def _padded(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) embeddings to (B, L, D) with a (B, L) long mask."""
    length = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask
