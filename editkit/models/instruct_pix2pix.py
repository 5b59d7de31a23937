"""The InstructPix2Pix family (InstructPix2Pix, MagicBrush): its facts and its `EditModel` facade.

Reproduces diffusers' `StableDiffusionInstructPix2PixPipeline` on batches: a Stable Diffusion 1.5
UNet whose 8 input channels are the noisy latents and the source image's VAE latents, a CLIP text
encoder, `AutoencoderKL`, and the folder's scheduler (the released checkpoints ship
`EulerAncestralDiscreteScheduler`). MagicBrush is a fine-tuned checkpoint of the same
architecture. editkit edits and evaluates with it; it does not train it (`trainable = False`).

How it maps onto the family interface:
- the facade's `transformer` is the UNet ("the trained network": LoRA adapters go there);
- latents are not packed into patches: "packed" latents are the scaled VAE latents `(B, 4, h, w)`
  with the grid flattened, `(B, 4, h * w)` (a view, so `editkit.infer.sampler.initial_noise` draws
  exactly the pipeline's `randn_tensor((1, 4, h, w))`, and the engine's per-token blends of packed
  latents work on them as on the Qwen tokens);
- the UNet predicts noise (epsilon), not a flow-matching velocity, so `predict` refuses (the LBM
  bridge and training need a velocity) and sampling runs in `sample_latents` (the pipeline's loop:
  init-noise scaling, `scale_model_input`, the 3-way guidance batch, the scheduler's step with
  per-sample generators);
- guidance: `cfg` is the text guidance scale, `image_cfg` the image guidance scale, combined as
  the pipeline does; `cfg <= 1` turns guidance off entirely (also the image guidance), as there;
- the output size is the source image's, rounded down to a multiple of 8 (the pipeline's image
  processor), unless `width` / `height` are given (the source is then resized to that size).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.errors import UserError
from editkit.models.family import VIEW_AREAS, EditInputs, SamplingDefaults, write_model_index
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")  # `editkit model info` reads a family's facts without torch

IP2P_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
}
"""The scheduler of the released timbrooks/instruct-pix2pix and MagicBrush folders (a folder's own
scheduler_config.json is what a loaded model uses)."""

IP2P_LORA_TARGETS = {"default": ("to_q", "to_k", "to_v", "to_out.0")}
"""The UNet's attention projections (self- and cross-attention), the usual SD LoRA targets."""

