"""The model-family interface: everything the engine, trainer, cache, eval and app need from a family.

A family is one file in `editkit/models/` (diffusers' habit: one model, one file) that defines
an object satisfying `ModelFamily` (static facts and how to build or load a model) and a facade
class satisfying `EditModel` (a loaded model: conditions, latents, the velocity). Register the
file in `editkit.models.families.FAMILY_MODULES`; nothing else changes. `qwen_image_edit.py` is
the reference implementation; docs/architecture.md walks through adding one.

Conventions every family follows (the samplers and the trainer rely on them):
- sizes are `(width, height)` in pixels; "latents" are normalised VAE latents `(B, C, h, w)`;
  "packed" latents are the transformer's tokens `(B, N, D)`;
- `predict` returns the flow-matching velocity (`noise - target`, or `source - target` on the LBM
  bridge) for a timestep `s` in [0, 1], where `s = 1` is pure noise (or the source);
- every method takes a batch.

Families whose pipelines sample differently (another scheduler, embedded guidance, an image
guidance scale) give their facade a `sample_latents` method (see `CustomSampler`): the flow
sampler then hands the whole denoising loop to it, and nothing outside the family file changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image


VIEW_AREAS = ("vlm_image_area", "vae_image_area", "output_area")
"""A model's view sizes (pixel areas): what the VLM and the VAE see of a source image, and the
default output; `load_model` overrides and model folders record them."""


def write_model_index(family, model, out, components: dict, extra: dict | None = None) -> None:
    """`out/model_index.json` as diffusers writes it for `family.pipeline_class` (`components`: name ->
    [library, class]), with editkit's keys: the family, the model's view areas and `extra`."""
    import json

    import diffusers

    index = {
        "_class_name": family.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "_editkit_family": family.name,
        **{f"_editkit_{key}": int(getattr(model, key)) for key in VIEW_AREAS},
        **{f"_editkit_{key}": value for key, value in (extra or {}).items()},
        **components,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class SamplingDefaults:
    """A family's sampling settings when the user gives none (its model card's / pipeline's)."""

    steps: int = 40
    cfg: float = 4.0
    """The guidance scale `--cfg` sets: true CFG for the Qwen families, the embedded guidance of
    Flux Fill, the text guidance of InstructPix2Pix. 1 turns classifier-free guidance off."""
    image_cfg: float | None = None
    """The image guidance scale (`--image-cfg`) of families that have one (InstructPix2Pix: 1.5)."""
    needs_mask: bool = False
    """Does every edit need a mask (white = region to fill), as Flux Fill does?"""


