"""The Qwen-Image-Edit family (first release, 2509, 2511): its facts and its `EditModel` facade.

The reference implementation of `editkit.models.family`. `QwenImageEditFamily` states what
differs between the releases (the VLM prompt template, the image sizes the VLM and the VAE see,
the scheduler, the transformer flags) and builds, loads and writes models;
`QwenImageEditModel` owns everything that must agree between the trainer and the engine: the
VLM prompt (family template, image tokens, dropped system-prompt tokens), the VLM and VAE views
of the source images, latent normalisation with the VAE's mean/std, 2x2 packing, RoPE
`img_shapes` and the transformer call (2511's `zero_cond_t` is handled inside diffusers'
transformer from `img_shapes`: the first entry is the target, the rest are condition images).

Shapes: "latents" are normalised VAE latents `(B, C, h, w)` (h, w = pixels / 8); "packed"
latents are `(B, h/2 * w/2, 4C)`, the transformer's tokens. Sizes are `(width, height)` in pixels;
pixel areas as in the diffusers pipelines (`CONDITION_IMAGE_SIZE = 384 * 384`). Unlike the
diffusers pipelines, every method takes a batch (B > 1).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.data.images import fit_area
from editkit.errors import UserError
from editkit.models.family import VIEW_AREAS, EditInputs, SamplingDefaults, write_model_index
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")  # `editkit model info` reads a family's facts without torch

SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
"""Everything before the user's turn; its tokens are dropped from the prompt embeddings."""

PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
"""`FlowMatchEulerDiscreteScheduler` config of the released Qwen-Image(-Edit) snapshots."""


QWEN_LORA_TARGETS = {
    # DiffSynth-Studio's Qwen-Image LoRA targets (module-name suffixes)
    "default": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"),
}
QWEN_LORA_TARGETS["expanded"] = QWEN_LORA_TARGETS["default"] + ("img_in", "txt_in", "proj_out")  # 2511 workflows
"""Named LoRA target presets of the QwenImage transformer (`train.lora.targets: default|expanded`)."""


