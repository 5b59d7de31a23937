"""The FLUX.1 Fill family (FLUX.1-Fill-dev): its facts and its `EditModel` facade.

Reproduces diffusers' `FluxFillPipeline` on batches: a `FluxTransformer2DModel` whose 384 input
channels per token are the noisy latents (16 VAE channels x 2x2 patch = 64), the masked image's
latents (64) and the mask (the 8x8 pixels under each latent, x 2x2 patch = 256); T5 (the token
embeddings, 512 tokens) and CLIP (the pooled embedding) text encoders; the 16-channel
`AutoencoderKL` with its shift and scaling factors; `FlowMatchEulerDiscreteScheduler` with the
resolution-dependent shift; and guidance embedded in the transformer (guidance-distilled: no
negative pass). editkit edits and evaluates with it; it does not train it (`trainable = False`).

How it maps onto the family interface:
- every edit fills a mask (white = the region to repaint): `sampling.needs_mask`, and `prepare`
  receives the requests' masks; a whole-image white mask repaints everything;
- the guidance scale (`--cfg`, default 30) is the embedded guidance value, one per sample;
- `sample_latents` runs the pipeline's loop: sigmas `linspace(1, 1/N, N)`, mu from the image
  token count, the latent image ids, `t / 1000`, the masked image's latents sampled from the VAE
  posterior. The pipeline's generator draws the initial noise, then the masked image's VAE sample;
  editkit does the same with one CPU generator per sample (seeded with the request's seed), so a
  batch of one equals the pipeline called with `latents=` that noise and the same generator after
  it, and every request samples the same alone or in a batch;
- the network needs the pooled CLIP embedding and the guidance value besides `predict`'s
  arguments, so `predict` refuses (the LBM bridge and training need it), while the engine's
  velocity hooks (latent-mask fusion) run on the flow-matching velocity inside `sample_latents`;
- the output size is the source's aspect at the output area (1024x1024 pixels by default; the
  pipeline's own default is a 1024x1024 square whatever the source), sides multiples of 16.

The facade also serves layouts whose denoised canvas is wider than the output (ACE++, see
`editkit.models.ace_plus`): the output is then the canvas's right-hand part, which is all the
engine sees of it (initial noise, velocity hooks, decoding).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.data.images import fit_area
from editkit.errors import UserError
from editkit.models.family import EditInputs, SamplingDefaults, write_model_index
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")  # `editkit model info` reads a family's facts without torch

FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""`FlowMatchEulerDiscreteScheduler` config of the released FLUX.1-Fill-dev (and FLUX.1-dev) snapshots."""

FLUX_LORA_TARGETS = {
    "default": ("to_q", "to_k", "to_v", "to_out.0", "single_transformer_blocks.*.proj_out"),
    # the modules ACE++'s LoRAs adapt (its double blocks' qkv, proj, mlp and modulation; its single
    # blocks' linear1, linear2 and modulation), in diffusers' names
    "ace-plus": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "norm1_context.linear", "proj_mlp", "single_transformer_blocks.*.proj_out",
                 "single_transformer_blocks.*.norm.linear"),
}
"""Named LoRA target presets of the Flux transformer (attention projections; the single blocks' output)."""

COMPONENT_FILES = {
    "transformer": ("config.json", "*.safetensors*"),
    "vae": ("config.json", "*.safetensors*"),
    "text_encoder": ("config.json", "*.safetensors*"),
    "text_encoder_2": ("config.json", "*.safetensors*"),
    "tokenizer": ("vocab.json|tokenizer.json", "merges.txt|tokenizer.json"),
    "tokenizer_2": ("tokenizer_config.json", "tokenizer.json|spiece.model"),
    "scheduler": ("scheduler_config.json",),
}
"""What each component folder of a diffusers FLUX.1-Fill folder must hold (CLIP in text_encoder/,
T5 in text_encoder_2/, as diffusers lays it out)."""