@dataclass
class EditInputs:
    """Everything the sampler needs for one batch of edits that share sizes (built by `EditModel.prepare`)."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    cond_latents: torch.Tensor | None
    img_shapes: list[list[tuple[int, int, int]]]
    width: int
    height: int
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    has_negative: list[bool] = field(default_factory=list)
    """Per sample: was a negative prompt given (true CFG needs one)."""
    extra: dict = field(default_factory=dict)
    """Family-specific tensors its own sampler reads (e.g. Flux Fill's masked-image latents)."""

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


class EditModel(Protocol):
    """A loaded model of one family, used by training and inference alike.

    Clients never assign to its attributes; the `with_*` / `without_*` methods return views that
    share the weights.
    """

    family: ModelFamily
    transformer: torch.nn.Module
    """The trained network (LoRA adapters go here)."""
    scheduler: Any
    """The family's diffusers scheduler (its config sets the dynamic shift)."""
    device: torch.device
    dtype: torch.dtype
    vlm_image_area: int
    vae_image_area: int
    output_area: int
    latent_channels: int

    @property
    def size_multiple(self) -> int:
        """Output width and height are multiples of this."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks this model holds now, by component name (the encoders are absent after
        `without_encoders`)."""

    def to(self, device=None, dtype=None) -> EditModel: ...

    # sizes
    def output_size(self, images: Sequence[Image.Image], width: int | None = None,
                    height: int | None = None) -> tuple[int, int]:
        """The output size: given, or the family's default for these source images."""

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """The size at which a source image is encoded as a condition."""

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of (width, height) pixels."""

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]) -> list:
        """The transformer's positional layout of one sample (target, then each condition image)."""

    # conditions
    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """Text (and image) condition embeddings `(embeds (B, L, D), mask (B, L))` with the family's template."""

    def encode_conditions(self, images: Sequence[Sequence[Image.Image]]):
        """Packed condition latents of the source images and their sizes (`(None, [])` without images)."""

    def prepare(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], width: int | None = None,
                height: int | None = None, negative_prompts: Sequence[str | None] | None = None,
                masks: Sequence[Image.Image | None] | None = None) -> EditInputs:
        """Encode a batch of edits for the sampler; `masks` (white = edit region, one per sample or
        None) reach families that take a mask as input (others ignore them)."""

    # latents
    def encode_images(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor: ...
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...
    def decode_packed(self, packed: torch.Tensor, width: int, height: int) -> torch.Tensor: ...
    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]: ...
    def pack(self, latents: torch.Tensor) -> torch.Tensor: ...
    def unpack(self, packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor: ...

    # the network
    def predict(self, latents: torch.Tensor, timestep, prompt_embeds: torch.Tensor, prompt_mask,
                img_shapes: list, cond_latents: torch.Tensor | None = None,
                attention_kwargs: dict | None = None) -> torch.Tensor:
        """The velocity for packed target tokens; differentiable."""

    # views and switches (instead of clients mutating the facade)
    def with_transformer(self, transformer: torch.nn.Module) -> EditModel: ...
    def without_encoders(self) -> EditModel: ...
    def with_velocity_hook(self, hook: Callable[[torch.Tensor], torch.Tensor]) -> EditModel: ...
    def with_cfg_parallel(self, split: Callable[..., torch.Tensor]) -> EditModel:
        """The same model whose `predict` batch is shared between processes by `split(predict, *args)`
        (editkit.infer.parallel)."""
    def with_scheduler(self, config: Mapping[str, Any]) -> EditModel:
        """The same model sampling with another scheduler config (the sampler reads `scheduler.config`)."""
    def split_prompt_lengths(self, enabled: bool = True) -> None: ...
    def denoising(self) -> AbstractContextManager:
        """A context around one sampling run (the samplers enter it): step caches start and end empty."""


class CustomSampler(Protocol):
    """The optional `sample_latents` method of a facade whose family samples its own way."""

    def sample_latents(self, inputs: EditInputs, steps: int, cfg: Sequence[float], seeds: Sequence[int],
                       latents: torch.Tensor, callback: Callable[[int, int], None] | None = None,
                       attention_kwargs: dict | None = None,
                       image_cfg: Sequence[float | None] | None = None) -> torch.Tensor:
        """Denoise packed `latents` (standard normal, drawn per seed by `editkit.infer.sampler.initial_noise`)
        into packed target latents, as the family's diffusers pipeline does; `cfg[i]` is sample i's
        guidance scale (`SamplingDefaults.cfg`), `image_cfg[i]` its image guidance scale."""


class RopeFrames(Protocol):
    """The optional RoPE frame option of a facade (`train.rope_frames`, `--rope-frames`;
    editkit.models.rope_frames)."""

    rope_frames: str
    """"own" (each condition image at its own RoPE frame, as released) or "shared" (all at the target's)."""

    def with_rope_frames(self, mode: str) -> EditModel:
        """The same model placing condition images by `mode`, sharing the weights."""


class ExtraModule(Protocol):
    """A module a family adds to its transformer for `train.extra_modules` (editkit.models.ste):
    zero-initialised, so an untrained one changes nothing; a submodule of the transformer."""

    def set_active(self, active: bool) -> None:
        """Switch it on or off (`--without NAME`) without removing it."""

    def detach(self, transformer: torch.nn.Module, name: str) -> None:
        """Remove it (its hooks and the submodule `name`) from `transformer`."""


class ExtraModules(Protocol):
    """The optional `extra_modules` method of a family offering new trainable modules."""

    def extra_modules(self) -> Mapping[str, Callable[[torch.nn.Module, str], ExtraModule]]:
        """Name (as `train.extra_modules` and `--without` write it) -> factory(transformer, attribute):
        a new module attached to the transformer as its submodule `attribute`
        (editkit.models.adapter_bundle)."""


class ModelFamily(Protocol):
    """Static facts about one family and how to build, load and write its models."""

    name: str
    """The `--family` name, e.g. "qwen-image-edit-2511"."""
    description: str
    pipeline_class: str
    """The diffusers pipeline class whose results this family reproduces."""
    max_images: int | None
    """How many source images a record may have (None: any number)."""
    image_mode: str
    """How source images reach the model: "RGB" (transparency composited over white) or "RGBA"."""
    scheduler: dict
    """The diffusers scheduler config of the released checkpoints."""
    lora_targets: Mapping[str, tuple[str, ...]]
    """Named LoRA target presets (`train.lora.targets`): module-name suffixes or globs."""
    component_files: Mapping[str, tuple[str, ...]]
    """What each component folder of a diffusers-format model folder must hold (globs; `a|b`: either)."""
    sampling: SamplingDefaults
    """Steps and guidance when the user gives none."""
    trainable: bool
    """Can `editkit train` fine-tune it (flow-matching velocity from `predict`)? Others edit and evaluate only."""

    def unused_modules(self, transformer: torch.nn.Module) -> list[str]:
        """Modules whose output the model discards (no LoRA goes on them)."""

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """Is a folder with this model_index.json and transformer config one of this family's?"""

    def check_transformer(self, transformer_config: dict) -> None:
        """UserError when a transformer config does not fit this family (e.g. a flag differs)."""

    def build_tiny(self, seed: int = 0, areas: dict[str, int] | None = None) -> EditModel:
        """The tiny preset: every component built in code at toy width (tests, demo), seeded; `areas`
        overrides its view areas (vlm_image_area, vae_image_area, output_area)."""

    def load_transformer(self, folder: Path, torch_dtype, device=None) -> torch.nn.Module:
        """The transformer of a component folder (config.json + weights), on the CPU or read straight
        onto `device`."""

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int],
                    device=None) -> EditModel:
        """Load a local diffusers-format folder (the transformer from `transformer_dir`), on the CPU,
        or with its weights read straight onto `device` (no whole copy in host memory); `areas`
        overrides the family's view areas."""

    def write_folder(self, model: EditModel, out: Path, extra: dict | None = None) -> None:
        """Write `model` as a diffusers-format folder that `load_folder` reads back (into an empty
        folder); `extra` adds keys to its model_index.json (e.g. what wrote it)."""