COMPONENT_FILES = {
    "transformer": ("config.json", "*.safetensors*"),
    "vae": ("config.json", "*.safetensors*"),
    "text_encoder": ("config.json", "*.safetensors*"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json|vocab.json"),
    "processor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
}
"""What each component folder of a snapshot must hold (glob patterns; `a|b`: either will do)."""

TRANSFORMER_FLAGS = ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond")
"""QwenImage transformer config flags that tell families apart (absent from a family's flags: False)."""


@dataclass(frozen=True)
class QwenImageEditFamily:
    """One Qwen-Image-Edit release (one diffusers pipeline class and its checkpoints)."""

    name: str
    pipeline_class: str
    description: str
    image_prompt: str
    """Per-image text placed before the instruction; `{}` is the 1-based image number."""
    max_images: int | None
    """How many source images the prompt template takes (None: any number)."""
    size_reference: str
    """Which source image sets the default output size: "first" or "last" (as the pipelines do)."""
    vlm_image_area: int = 384 * 384
    vae_image_area: int = 1024 * 1024
    output_area: int = 1024 * 1024
    image_mode: str = "RGB"
    scheduler: dict = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER))
    transformer_flags: dict = field(default_factory=dict)
    system_prompt: str = SYSTEM_PROMPT
    prompt_suffix: str = PROMPT_SUFFIX
    lora_targets: dict = field(default_factory=lambda: dict(QWEN_LORA_TARGETS))
    """Named LoRA target presets: preset name -> module-name suffixes or globs."""
    component_files: dict = field(default_factory=lambda: dict(COMPONENT_FILES))
    sampling: SamplingDefaults = SamplingDefaults(steps=40, cfg=4.0)
    """40 steps (the 2511 model card), true CFG 4 against the negative prompt " " (the pipelines' examples)."""
    trainable: bool = True

    def prompt(self, instruction: str, num_images: int) -> str:
        """The full VLM text for one instruction with `num_images` source images."""
        if self.max_images is not None and num_images > self.max_images:
            raise UserError(
                f"family {self.name} takes at most {self.max_images} source image(s), got {num_images}; "
                "pass fewer images or use an Edit-Plus family (qwen-image-edit-2509/2511)"
            )
        images = "".join(self.image_prompt.format(i + 1) for i in range(num_images))
        return f"{self.system_prompt}{images}{instruction}{self.prompt_suffix}"

    @property
    def model_class(self) -> type:
        """The facade class of this family's models (a family built on this code gives its own subclass)."""
        return QwenImageEditModel

    def unused_modules(self, transformer) -> list[str]:
        """Modules whose output the model discards (no LoRA goes there): the last block's text stream."""
        blocks = getattr(transformer, "transformer_blocks", None)
        if not blocks:
            return []
        last = f"transformer_blocks.{len(blocks) - 1}"
        return [f"{last}.attn.to_add_out", f"{last}.txt_mlp"]

    def extra_modules(self) -> dict:
        """New modules `train.extra_modules` can add: `ste`, one learned vector per image slot (the
        target and up to `max_images` condition images, editkit.models.ste). None for a transformer
        whose frames are layers (Qwen-Image-Layered)."""
        if self.transformer_flags.get("use_layer3d_rope"):
            return {}
        from editkit.models.ste import CONDITION_SLOTS, attach_ste

        slots = 1 + (self.max_images or CONDITION_SLOTS)
        return {"ste": lambda transformer, name: attach_ste(transformer, name, slots)}

    # ----- folders ---------------------------------------------------------------------------

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """Released snapshots are told apart by pipeline class, and 2509 from 2511 by `zero_cond_t`."""
        pipeline = model_index.get("_class_name")
        if pipeline == "QwenImageEditPipeline":
            return self.pipeline_class == pipeline
        if pipeline == "QwenImageEditPlusPipeline" or transformer_config.get("zero_cond_t"):
            zero_cond = bool(self.transformer_flags.get("zero_cond_t"))
            return self.pipeline_class == "QwenImageEditPlusPipeline" and zero_cond == bool(
                transformer_config.get("zero_cond_t"))
        return False

    def check_transformer(self, transformer_config: dict) -> None:
        """The transformer must have the family's flags (a 2509 transformer is no 2511 and vice versa)."""
        for flag in TRANSFORMER_FLAGS:
            expected, found = bool(self.transformer_flags.get(flag, False)), bool(transformer_config.get(flag, False))
            if expected != found:
                raise UserError(
                    f"family {self.name} needs a transformer with {flag}={expected}, but its config.json has "
                    f"{flag}={found}; pass the right --family (or --transformer)"
                )

    def load_transformer(self, folder: Path, torch_dtype, device=None):
        """The transformer of a component folder, on the CPU, or streamed to `device` (see `load_folder`)."""
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                                           **_device_map(device))

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int], device=None):
        """A snapshot's components (the transformer from `transformer_dir`) as a facade, on the CPU;
        with a `device`, the networks' safetensors shards are read straight onto it (diffusers' and
        transformers' `device_map`), without a whole copy in host memory."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        placed = _device_map(device)
        return self.model_class(
            self,
            transformer=self.load_transformer(transformer_dir, torch_dtype, device),
            vae=AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=torch_dtype, local_files_only=True,
                                                       **placed),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
                root / "text_encoder", dtype=torch_dtype, local_files_only=True, **placed),
            tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(root / "processor", local_files_only=True),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True),
            **areas,
        )

    def build_tiny(self, seed: int = 0, areas: dict[str, int] | None = None):
        """The tiny preset: the real architectures at toy widths (editkit.models.presets), 64x64 views
        unless `areas` says otherwise."""
        return self.build_preset("tiny", seed=seed, areas=areas)

    def build_preset(self, preset: str = "tiny", seed: int = 0, areas: dict[str, int] | None = None, device=None,
                     dtype=None):
        """A model of an architecture preset of editkit.models.presets ("tiny", "full") with seeded
        random weights, created on `device` in `dtype` (default: the CPU, float32); its views are the
        preset's (the family's for "full") unless `areas` says otherwise."""
        from editkit.models.presets import build_components, get_preset

        spec = get_preset(preset)
        parts = build_components(spec, self, seed=seed, device=device, dtype=dtype)
        view = {key: spec.view_area for key in VIEW_AREAS} if spec.view_area else {}
        return self.model_class(self, parts.transformer, parts.vae, parts.text_encoder, parts.tokenizer,
                                parts.image_processor, parts.scheduler, **{**view, **(areas or {})})

    def write_folder(self, model: QwenImageEditModel, out: Path, extra: dict | None = None) -> None:
        """Write the model's components and model_index.json into the (empty) folder `out`; `extra`
        adds `_editkit_<key>` entries to model_index.json (e.g. what wrote the folder)."""
        model.transformer.save_pretrained(out / "transformer")
        model.vae.save_pretrained(out / "vae")
        model.text_encoder.save_pretrained(out / "text_encoder")
        model.tokenizer.save_pretrained(out / "tokenizer")
        model.tokenizer.save_pretrained(out / "processor")
        model.processor.image_processor.save_pretrained(out / "processor")
        model.scheduler.save_pretrained(out / "scheduler")
        write_model_index(self, model, out, self.components(), extra)

    def components(self) -> dict:
        """The model_index.json components of a folder of this family, as diffusers writes them."""
        return {
            "processor": ["transformers", "Qwen2VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        }


FAMILIES = (
    QwenImageEditFamily(
        name="qwen-image-edit",
        pipeline_class="QwenImageEditPipeline",
        description="Qwen-Image-Edit (first release): one source image, seen by the VLM at the VAE's size",
        image_prompt=IMAGE_TOKENS,
        max_images=1,
        size_reference="first",
        vlm_image_area=1024 * 1024,
    ),
    QwenImageEditFamily(
        name="qwen-image-edit-2509",
        pipeline_class="QwenImageEditPlusPipeline",
        description="Qwen-Image-Edit-2509 (Edit-Plus): several source images, 'Picture i:' template",
        image_prompt=f"Picture {{}}: {IMAGE_TOKENS}",
        max_images=None,
        size_reference="last",
    ),
    QwenImageEditFamily(
        name="qwen-image-edit-2511",
        pipeline_class="QwenImageEditPlusPipeline",
        description="Qwen-Image-Edit-2511: Edit-Plus with condition tokens modulated at t=0 (zero_cond_t)",
        image_prompt=f"Picture {{}}: {IMAGE_TOKENS}",
        max_images=None,
        size_reference="last",
        transformer_flags={"zero_cond_t": True},
    ),
)
"""The three releases, registered in editkit.models.families."""


def _device_map(device) -> dict:
    """`from_pretrained` keyword arguments that load onto `device` (none: diffusers' and
    transformers' default, the CPU)."""
    return {} if device is None else {"device_map": str(torch.device(device))}


def _make_processor(image_processor, tokenizer):
    """A Qwen2-VL processor for images and text only.

    transformers type-checks the video processor against a class that needs torchvision (not
    installed); image editing never uses video, so the processor is built without one.
    """
    from transformers import Qwen2VLProcessor

    class ImageTextProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


class QwenImageEditModel:
    """Transformer + VAE + Qwen2.5-VL text encoder of one release, with the release's conventions."""

    def __init__(
        self,
        family: QwenImageEditFamily,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        image_processor,
        scheduler,
        vlm_image_area: int | None = None,
        vae_image_area: int | None = None,
        output_area: int | None = None,
    ):
        from diffusers.image_processor import VaeImageProcessor

        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.processor = _make_processor(image_processor, tokenizer)
        self.scheduler = scheduler
        self.vlm_image_area = vlm_image_area or family.vlm_image_area
        self.vae_image_area = vae_image_area or family.vae_image_area
        self.output_area = output_area or family.output_area
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        self.latent_channels = vae.config.z_dim
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.drop_idx = len(tokenizer(family.system_prompt)["input_ids"])
        first = next(transformer.parameters())
        self.device: torch.device = first.device
        """Execution device: where inputs, noise and prompts are made (kept when weights are offloaded)."""
        self.dtype: torch.dtype = first.dtype
        """Compute dtype of embeddings and latents (kept when weights are stored in another dtype)."""
        self._velocity_hooks: tuple = ()
        self._split_lengths = False
        self._batch_split = None
        self.rope_frames = "own"
        """Condition images at their own RoPE frames ("own") or the target's ("shared"): `with_rope_frames`."""

    # ----- derived views (clients never assign to a facade's attributes) ---------------------

    def with_transformer(self, transformer) -> QwenImageEditModel:
        """The same model running another transformer module (e.g. the DDP/FSDP-wrapped one a
        training loop steps), sharing every other part."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def without_encoders(self) -> QwenImageEditModel:
        """The same model without the VLM and VAE, for training from caches: their memory is freed
        once the caller drops the full model. Encoding or decoding then raises a clear error."""
        view = copy.copy(self)
        view.text_encoder = view.vae = None
        return view

    def with_velocity_hook(self, hook) -> QwenImageEditModel:
        """The same model whose `predict` output passes through `hook(velocity) -> velocity` (the
        engine's latent-mask fusion blends in the background's velocity so)."""
        view = copy.copy(self)
        view._velocity_hooks = (*self._velocity_hooks, hook)
        return view

    def with_scheduler(self, config) -> QwenImageEditModel:
        """The same model sampling with another scheduler config (a few-step preset's: see
        editkit.models.lightning), sharing the weights."""
        view = copy.copy(self)
        view.scheduler = type(self.scheduler).from_config(dict(config))
        return view

    def with_rope_frames(self, mode: str) -> QwenImageEditModel:
        """The same model with condition images at their own RoPE frames ("own", as released) or all
        at the target's frame ("shared": the positional ablation, editkit.models.rope_frames)."""
        from editkit.models import rope_frames

        rope_frames.check(mode)
        if mode != "own":
            rope_frames.check_supported(self.transformer)
        view = copy.copy(self)
        view.rope_frames = mode
        return view

    def with_cfg_parallel(self, split) -> QwenImageEditModel:
        """The same model whose `predict` batch is shared between processes: `split(predict, *args)`
        runs this process's share through `predict` and returns the whole batch's velocity
        (editkit.infer.parallel.CfgParallel: the conditional and negative halves of a true-CFG batch
        on two GPUs). Velocity hooks run after it, on the whole batch."""
        view = copy.copy(self)
        view._batch_split = split
        return view

    @contextlib.contextmanager
    def denoising(self):
        """One sampling run: diffusers' step caches on the transformer (the first-block cache of
        `--cache-threshold`) get their context and start and end empty, so a run never reuses another
        run's (or another batch shape's) cached residuals. A no-op without such a cache."""
        transformer = self.transformer
        if not getattr(transformer, "is_cache_enabled", False):  # a DDP wrapper or no cache enabled
            yield
            return
        transformer._reset_stateful_cache()
        try:
            with transformer.cache_context("edit"):
                yield
        finally:
            transformer._reset_stateful_cache()

    def split_prompt_lengths(self, enabled: bool = True) -> None:
        """Run a batch of right-padded prompts of different lengths as one unmasked pass per
        length (the same function; faster attention without a mask, see editkit.models.accel)."""
        self._split_lengths = enabled

    # ----- placement -------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks held now by component name (no VLM and VAE after `without_encoders`)."""
        parts = {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}
        return {name: module for name, module in parts.items() if module is not None}

    def to(self, device=None, dtype=None) -> QwenImageEditModel:
        """Move and cast the networks; `device` / `dtype` are where and in what inputs are made."""
        for module in self.modules().values():
            # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even a harmless one
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Output width and height are multiples of this (VAE downsampling x 2x2 packing)."""
        return self.vae_scale_factor * 2

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): given, or the family's output area at the reference image's aspect."""
        if (width is None or height is None) and images:
            ref = images[0] if self.family.size_reference == "first" else images[-1]
            auto_w, auto_h = fit_area(self.output_area, ref.width / ref.height)
            width, height = width or auto_w, height or auto_h
        elif width is None or height is None:
            side = int(math.sqrt(self.output_area))
            width, height = width or side, height or side
        m = self.size_multiple
        return width // m * m, height // m * m

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VAE sees a source image."""
        return fit_area(self.vae_image_area, image.width / image.height)

    def vlm_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VLM sees a source image (before its own patch rounding)."""
        return fit_area(self.vlm_image_area, image.width / image.height)

    def vlm_view(self, image: Image.Image) -> Image.Image:
        """A source image as the VLM gets it (resized as the pipelines resize it)."""
        width, height = self.vlm_size(image)
        return self.image_processor.resize(_rgb(image), height, width)

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]):
        """RoPE frames of one sample: the target first, then each condition image, in packed units."""
        unit = self.size_multiple
        return [(1, height // unit, width // unit), *[(1, h // unit, w // unit) for w, h in cond_sizes]]

    # ----- prompt ----------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """VLM embeddings of instructions, each with its own source images.

        Returns `(embeds (B, L, D), mask (B, L) long)`: the last hidden state without the
        system-prompt tokens, right-padded to the longest prompt of the batch.
        """
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = [self.family.prompt(p, len(imgs)) for p, imgs in zip(prompts, images)]
        views = [self.vlm_view(img) for imgs in images for img in imgs]
        inputs = self.processor(text=texts, images=views or None, padding=True, return_tensors="pt").to(self.device)
        # the base model's last (normed) hidden state: the pipelines' hidden_states[-1] without the LM head
        hidden = self.text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
        ).last_hidden_state
        valid = inputs["attention_mask"].bool()
        kept = [hidden[i][valid[i]][self.drop_idx :] for i in range(hidden.shape[0])]
        length = max(k.shape[0] for k in kept)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.long, device=hidden.device)
        for i, k in enumerate(kept):
            embeds[i, : k.shape[0]] = k
            mask[i, : k.shape[0]] = 1
        return embeds.to(self.dtype), mask

    # ----- latents ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 3, H, W) tensor in [-1, 1]."""
        return torch.cat([self.image_processor.preprocess(_rgb(img), height, width) for img in images])

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` of pixels `(B, 3, H, W)` in [-1, 1] (the VAE's mode)."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std)[:, :, 0]

    def encode_images(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` of PIL images resized to (width, height)."""
        return self.encode_latents(self.preprocess(images, width, height))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in about [-1, 1] from normalised latents `(B, C, h, w)`."""
        latents = latents.unsqueeze(2).to(self.vae.dtype)
        mean, std = self._latent_stats(latents)
        latents = latents / (1.0 / std) + mean
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def decode_packed(self, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` from packed target latents of a (width, height) image."""
        return self.decode_latents(self.unpack(packed, *self.latent_size(width, height)))

    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]:
        """PIL images from decoded pixels (the pipelines' postprocessing)."""
        return self.image_processor.postprocess(pixels, output_type="pil")

    def _latent_stats(self, latents: torch.Tensor):
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents to `(B, h/2 * w/2, 4C)` tokens of 2x2 patches."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """`(B, N, 4C)` tokens back to `(B, C, h, w)` latents."""
        b, _, channels = packed.shape
        latents = packed.view(b, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, latent_height, latent_width)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of (width, height) pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode_conditions(self, images: Sequence[Sequence[Image.Image]]):
        """Packed condition latents `(B, N_cond, 4C)` and the VAE sizes of each source image.

        Every sample must have the same number of source images with the same VAE sizes (the
        engine groups requests so); returns `(None, [])` when there are no source images.
        """
        sizes = [self.vae_size(img) for img in images[0]] if images else []
        for sample in images[1:]:
            if [self.vae_size(img) for img in sample] != sizes:
                raise ValueError("a batch needs source images of the same count and sizes; group requests by shape")
        if not sizes:
            return None, []
        packed = [
            self.pack(self.encode_images([sample[j] for sample in images], w, h)) for j, (w, h) in enumerate(sizes)
        ]
        return torch.cat(packed, dim=1), sizes

    # ----- transformer -----------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        img_shapes: list[list[tuple[int, int, int]]],
        cond_latents: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity for packed target tokens `latents` (B, N, 4C); differentiable.

        `timestep` is the flow-matching sigma in [0, 1] (the pipelines' `t / 1000`), a float or
        one value per sample. Condition tokens are appended after the target tokens and their
        outputs dropped. All samples must share `img_shapes` (diffusers' RoPE uses the first).
        """
        args = (latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs)
        velocity = self._batch_split(self._predict_batch, *args) if self._batch_split else self._predict_batch(*args)
        for hook in self._velocity_hooks:
            velocity = hook(velocity)
        return velocity

    def _predict_batch(self, *args):
        """The velocity of a whole batch (this process's share of it under `with_cfg_parallel`)."""
        if self._split_lengths:
            from editkit.models.accel import predict_by_prompt_length

            return predict_by_prompt_length(self._predict_once, *args)
        return self._predict_once(*args)

    def _predict_once(self, latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents,
                      attention_kwargs):
        if any(shapes != img_shapes[0] for shapes in img_shapes):
            raise ValueError("all samples of a batch must share img_shapes; group requests by shape")
        batch, num_target = latents.shape[:2]
        hidden = latents if cond_latents is None else torch.cat([latents, cond_latents.to(latents.dtype)], dim=1)
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.as_tensor(timestep, device=latents.device).expand(batch)
        if prompt_mask is not None and bool(prompt_mask.all()):
            prompt_mask = None
        from editkit.models.rope_frames import applied

        with applied(self.transformer, self.rope_frames):
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep.to(device=latents.device, dtype=latents.dtype),
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=prompt_mask,
                img_shapes=img_shapes,
                attention_kwargs=attention_kwargs,
                return_dict=False,
                **self._transformer_inputs(batch, latents.device),
            )[0]
        return out[:, :num_target]

    def _transformer_inputs(self, batch: int, device) -> dict:
        """Extra transformer arguments of a family built on this code (none here)."""
        return {}

    # ----- whole requests --------------------------------------------------------------------

    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        width: int | None = None,
        height: int | None = None,
        negative_prompts: Sequence[str | None] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
    ) -> EditInputs:
        """Encode a batch of edits (prompts, their source images, negatives) for the sampler; the
        Qwen-Image-Edit models take no mask (`masks` is ignored; mask fusion is the engine's).

        The output size defaults to the family's rule applied to the first sample's images.
        A negative prompt of None means "no true CFG for this sample" ("" is a valid negative).
        """
        with torch.no_grad():
            width, height = self.output_size(images[0] if images else [], width, height)
            has_negative = [n is not None for n in negative_prompts] if negative_prompts else [False] * len(prompts)
            neg_embeds = neg_mask = None
            if any(has_negative):  # one VLM pass for prompts and negatives
                negatives = [n or "" for n in negative_prompts]
                both, both_mask = self.encode_prompt([*prompts, *negatives], [*images, *images])
                embeds, mask = _trim(both[: len(prompts)], both_mask[: len(prompts)])
                neg_embeds, neg_mask = _trim(both[len(prompts) :], both_mask[len(prompts) :])
            else:
                embeds, mask = self.encode_prompt(prompts, images)
            cond_latents, cond_sizes = self.encode_conditions(images)
            shapes = self.img_shapes(width, height, cond_sizes)
            return EditInputs(
                prompt_embeds=embeds,
                prompt_mask=mask,
                cond_latents=None if cond_latents is None else cond_latents.to(embeds.dtype),
                img_shapes=[shapes] * len(prompts),
                width=width,
                height=height,
                negative_embeds=neg_embeds,
                negative_mask=neg_mask,
                has_negative=has_negative,
            )


def _trim(embeds: torch.Tensor, mask: torch.Tensor):
    """Drop padding columns that no sample of the batch uses."""
    length = int(mask.sum(dim=1).max())
    return embeds[:, :length], mask[:, :length]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