TRANSFORMER_CLASS = "FluxTransformer2DModel"
MASK_CHANNELS = 4 * 8 * 8
"""The mask's channels per token: the 8x8 pixels under a latent of the 8x VAE, x 2x2 patch."""
T5_SPARE_IDS = 28
"""Embedding rows past the tokenizer's vocabulary, as T5-XXL has (32128 rows, 32100 tokens): room
for added tokens such as ACE++'s `{image}`."""


@dataclass(frozen=True)
class FluxFillPreset:
    """The sizes of every network of one preset (the arguments of their diffusers / transformers classes)."""

    name: str
    transformer: dict
    vae: dict
    t5: dict
    """`T5Config` arguments of the T5 encoder (the vocabulary is at least the tokenizer's + `T5_SPARE_IDS`)."""
    clip: dict
    """`CLIPTextConfig` arguments (token ids come from the tokenizer)."""
    view_area: int | None = None
    """The output area of a model of this preset (pixels; None: the family's)."""


FULL = FluxFillPreset(
    name="full",
    # FLUX.1-Fill-dev: 19 double + 38 single blocks, 3072 wide, 384 input channels, guidance embedded (11.9 B)
    transformer=dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    # the FLUX VAE (84 M): 16 latent channels, no quant convs
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
    # T5-v1.1-XXL's encoder (4.8 B)
    t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False),
    # CLIP ViT-L/14's text encoder (123 M)
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu"),
)

TINY = FluxFillPreset(
    name="tiny",
    # the fill layout kept: 16 latent channels and an 8x VAE give 64 + 64 + 256 = 384 input channels
    transformer=dict(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                     guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            tie_word_embeddings=False),
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    view_area=64 * 64,
)

PRESETS = {preset.name: preset for preset in (TINY, FULL)}


def build_t5_tokenizer():
    """A character-level T5 tokenizer built in memory: a Unigram model over printable ASCII (each
    character, and each with the word-start marker `▁`), T5's `<pad>`/`</s>`/`<unk>` ids 0/1/2 and
    its 100 sentinel tokens, T5's pre-tokenizer and `</s>` post-processor (what `T5TokenizerFast`
    builds from a sentencepiece model)."""
    import string

    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=100)


def build_clip_tokenizer(max_length: int = 77):
    """CLIP's byte-level tokenizer built in memory (the InstructPix2Pix family's: one concept, one place)."""
    from editkit.models.instruct_pix2pix import build_tokenizer

    return build_tokenizer(max_length)