COMPONENT_FILES = {
    "unet": ("config.json", "*.safetensors*"),
    "vae": ("config.json", "*.safetensors*"),
    "text_encoder": ("config.json", "*.safetensors*"),
    "tokenizer": ("vocab.json|tokenizer.json", "merges.txt|tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
"""What each component folder of a diffusers InstructPix2Pix folder must hold (safety checker and
feature extractor, when present, are not used)."""

UNET_CLASS = "UNet2DConditionModel"
UNET_IN_CHANNELS = 8
"""4 noisy latent channels + 4 source-image latent channels."""


@dataclass(frozen=True)
class InstructPix2PixPreset:
    """The sizes of every network of one preset (the arguments of their diffusers / transformers classes)."""

    name: str
    unet: dict
    vae: dict
    text: dict
    """`CLIPTextConfig` arguments (token ids come from the tokenizer; the vocabulary is at least its size)."""
    view_area: int | None = None
    """Default output area when an edit has no source image (pixels; None: the family's)."""


TINY = InstructPix2PixPreset(
    name="tiny",
    unet=dict(sample_size=8, in_channels=UNET_IN_CHANNELS, out_channels=4, layers_per_block=1,
              block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              norm_num_groups=8),
    # 3 downsamplings (8x, as SD's VAE) and SD's scaling factor
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.18215),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    view_area=64 * 64,
)

FULL = InstructPix2PixPreset(
    name="full",
    # Stable Diffusion 1.5's UNet (860 M) with InstructPix2Pix's 8 input channels
    unet=dict(sample_size=64, in_channels=UNET_IN_CHANNELS, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    # the SD VAE (84 M)
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    # CLIP ViT-L/14's text encoder (123 M)
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu"),
)

PRESETS = {preset.name: preset for preset in (TINY, FULL)}


def build_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer built in memory: CLIP's 256 byte symbols and their end-of-word
    forms, no merges (every character is a token), `<|startoftext|>` and `<|endoftext|>`; CLIP's
    normaliser and pre-tokeniser, so `" "` reads as `""` as with the released tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@dataclass(frozen=True)
class InstructPix2PixFamily:
    """InstructPix2Pix-architecture checkpoints (timbrooks/instruct-pix2pix, MagicBrush)."""

    name: str = "instruct-pix2pix"
    pipeline_class: str = "StableDiffusionInstructPix2PixPipeline"
    description: str = ("InstructPix2Pix / MagicBrush: SD 1.5 UNet with the source latents as 4 extra input "
                        "channels, CLIP text encoder, text and image guidance")
    max_images: int | None = 1
    vlm_image_area: int = 512 * 512
    """Unused by this family (it has no VLM); kept so that every facade has the same views."""
    vae_image_area: int = 512 * 512
    """Unused: the source is encoded at the output size."""
    output_area: int = 512 * 512
    """The output area of an edit without a source image (the UNet's training resolution)."""
    scheduler: dict = field(default_factory=lambda: dict(IP2P_SCHEDULER))
    lora_targets: dict = field(default_factory=lambda: dict(IP2P_LORA_TARGETS))
    component_files: dict = field(default_factory=lambda: dict(COMPONENT_FILES))
    sampling: SamplingDefaults = SamplingDefaults(steps=100, cfg=7.5, image_cfg=1.5)
    """The pipeline's defaults (100 steps, as in the paper; text guidance 7.5, image guidance 1.5)."""
    trainable: bool = False
    image_mode: str = "RGB"

    def unused_modules(self, transformer) -> list[str]:
        return []

    # ----- folders ---------------------------------------------------------------------------

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """The pipeline class of model_index.json, or a UNet config with 8 input channels (a
        `--transformer` UNet folder)."""
        if model_index.get("_class_name") == self.pipeline_class:
            return True
        return _is_ip2p_unet(transformer_config)

    def check_transformer(self, transformer_config: dict) -> None:
        """A network config handed in (`--transformer`) must be an 8-channel UNet; a folder's own
        unet/ is read by `load_folder` (an empty config: nothing to check here)."""
        if transformer_config and not _is_ip2p_unet(transformer_config):
            found = transformer_config.get("_class_name", "an unknown class")
            raise UserError(f"family {self.name} needs a {UNET_CLASS} with in_channels={UNET_IN_CHANNELS}, but the "
                            f"config.json is {found} with in_channels={transformer_config.get('in_channels')}; pass "
                            "the unet/ folder of an InstructPix2Pix checkpoint (or the right --family)")

    def load_transformer(self, folder: Path, torch_dtype, device=None):
        """The UNet of a component folder, on the CPU, or read straight onto `device`."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                                    **_device_map(device))
        self.check_transformer(dict(unet.config, _class_name=UNET_CLASS))
        return unet

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int], device=None):
        """A diffusers InstructPix2Pix folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) as a
        facade; the UNet comes from `transformer_dir` when that is a component folder (`--transformer`),
        else from unet/."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        unet_dir = transformer_dir if (transformer_dir / "config.json").is_file() else root / "unet"
        self.check_transformer(_read_config(unet_dir / "config.json"))
        scheduler = load_scheduler(root / "scheduler")  # the cheap parts first: their errors come before any load
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        placed = _device_map(device)
        return InstructPix2PixModel(
            self,
            unet=self.load_transformer(unet_dir, torch_dtype, device),
            vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch_dtype, local_files_only=True, **placed),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch_dtype,
                                                       local_files_only=True, **placed),
            tokenizer=tokenizer,
            scheduler=scheduler,
            **areas,
        )

    def build_tiny(self, seed: int = 0, areas: dict[str, int] | None = None):
        """The tiny preset: SD's architectures at toy widths, seeded, on the CPU in float32."""
        return self.build_preset("tiny", seed=seed, areas=areas)

    def build_preset(self, preset: str = "tiny", seed: int = 0, areas: dict[str, int] | None = None, device=None,
                     dtype=None):
        """A model of a preset of `PRESETS` ("tiny", "full") with seeded random weights, created on
        `device` in `dtype` (default: the CPU, float32); the global RNG is left as it was."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from editkit.models.presets import _created_on, _forked_rng

        if preset not in PRESETS:
            raise UserError(f"unknown model preset {preset!r} for {self.name}; use one of {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        tokenizer = build_tokenizer(spec.text["max_position_embeddings"])
        with _forked_rng(device), _created_on(device, dtype):
            torch.manual_seed(seed)
            text = {**spec.text, "vocab_size": max(spec.text.get("vocab_size", 0), len(tokenizer)),
                    "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id}
            text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
            vae = AutoencoderKL(**copy.deepcopy(spec.vae)).eval()
            unet = UNet2DConditionModel(**copy.deepcopy(spec.unet)).eval()
        view = {key: spec.view_area for key in VIEW_AREAS} if spec.view_area else {}
        return InstructPix2PixModel(self, unet, vae, text_encoder, tokenizer, scheduler_from_config(self.scheduler),
                                    **{**view, **(areas or {})})

    def write_folder(self, model: InstructPix2PixModel, out: Path, extra: dict | None = None) -> None:
        """Write the model as a diffusers folder that `StableDiffusionInstructPix2PixPipeline.from_pretrained`
        and `load_folder` read (no safety checker); `extra` adds `_editkit_<key>` entries to model_index.json."""
        model.unet.save_pretrained(out / "unet")
        model.vae.save_pretrained(out / "vae")
        model.text_encoder.save_pretrained(out / "text_encoder")
        model.tokenizer.save_pretrained(out / "tokenizer")
        model.scheduler.save_pretrained(out / "scheduler")
        write_model_index(self, model, out, self.components(type(model.scheduler).__name__), extra)

    def components(self, scheduler_class: str) -> dict:
        """The model_index.json components of a folder of this family, as diffusers writes them for
        the pipeline without a safety checker."""
        return {
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", UNET_CLASS],
            "vae": ["diffusers", "AutoencoderKL"],
        }


FAMILIES = (InstructPix2PixFamily(),)
"""Registered in editkit.models.families."""


def _is_ip2p_unet(config: dict) -> bool:
    return config.get("_class_name") == UNET_CLASS and config.get("in_channels") == UNET_IN_CHANNELS


def _read_config(path: Path) -> dict:
    """A component's config.json (`load_model` has checked that it parses)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _device_map(device) -> dict:
    """`from_pretrained` keyword arguments that load onto `device` (none: the CPU)."""
    return {} if device is None else {"device_map": str(torch.device(device))}