@dataclass(frozen=True)
class FluxFillFamily:
    """FLUX.1-Fill-architecture checkpoints (black-forest-labs/FLUX.1-Fill-dev)."""

    name: str = "flux-fill"
    pipeline_class: str = "FluxFillPipeline"
    description: str = ("FLUX.1 Fill: fills a masked region (384-channel fill input), T5 + CLIP text encoders, "
                        "guidance embedded (30)")
    max_images: int | None = 1
    vlm_image_area: int = 1024 * 1024
    """Unused by this family (it has no VLM); kept so that every facade has the same views."""
    vae_image_area: int = 1024 * 1024
    """Unused: the source is encoded at the output size."""
    output_area: int = 1024 * 1024
    """The output area at the source's aspect (pixels)."""
    scheduler: dict = field(default_factory=lambda: dict(FLUX_SCHEDULER))
    lora_targets: dict = field(default_factory=lambda: dict(FLUX_LORA_TARGETS))
    component_files: dict = field(default_factory=lambda: dict(COMPONENT_FILES))
    sampling: SamplingDefaults = SamplingDefaults(steps=50, cfg=30.0, needs_mask=True)
    """The model card's and pipeline's defaults: 50 steps, guidance 30; every edit fills a mask."""
    trainable: bool = False
    image_mode: str = "RGB"
    max_sequence_length: int = 512
    """T5 tokens per prompt (the pipeline pads every prompt to them)."""
    t5_special_tokens: tuple[str, ...] = ()
    """Tokens the T5 tokenizer keeps whole (special tokens added at load time; ACE++'s `{image}`)."""
    seam_trim: int = 0
    """Pixels cut off the output's left edge (then resized back) when it is part of a wider canvas."""

    def facade(self):
        """The `EditModel` class of this family."""
        return FluxFillModel

    def unused_modules(self, transformer) -> list[str]:
        return []  # the text stream runs on through the single blocks: every module's output is used

    # ----- folders ---------------------------------------------------------------------------

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """The pipeline class of model_index.json, or a Flux transformer config with the fill input
        (a `--transformer` folder)."""
        if model_index.get("_class_name") == self.pipeline_class:
            return True
        return _fill_transformer_problem(transformer_config) is None

    def check_transformer(self, transformer_config: dict) -> None:
        """A transformer config must be a Flux transformer with the fill input and embedded guidance
        (an empty config: nothing to check)."""
        problem = _fill_transformer_problem(transformer_config) if transformer_config else None
        if problem:
            raise UserError(f"family {self.name} needs a {TRANSFORMER_CLASS} with the fill input (384 input "
                            f"channels: 64 latent + 64 masked-image + 256 mask) and embedded guidance, but its "
                            f"config.json has {problem}; pass the transformer/ of FLUX.1-Fill-dev (or the right "
                            "--family)")

    def load_transformer(self, folder: Path, torch_dtype, device=None):
        """The transformer of a component folder, on the CPU, or read straight onto `device`."""
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                                      **_device_map(device))

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int], device=None):
        """A diffusers FLUX.1-Fill folder (transformer/, vae/, text_encoder/ = CLIP, text_encoder_2/ = T5,
        tokenizer/, tokenizer_2/, scheduler/) as a facade, the transformer from `transformer_dir`."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.check_transformer(_read_config(transformer_dir / "config.json"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        tokenizer_2 = T5TokenizerFast.from_pretrained(root / "tokenizer_2", local_files_only=True)
        placed = _device_map(device)
        return self.facade()(
            self,
            transformer=self.load_transformer(transformer_dir, torch_dtype, device),
            vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch_dtype, local_files_only=True, **placed),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch_dtype,
                                                       local_files_only=True, **placed),
            text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=torch_dtype,
                                                          local_files_only=True, **placed),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            scheduler=scheduler,
            **areas,
        )

    def build_tiny(self, seed: int = 0, areas: dict[str, int] | None = None):
        """The tiny preset: FLUX's architectures at toy widths (the 384-channel fill input kept), seeded,
        on the CPU in float32."""
        return self.build_preset("tiny", seed=seed, areas=areas)

    def build_preset(self, preset: str = "tiny", seed: int = 0, areas: dict[str, int] | None = None, device=None,
                     dtype=None):
        """A model of a preset of `PRESETS` ("tiny", "full") with seeded random weights, created on
        `device` in `dtype` (default: the CPU, float32); the global RNG is left as it was. The
        tokenizers are built in memory for every preset (the full preset's networks are the released
        sizes; its token ids are not the released tokenizers')."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from editkit.models.presets import _created_on, _forked_rng

        if preset not in PRESETS:
            raise UserError(f"unknown model preset {preset!r} for {self.name}; use one of {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        tokenizer = build_clip_tokenizer(spec.clip["max_position_embeddings"])
        tokenizer_2 = build_t5_tokenizer()
        with _forked_rng(device), _created_on(device, dtype):
            torch.manual_seed(seed)
            clip = {**spec.clip, "vocab_size": max(spec.clip.get("vocab_size", 0), len(tokenizer)),
                    "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id}
            text_encoder = CLIPTextModel(CLIPTextConfig(**clip)).eval()
            t5 = {**spec.t5, "vocab_size": max(spec.t5.get("vocab_size", 0), len(tokenizer_2) + T5_SPARE_IDS),
                  "pad_token_id": tokenizer_2.pad_token_id, "eos_token_id": tokenizer_2.eos_token_id,
                  "decoder_start_token_id": tokenizer_2.pad_token_id}
            text_encoder_2 = T5EncoderModel(T5Config(**t5)).eval()
            vae = AutoencoderKL(**copy.deepcopy(spec.vae)).eval()
            transformer = FluxTransformer2DModel(**copy.deepcopy(spec.transformer)).eval()
        view = {"output_area": spec.view_area} if spec.view_area else {}
        return self.facade()(self, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                             FlowMatchEulerDiscreteScheduler(**self.scheduler), **{**view, **(areas or {})})

    def write_folder(self, model: FluxFillModel, out: Path, extra: dict | None = None) -> None:
        """Write the model as a diffusers folder that `FluxFillPipeline.from_pretrained` and `load_folder`
        read; `extra` adds `_editkit_<key>` entries to model_index.json."""
        model.transformer.save_pretrained(out / "transformer")
        model.vae.save_pretrained(out / "vae")
        model.text_encoder.save_pretrained(out / "text_encoder")
        model.text_encoder_2.save_pretrained(out / "text_encoder_2")
        model.tokenizer.save_pretrained(out / "tokenizer")
        model.tokenizer_2.save_pretrained(out / "tokenizer_2")
        model.scheduler.save_pretrained(out / "scheduler")
        write_model_index(self, model, out, self.components(), extra)

    def components(self) -> dict:
        """The model_index.json components of a folder of this family, as diffusers writes them."""
        return {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", TRANSFORMER_CLASS],
            "vae": ["diffusers", "AutoencoderKL"],
        }


FAMILIES = (FluxFillFamily(),)
"""Registered in editkit.models.families."""


def _fill_transformer_problem(config: dict) -> str | None:
    """What keeps a transformer config from being a Flux Fill one (None: nothing)."""
    if config.get("_class_name") != TRANSFORMER_CLASS:
        return f"_class_name {config.get('_class_name')!r}"
    channels, out = config.get("in_channels"), config.get("out_channels") or config.get("in_channels")
    if channels != 2 * out + MASK_CHANNELS:
        if channels == 448:
            return "in_channels 448 (ACE++'s FFT model, which editkit does not run)"
        return f"in_channels {channels} with out_channels {out}"
    if not config.get("guidance_embeds"):
        return "guidance_embeds false"
    return None


def _read_config(path: Path) -> dict:
    """A component's config.json (`load_model` has checked that it parses)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _device_map(device) -> dict:
    """`from_pretrained` keyword arguments that load onto `device` (none: the CPU)."""
    return {} if device is None else {"device_map": str(torch.device(device))}


@dataclass
class FillLayout:
    """What the fill input of one batch is made from: the masked pixels of the canvas the model
    denoises, in [-1, 1], and the mask over it (1 = fill), both at the canvas size."""

    masked_pixels: torch.Tensor
    """(B, 3, H, W)."""
    mask: torch.Tensor
    """(B, 1, H, W) in {0, 1}."""


class FluxFillModel:
    """Transformer + VAE + CLIP and T5 text encoders of a FLUX.1-Fill checkpoint, sampling as its pipeline does."""

    def __init__(self, family: FluxFillFamily, transformer, vae, text_encoder, text_encoder_2, tokenizer,
                 tokenizer_2, scheduler, vlm_image_area: int | None = None, vae_image_area: int | None = None,
                 output_area: int | None = None):
        from diffusers.image_processor import VaeImageProcessor

        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        missing = [t for t in family.t5_special_tokens if t not in tokenizer_2.get_vocab()]
        if missing:  # as ACE++ loads its T5 tokenizer: `additional_special_tokens=["{image}"]`
            tokenizer_2.add_special_tokens({"additional_special_tokens": missing},
                                           replace_extra_special_tokens=False)
        self.scheduler = scheduler
        self.vlm_image_area = vlm_image_area or family.vlm_image_area
        self.vae_image_area = vae_image_area or family.vae_image_area
        self.output_area = output_area or family.output_area
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        # the pipeline's two processors: images to [-1, 1]; masks to one binarised channel
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2,
                                                 vae_latent_channels=self.latent_channels)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2,
                                                vae_latent_channels=self.latent_channels, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        first = next(transformer.parameters())
        self.device: torch.device = first.device
        """Execution device: where inputs, noise and prompts are made."""
        self.dtype: torch.dtype = first.dtype
        """Compute dtype of embeddings and latents."""
        self._velocity_hooks: tuple = ()
        self._batch_split = None

    # ----- derived views ---------------------------------------------------------------------

    def with_transformer(self, transformer) -> FluxFillModel:
        """The same model running another transformer module, sharing every other part."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def without_encoders(self) -> FluxFillModel:
        """The same model without the text encoders and the VAE (their memory is freed once the
        caller drops the full model)."""
        view = copy.copy(self)
        view.text_encoder = view.text_encoder_2 = view.vae = None
        return view

    def with_velocity_hook(self, hook) -> FluxFillModel:
        """The same model whose flow-matching velocity passes through `hook(velocity) -> velocity` at
        every step of `sample_latents` (the engine's latent-mask fusion), on the output's tokens."""
        view = copy.copy(self)
        view._velocity_hooks = (*self._velocity_hooks, hook)
        return view

    def with_scheduler(self, config) -> FluxFillModel:
        """The same model sampling with another `FlowMatchEulerDiscreteScheduler` config."""
        view = copy.copy(self)
        view.scheduler = type(self.scheduler).from_config(dict(config))
        return view

    def with_cfg_parallel(self, split) -> FluxFillModel:
        """The same model whose transformer batch is shared between processes by `split(run, *args)`
        (editkit.infer.parallel.CfgParallel's positional contract: the pooled embeddings travel as the
        prompt mask, the guidance values as the condition latents). Guidance is embedded, so there is
        no negative half: only a batch of several edits divides."""
        view = copy.copy(self)
        view._batch_split = split
        return view

    @contextlib.contextmanager
    def denoising(self):
        """One sampling run: diffusers' step caches on the transformer (the first-block cache) start
        and end empty. A no-op without such a cache."""
        transformer = self.transformer
        if not getattr(transformer, "is_cache_enabled", False):
            yield
            return
        transformer._reset_stateful_cache()
        try:
            with transformer.cache_context("edit"):
                yield
        finally:
            transformer._reset_stateful_cache()

    def split_prompt_lengths(self, enabled: bool = True) -> None:
        """A no-op: T5 prompts are always padded to `max_sequence_length` and never masked."""

    # ----- placement -------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks held now by component name (none but the transformer after `without_encoders`)."""
        parts = {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in parts.items() if module is not None}

    def to(self, device=None, dtype=None) -> FluxFillModel:
        """Move and cast the networks; `device` / `dtype` are where and in what inputs are made."""
        for module in self.modules().values():
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Output sides are multiples of this (the VAE's 8x downsampling x the 2x2 patch)."""
        return self.vae_scale_factor * 2

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): given (one side given: the other follows the source's aspect),
        else the output area at the source's aspect; rounded down to multiples of 16."""
        m = self.size_multiple
        if images and (width is None or height is None):
            src_w, src_h = images[0].size
            if width is None and height is None:
                width, height = fit_area(self.output_area, src_w / src_h, m)
            elif height is None:
                height = round(width * src_h / src_w)
            else:
                width = round(height * src_w / src_h)
        elif width is None or height is None:
            side = int(math.sqrt(self.output_area))
            width, height = width or side, height or side
        return max(m, width // m * m), max(m, height // m * m)

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which a source is encoded by default: the output size it gives."""
        return self.output_size([image])

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of (width, height) pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]):
        """The token grid of one sample (the fill input rides on the target's tokens), in packed units."""
        unit = self.size_multiple
        return [(1, height // unit, width // unit)]

    # ----- prompts ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """T5 embeddings of instructions (`images` are not part of the text condition).

        Returns `(embeds (B, 512, D), mask (B, 512))`: every prompt padded to `max_sequence_length`
        tokens, as the pipeline encodes it; the transformer attends to all of them (the mask is ones).
        """
        length = self.family.max_sequence_length
        tokens = self.tokenizer_2(list(prompts), padding="max_length", max_length=length, truncation=True,
                                  return_tensors="pt")
        embeds = self.text_encoder_2(tokens.input_ids.to(self.device), output_hidden_states=False)[0]
        return embeds.to(self.dtype), torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def encode_pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's pooled embeddings `(B, D)` of instructions (77 tokens, as the pipeline)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        pooled = self.text_encoder(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output
        return pooled.to(self.dtype)

    # ----- latents ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 3, H, W) tensor in [-1, 1] (the pipeline's processor)."""
        return torch.cat([self.image_processor.preprocess(_rgb(img), height, width) for img in images])

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The denoising space's latents `(B, 16, h, w)` of pixels in [-1, 1]: the VAE's mode, shifted
        and scaled (what `decode_latents` inverts)."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def encode_images(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Denoising-space latents of PIL images resized to (width, height)."""
        return self.encode_latents(self.preprocess(images, width, height))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in about [-1, 1] from denoising-space latents (the pipeline's decode)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def decode_packed(self, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` of a (width, height) output from packed latents: the output's own,
        or a wider canvas's (decoded whole, as the pipeline decodes it, then its right-hand part cut out)."""
        rows = height // self.size_multiple
        canvas_width = packed.shape[1] // rows * self.size_multiple
        pixels = self.decode_latents(self.unpack(packed, *self.latent_size(canvas_width, height)))
        return self._crop_output(pixels, width)

    def _crop_output(self, pixels: torch.Tensor, width: int) -> torch.Tensor:
        """The right-hand `width` columns of decoded canvas pixels; with the family's `seam_trim`, that
        many more columns off its left edge (the seam to the canvas's other part), then resized back
        to `width` (PIL's bicubic, as ACE++ resizes its crop of the decoded image)."""
        import numpy as np
        from PIL import Image

        if pixels.shape[-1] == width:
            return pixels
        trim = min(self.family.seam_trim, width - 1)
        part = pixels[..., pixels.shape[-1] - width + trim:]
        if not trim:
            return part
        height = pixels.shape[-2]  # clamped first, as the decoded image ACE++ resizes is
        channels = [np.asarray(Image.fromarray(c.numpy(), "F").resize((width, height), Image.Resampling.BICUBIC))
                    for c in part.float().clamp(-1, 1).cpu().flatten(0, 1)]
        return torch.from_numpy(np.stack(channels)).view(*part.shape[:2], height, width).to(pixels)

    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]:
        """PIL images from decoded pixels (the pipeline's postprocessing)."""
        return self.image_processor.postprocess(pixels, output_type="pil")

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents to `(B, h/2 * w/2, 4C)` tokens of 2x2 patches (the pipeline's `_pack_latents`)."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """`(B, N, 4C)` tokens back to `(B, C, h, w)` latents."""
        b, _, channels = packed.shape
        latents = packed.view(b, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, latent_height, latent_width)

    def pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask `(B, 1, H, W)` as the transformer's mask channels `(B, N, 4 * f * f)`: the f x f
        pixels under each latent as channels, then 2x2 patches (the pipeline's `prepare_mask_latents`)."""
        f = self.vae_scale_factor
        b, _, height, width = mask.shape
        h, w = height // f, width // f
        mask = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w)
        return self.pack(mask)

    def encode_conditions(self, images: Sequence[Sequence[Image.Image]]):
        """Packed latents of each sample's first source (the image to edit) at its default size, and that
        size (`(None, [])` without images). The fill condition itself also needs the mask: see `prepare`."""
        sources = [sample[0] for sample in images if sample]  # the image to edit
        if not sources:
            return None, []
        sizes = {self.vae_size(img) for img in sources}
        if len(sizes) != 1:
            raise ValueError("a batch needs source images of one size; group requests by shape")
        (size,) = sizes
        return self.pack(self.encode_images(sources, *size)), [size]

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
        """The transformer also needs the pooled CLIP embedding, the guidance value and the mask
        channels, which `predict`'s arguments do not carry: sampling runs in `sample_latents`, and
        what calls `predict` — the LBM bridge sampler and training — is a UserError."""
        raise UserError(f"family {self.family.name} samples with embedded guidance and a fill input of its own: "
                        "edit with --sampler flow (the bridge sampler and training need a family such as "
                        "qwen-image-edit-2511)")

    def _run_transformer(self, hidden, timestep, embeds, pooled, img_shapes, guidance, attention_kwargs, *,
                         txt_ids, img_ids):
        """The transformer's output for one batch (`predict`'s positional order, for `with_cfg_parallel`)."""
        return self.transformer(hidden_states=hidden, timestep=timestep, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                img_ids=img_ids, joint_attention_kwargs=attention_kwargs, return_dict=False)[0]

    # ----- whole requests --------------------------------------------------------------------

    def fill_layout(self, images: Sequence[Sequence[Image.Image]], masks: Sequence[Image.Image], width: int,
                    height: int) -> FillLayout:
        """The fill input's pixels: each source and mask resized to (width, height) by the pipeline's
        processors, the source blanked (0) where the mask is 1."""
        pixels = self.preprocess(_single_sources(self.family, images), width, height)
        mask = torch.cat([self.mask_processor.preprocess(m, height, width) for m in masks])
        return FillLayout(pixels * (1 - mask), mask)

    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        width: int | None = None,
        height: int | None = None,
        negative_prompts: Sequence[str | None] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
    ) -> EditInputs:
        """Encode a batch of edits: prompts with T5 (embeddings) and CLIP (pooled), and the fill input
        (`fill_layout`: the masked sources and their masks) with the VAE. Guidance is embedded, so
        negative prompts are not used. The masked image's VAE posterior (mean and std) is kept; the
        sample is drawn per seed in `sample_latents`, as the pipeline draws it from its generator."""
        sources = [sample[0] for sample in images if sample]
        if len(sources) != len(prompts) or any(len(sample) > self.family.max_images for sample in images):
            raise UserError(f"family {self.family.name} fills a masked region of one source image per edit "
                            f"(at most {self.family.max_images} image(s)); give each edit its image (--image)")
        if masks is None or len(masks) != len(prompts) or any(m is None for m in masks):
            raise UserError(f"family {self.family.name} fills a masked region: give every edit a mask (--mask, or a "
                            "manifest record's mask; white = region to edit, all white = the whole image)")
        with torch.no_grad():
            width, height = self.output_size(images[0], width, height)
            embeds, embeds_mask = self.encode_prompt(prompts)
            pooled = self.encode_pooled(prompts)
            layout = self.fill_layout(images, masks, width, height)
            posterior = self.vae.encode(layout.masked_pixels.to(device=self.device, dtype=embeds.dtype)).latent_dist
            canvas = (layout.mask.shape[-1], layout.mask.shape[-2])
            return EditInputs(
                prompt_embeds=embeds,
                prompt_mask=embeds_mask,
                cond_latents=None,
                img_shapes=[self.img_shapes(*canvas, [])] * len(prompts),
                width=width,
                height=height,
                has_negative=[False] * len(prompts),
                extra={"pooled": pooled, "masked_mean": posterior.mean, "masked_std": posterior.std,
                       "mask": self.pack_mask(layout.mask.to(device=self.device, dtype=embeds.dtype)),
                       "canvas": canvas},
            )

    def sample_latents(self, inputs: EditInputs, steps: int, cfg: Sequence[float], seeds: Sequence[int],
                       latents: torch.Tensor, callback=None, attention_kwargs: dict | None = None,
                       image_cfg: Sequence[float | None] | None = None) -> torch.Tensor:
        """Denoise packed `latents` (the output's initial noise, drawn per seed) as the pipeline does;
        returns the packed latents of the whole canvas (the output's own when it is the canvas).

        Sample i's generator (`seeds[i]`) is advanced past its initial noise, then draws the rest of
        the canvas's noise (a wider canvas only) and the masked image's VAE sample. `cfg[i]` is its
        embedded guidance value; `image_cfg` is not used (no image guidance).
        """
        from diffusers.utils.torch_utils import randn_tensor

        from editkit.infer.sampler import make_scheduler

        extra, batch = inputs.extra, inputs.batch_size
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        out_h, out_w = self.latent_size(inputs.width, inputs.height)
        for generator in generators:  # the initial noise came first (editkit.infer.sampler.initial_noise)
            randn_tensor((1, self.latent_channels, out_h, out_w), generator=generator, dtype=latents.dtype)
        x = self._canvas_noise(latents, inputs, generators)
        mean, std = extra["masked_mean"], extra["masked_std"]
        sample = mean + std * randn_tensor(mean.shape, generator=generators, device=mean.device, dtype=mean.dtype)
        masked = (sample - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        cond = torch.cat([self.pack(masked.to(x.dtype)), extra["mask"].to(x.dtype)], dim=2)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([float(c) for c in cfg], device=x.device, dtype=torch.float32)
        canvas_w, canvas_h = extra["canvas"]
        txt_ids = torch.zeros(inputs.prompt_embeds.shape[1], 3, device=x.device, dtype=inputs.prompt_embeds.dtype)
        img_ids = _latent_image_ids(canvas_h // self.size_multiple, canvas_w // self.size_multiple, x.device,
                                    inputs.prompt_embeds.dtype)
        run = self._batch_split or (lambda fn, *args: fn(*args))

        def transformer(*args):
            return self._run_transformer(*args, txt_ids=txt_ids, img_ids=img_ids)

        scheduler = make_scheduler(self, steps, x.shape[1])
        with torch.no_grad(), self.denoising():
            for i, t in enumerate(scheduler.timesteps):
                timestep = t.expand(batch).to(x.dtype)
                velocity = run(transformer, torch.cat([x, cond], dim=2), timestep / 1000, inputs.prompt_embeds,
                               extra["pooled"], inputs.img_shapes, guidance, attention_kwargs)
                velocity = self._hooked(velocity, inputs)
                x = scheduler.step(velocity, t, x, return_dict=False)[0]
                if callback is not None:
                    callback(i + 1, steps)
        return x

    def _canvas_noise(self, latents: torch.Tensor, inputs: EditInputs, generators: list) -> torch.Tensor:
        """The canvas's packed initial noise: the output's `latents` as its right-hand part, the rest
        drawn from each sample's generator (nothing to draw when the output is the canvas)."""
        from diffusers.utils.torch_utils import randn_tensor

        canvas_w, canvas_h = inputs.extra["canvas"]
        if canvas_w == inputs.width:
            return latents
        lat_h, lat_w = self.latent_size(inputs.width, inputs.height)
        left_w = (canvas_w - inputs.width) // self.vae_scale_factor
        left = randn_tensor((len(generators), self.latent_channels, lat_h, left_w), generator=generators,
                            device=latents.device, dtype=latents.dtype)
        return self.pack(torch.cat([left, self.unpack(latents, lat_h, lat_w)], dim=-1))

    def _output_columns(self, inputs: EditInputs) -> tuple[int, int]:
        """(canvas token columns, output token columns): the output is the canvas's right-hand part."""
        unit = self.size_multiple
        return inputs.extra["canvas"][0] // unit, inputs.width // unit

    def _hooked(self, velocity: torch.Tensor, inputs: EditInputs) -> torch.Tensor:
        """The velocity with the velocity hooks applied to the output's tokens (the engine's hooks are
        written for the output's packed latents)."""
        if not self._velocity_hooks:
            return velocity
        columns, out_columns = self._output_columns(inputs)
        grid = velocity.view(velocity.shape[0], -1, columns, velocity.shape[-1])
        part = grid[:, :, columns - out_columns:].reshape(velocity.shape[0], -1, velocity.shape[-1])
        for hook in self._velocity_hooks:
            part = hook(part)
        if columns == out_columns:
            return part
        grid = grid.clone()
        grid[:, :, columns - out_columns:] = part.view(velocity.shape[0], grid.shape[1], out_columns, -1)
        return grid.view_as(velocity)


def _latent_image_ids(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """The transformer's position ids of a `rows x columns` token grid: (0, row, column) per token
    (the pipeline's `_prepare_latent_image_ids`)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def _single_sources(family: FluxFillFamily, images: Sequence[Sequence[Image.Image]]) -> list:
    """Each sample's one source image; a UserError for a sample with more."""
    if any(len(sample) > 1 for sample in images):
        raise UserError(f"family {family.name} takes at most {family.max_images} source image, got "
                        f"{max(len(s) for s in images)}; pass one image per edit")
    return [sample[0] for sample in images if sample]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")