def scheduler_from_config(config: dict):
    """The diffusers scheduler its config's `_class_name` names (EulerAncestral when absent)."""
    import diffusers
    from diffusers import SchedulerMixin

    name = config.get("_class_name", IP2P_SCHEDULER["_class_name"])
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"scheduler class {name!r} is not a diffusers scheduler; fix scheduler_config.json's "
                        "_class_name (e.g. EulerAncestralDiscreteScheduler)")
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def load_scheduler(folder: Path):
    """The scheduler of a folder's scheduler/ (its class from scheduler_config.json)."""
    path = folder / "scheduler_config.json"
    try:
        return scheduler_from_config(_read_config(path))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


class InstructPix2PixModel:
    """UNet + VAE + CLIP text encoder of an InstructPix2Pix checkpoint, sampling as its pipeline does."""

    def __init__(self, family: InstructPix2PixFamily, unet, vae, text_encoder, tokenizer, scheduler,
                 vlm_image_area: int | None = None, vae_image_area: int | None = None,
                 output_area: int | None = None):
        from diffusers.image_processor import VaeImageProcessor

        self.family = family
        self.transformer = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vlm_image_area = vlm_image_area or family.vlm_image_area
        self.vae_image_area = vae_image_area or family.vae_image_area
        self.output_area = output_area or family.output_area
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        first = next(unet.parameters())
        self.device: torch.device = first.device
        """Execution device: where inputs, noise and prompts are made."""
        self.dtype: torch.dtype = first.dtype
        """Compute dtype of embeddings and latents."""
        self._velocity_hooks: tuple = ()
        self._batch_split = None

    @property
    def unet(self):
        """The UNet (the facade's `transformer`, named as diffusers names it)."""
        return self.transformer

    # ----- derived views ---------------------------------------------------------------------

    def with_transformer(self, transformer) -> InstructPix2PixModel:
        """The same model running another UNet module (e.g. a wrapped one), sharing every other part."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def without_encoders(self) -> InstructPix2PixModel:
        """The same model without the text encoder and VAE (their memory is freed once the caller
        drops the full model)."""
        view = copy.copy(self)
        view.text_encoder = view.vae = None
        return view

    def with_velocity_hook(self, hook) -> InstructPix2PixModel:
        """The same model with the engine's latent-mask fusion: `hook(velocity)` blends a flow-matching
        velocity with the source's (`noise - source`) outside the mask. This sampler predicts noise,
        not velocities, so `sample_latents` reads the blend's weight and background from the (affine)
        hook and keeps the latents outside the mask on the source's noising path instead (see
        `_background_keeper`)."""
        view = copy.copy(self)
        view._velocity_hooks = (*self._velocity_hooks, hook)
        return view

    def with_scheduler(self, config) -> InstructPix2PixModel:
        """The same model sampling with another scheduler config (its `_class_name`, else this
        model's scheduler class), sharing the weights."""
        view = copy.copy(self)
        config = dict(config)
        view.scheduler = (scheduler_from_config(config) if "_class_name" in config
                          else type(self.scheduler).from_config(config))
        return view

    def with_cfg_parallel(self, split) -> InstructPix2PixModel:
        """The same model whose UNet batch is shared between processes by `split(predict, *args)`
        (editkit.infer.parallel.CfgParallel; the 3-way guidance batch runs whole unless it divides)."""
        view = copy.copy(self)
        view._batch_split = split
        return view

    @contextlib.contextmanager
    def denoising(self):
        """One sampling run (the UNet keeps no step caches: nothing to reset)."""
        yield

    def split_prompt_lengths(self, enabled: bool = True) -> None:
        """A no-op: CLIP prompts are always padded to the tokenizer's 77 tokens and never masked."""

    # ----- placement -------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks held now by component name (no text encoder and VAE after `without_encoders`)."""
        parts = {"unet": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}
        return {name: module for name, module in parts.items() if module is not None}

    def to(self, device=None, dtype=None) -> InstructPix2PixModel:
        """Move and cast the networks; `device` / `dtype` are where and in what inputs are made."""
        for module in self.modules().values():
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Output sides are multiples of the VAE's downsampling (8)."""
        return self.vae_scale_factor

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): the source image's size (one side given: the other follows its
        aspect), rounded down to a multiple of 8 as the pipeline's image processor does; without a
        source, the output area's square."""
        if images:
            src_w, src_h = images[0].size
            if width is None and height is None:
                width, height = src_w, src_h
            elif height is None:
                height = round(width * src_h / src_w)
            elif width is None:
                width = round(height * src_w / src_h)
        else:
            side = int(math.sqrt(self.output_area))
            width, height = width or side, height or side
        m = self.size_multiple
        return max(m, width // m * m), max(m, height // m * m)

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which a source is encoded by default: the output size it gives."""
        return self.output_size([image])

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of (width, height) pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]):
        """The latent grids of one sample (target, then the source image), in latent units."""
        f = self.vae_scale_factor
        return [(1, height // f, width // f), *[(1, h // f, w // f) for w, h in cond_sizes]]

    # ----- prompt ----------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """CLIP embeddings of instructions (`images` are not part of the text condition).

        Returns `(embeds (B, 77, D), mask (B, 77))`: the last hidden state of the prompts padded to
        the tokenizer's length, as the pipeline encodes them; the mask marks the text tokens
        (the UNet attends to all 77, as in the pipeline).
        """
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        uses_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask if uses_mask else None)[0]
        return embeds.to(self.dtype), mask.long()

    # ----- latents ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 3, H, W) tensor in [-1, 1] (the pipeline's processor)."""
        return torch.cat([self.image_processor.preprocess(_rgb(img), height, width) for img in images])

    def image_latents(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """The UNet's image condition: the VAE's mode of the sources at (width, height), unscaled (as
        the pipeline's `prepare_image_latents`)."""
        pixels = self.preprocess(images, width, height).to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode()

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The denoising space's latents `(B, 4, h, w)` of pixels in [-1, 1]: the VAE's mode times its
        scaling factor (what `decode_latents` inverts)."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_images(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Denoising-space latents of PIL images resized to (width, height)."""
        return self.encode_latents(self.preprocess(images, width, height))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in about [-1, 1] from denoising-space latents (the pipeline's decode)."""
        shift = self.vae.config.get("shift_factor") or 0.0
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents, return_dict=False)[0]

    def decode_packed(self, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return self.decode_latents(self.unpack(packed, *self.latent_size(width, height)))

    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]:
        """PIL images from decoded pixels (the pipeline's postprocessing)."""
        return self.image_processor.postprocess(pixels, output_type="pil")

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents as `(B, C, h * w)`: the grid flattened, a view (no patches)."""
        return latents.flatten(2)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """`(B, C, h * w)` back to the `(B, C, h, w)` grid (`pack`'s inverse, a view)."""
        return packed.unflatten(2, (latent_height, latent_width))

    def encode_conditions(self, images: Sequence[Sequence[Image.Image]]):
        """The image condition `(B, 4, h, w)` of each sample's one source at its default size, and that
        size (`(None, [])` without images)."""
        sources = _single_sources(self.family, images)
        if not sources:
            return None, []
        sizes = {self.vae_size(img) for img in sources}
        if len(sizes) != 1:
            raise ValueError("a batch needs source images of one size; group requests by shape")
        (size,) = sizes
        return self.image_latents(sources, *size), [size]

    # ----- the network -----------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        img_shapes: list,
        cond_latents: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """This family has no flow-matching velocity (its UNet predicts the noise for its own
        scheduler, inside `sample_latents`), so what calls `predict` — the LBM bridge sampler and
        training — is a UserError."""
        raise UserError(f"family {self.family.name} predicts noise for its own scheduler, not a flow-matching "
                        "velocity: edit with --sampler flow (the bridge sampler and training need a flow-matching "
                        "family such as qwen-image-edit-2511)")

    def _noise_batch(self, *args):
        """The UNet's noise prediction for scheduler-scaled latents `(B, 4, h, w)` with the image
        condition stacked on the channels, at the scheduler's timestep `t`, for a whole batch (this
        process's share under `with_cfg_parallel`); the arguments are `predict`'s (`prompt_mask` and
        `img_shapes` unused: the pipeline attends to every CLIP token)."""
        return self._batch_split(self._noise_once, *args) if self._batch_split else self._noise_once(*args)

    def _noise_once(self, latents, t, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs):
        hidden = torch.cat([latents, cond_latents.to(latents.dtype)], dim=1)
        return self.transformer(hidden, t, encoder_hidden_states=prompt_embeds,
                                cross_attention_kwargs=attention_kwargs, return_dict=False)[0]

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
        """Encode a batch of edits: prompts and negatives (None: "", the pipeline's unconditional text)
        with CLIP, each sample's one source image at the output size with the VAE (`cond_latents`).
        The model takes no mask (`masks` is ignored; mask fusion is the engine's)."""
        sources = _single_sources(self.family, images)
        if len(sources) != len(prompts):
            raise UserError(f"family {self.family.name} edits one source image per instruction; give each "
                            "edit exactly one image (--image)")
        with torch.no_grad():
            width, height = self.output_size(sources[:1], width, height)
            negatives = [n or "" for n in negative_prompts] if negative_prompts else [""] * len(prompts)
            both, both_mask = self.encode_prompt([*prompts, *negatives])
            count = len(prompts)
            cond = self.image_latents(sources, width, height).to(both.dtype)
            shapes = self.img_shapes(width, height, [(width, height)])
            return EditInputs(
                prompt_embeds=both[:count],
                prompt_mask=both_mask[:count],
                cond_latents=cond,
                img_shapes=[shapes] * count,
                width=width,
                height=height,
                negative_embeds=both[count:],
                negative_mask=both_mask[count:],
                has_negative=[n is not None for n in negative_prompts] if negative_prompts else [False] * count,
            )

    def sample_latents(self, inputs: EditInputs, steps: int, cfg: Sequence[float], seeds: Sequence[int],
                       latents: torch.Tensor, callback=None, attention_kwargs: dict | None = None,
                       image_cfg: Sequence[float | None] | None = None) -> torch.Tensor:
        """Denoise packed `latents` (standard normal, drawn per seed) as the pipeline does; returns
        packed latents.

        Sample i is guided when `cfg[i] > 1` (and its image guidance >= 1): the UNet sees the batch
        [text + image, negative + image, negative + no image] and the noise is
        `uncond + cfg (text - image) + image_cfg (image - uncond)`; otherwise the text + image pass
        alone. Every sample has its own CPU generator seeded `seeds[i]`, advanced past its initial
        noise, for the scheduler's ancestral noise: a request samples the same alone or in a batch,
        and a batch of one equals the pipeline with `generator=torch.Generator("cpu").manual_seed(seed)`.
        """
        from diffusers.utils.torch_utils import randn_tensor

        batch = inputs.batch_size
        default_image = self.family.sampling.image_cfg
        image_scales = [default_image if s is None else float(s) for s in (image_cfg or [None] * batch)]
        text_scales = [float(s) for s in cfg]
        use = [t > 1.0 and i >= 1.0 for t, i in zip(text_scales, image_scales)]  # the pipeline's rule
        latents = self.unpack(latents, *self.latent_size(inputs.width, inputs.height))
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        for generator in generators:  # the pipeline's generator has drawn the initial noise first (on the CPU)
            randn_tensor((1, *latents.shape[1:]), generator=generator, device=torch.device("cpu"), dtype=latents.dtype)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        step_kwargs = _step_kwargs(scheduler, generators)
        noise, x = latents, latents * scheduler.init_noise_sigma
        guided = any(use)
        if guided:
            embeds = torch.cat([inputs.prompt_embeds, inputs.negative_embeds, inputs.negative_embeds])
            cond = torch.cat([inputs.cond_latents, inputs.cond_latents, torch.zeros_like(inputs.cond_latents)])
            shapes = inputs.img_shapes * 3
            text_scale, image_scale = _scale(text_scales, x), _scale(image_scales, x)
            chosen = torch.as_tensor(use, device=x.device).view(-1, 1, 1, 1)
        else:
            embeds, cond, shapes = inputs.prompt_embeds, inputs.cond_latents, inputs.img_shapes
        keep_background = self._background_keeper(noise, scheduler)
        timesteps = scheduler.timesteps
        with torch.no_grad(), self.denoising():
            for i, t in enumerate(timesteps):
                model_in = scheduler.scale_model_input(torch.cat([x] * 3) if guided else x, t)
                pred = self._noise_batch(model_in, t, embeds, None, shapes, cond, attention_kwargs)
                if guided:
                    pred_text, pred_image, pred_uncond = pred.chunk(3)
                    combined = (pred_uncond + text_scale * (pred_text - pred_image)
                                + image_scale * (pred_image - pred_uncond))
                    pred = combined if all(use) else torch.where(chosen, combined, pred_text)
                x = scheduler.step(pred, t, x, **step_kwargs, return_dict=False)[0]
                if keep_background is not None:
                    x = keep_background(x, timesteps[i + 1] if i + 1 < len(timesteps) else None)
                if callback is not None:
                    callback(max(1, (i + 1) * steps // len(timesteps)), steps)
        return self.pack(x)

    def _background_keeper(self, noise: torch.Tensor, scheduler):
        """For latent-mask fusion (velocity hooks): a function `(latents, next_timestep) -> latents`
        that puts the latents outside the mask back on the source's noising path after each step.

        The engine's hook is the blend `h(v) = w v + (1 - w) (noise - source)` (w: the mask on the
        latent grid); composed hooks stay affine, so `w = h(1) - h(0)` and `(1 - w) source =
        (1 - w) noise - h(0)`. After each step the latents become `w x + (1 - w) add_noise(source,
        noise, t_next)` (the scheduler's own noising, linear in its inputs; the source itself after
        the last step), as diffusers' Stable Diffusion inpainting does with a plain UNet: the
        background ends exactly on the source's latents, the edit region is the model's.
        """
        if not self._velocity_hooks:
            return None

        def hook(v):  # on packed latents, as the engine's hooks are written
            packed = self.pack(v)
            for h in self._velocity_hooks:
                packed = h(packed)
            return self.unpack(packed, *v.shape[-2:])

        at_zero = hook(torch.zeros_like(noise))
        weight = hook(torch.ones_like(noise)) - at_zero
        keep = 1.0 - weight
        kept_source = keep * noise - at_zero  # (1 - w) * source
        kept_noise = keep * noise

        def keep_background(x, next_t):
            if next_t is None:
                return weight * x + kept_source
            noised = scheduler.add_noise(kept_source, kept_noise, next_t.reshape(1))
            return weight * x + noised.to(x.dtype)

        return keep_background


def _scale(values: list[float], like: torch.Tensor):
    """One guidance scale as a Python float (the pipeline's arithmetic), or one per sample."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _step_kwargs(scheduler, generators: list) -> dict:
    """`eta` and the per-sample generators for schedulers whose `step` takes them (the pipeline's
    `prepare_extra_step_kwargs`, with one generator per sample)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def _single_sources(family: InstructPix2PixFamily, images: Sequence[Sequence[Image.Image]]) -> list:
    """Each sample's one source image; a UserError for a sample with another count."""
    if any(len(sample) > 1 for sample in images):
        raise UserError(f"family {family.name} takes at most {family.max_images} source image, got "
                        f"{max(len(s) for s in images)}; pass one image per edit")
    return [sample[0] for sample in images if sample]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
