"""Training job configuration: pydantic models, YAML files and dotted `key=value` overrides.

`load_config(path, overrides)` returns a validated `TrainConfig`; any mistake (unknown field,
wrong type, bad override) becomes one `UserError` line naming the file and the field.

Paths (`model` when it is a folder, `transformer`, `vae_folder`, `text_encoder_folder`,
`output_dir`, `data.train[].manifest`,
`data.cache`, `data.val`, `rgba_vae.rgb_checkpoint`, `rgba_vae.lpips_weights`,
`decompose.cache`, `decompose.init_lora`) written in a
YAML file are relative to that file's folder, as paths in a manifest are relative to the
manifest; `key=value` overrides and configs given as dicts (`validate_config`) are relative to
the working directory. Every path comes out absolute, so the `config.yaml` a run writes beside
its outputs reads back the same from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from editkit.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetSpec(_Strict):
    """One training manifest of the multi-dataset mix."""

    manifest: str
    weight: float = Field(1.0, gt=0)
    name: str | None = None


class DataConfig(_Strict):
    train: list[DatasetSpec] = Field(default_factory=list)  # online encoding from manifests
    cache: list[str] = Field(default_factory=list)  # cache folders written by `editkit cache`
    cache_weights: list[float] | None = None  # mixing weights of the cache folders
    val: str | None = None  # manifest of the fixed validation / preview samples
    fields: dict[str, str] = Field(default_factory=dict)  # manifest columns under other names, e.g. {prompt: caption}
    area: int = Field(1024 * 1024, gt=0)  # target pixel area of a bucket
    multiple: int = 32  # bucket sides are multiples of this
    max_ratio: float = Field(4.0, ge=1)
    condition_area: int | None = Field(None, gt=0)  # VAE area of condition images; None = the family default
    batch_size: int = Field(1, ge=1)
    instruction: Literal["en", "cn", "mixed"] = "en"  # which embedding variant to train on
    cn_probability: float = Field(0.5, ge=0, le=1)  # with instruction=mixed
    inverse_probability: float = Field(0.0, ge=0, le=1)  # train this share of batches on the inverse edit

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        from editkit.data.formats import SCHEMAS

        known = {n for schema in SCHEMAS.values() for pair in schema.items() for n in pair}
        for key, column in fields.items():
            if key not in known:
                raise ValueError(f"unknown record field {key!r}; use one of {', '.join(sorted(known))}")
            if not column.strip():
                raise ValueError(f"{key}: give the column name the manifest uses")
        return fields

    @field_validator("cache_weights")
    @classmethod
    def _positive_weights(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and any(w <= 0 for w in weights):
            raise ValueError("every weight must be greater than 0")
        return weights


class LoraConfig(_Strict):
    rank: int = Field(16, ge=1, le=512)
    alpha: float | None = Field(None, gt=0)  # None = rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: str | list[str] = "default"  # default | expanded | all-linear | module-name patterns
    init: Literal["default", "gaussian"] = "default"


class ModelSection(_Strict):
    mode: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    unfreeze: list[str] = Field(default_factory=list)  # extra module-name patterns made trainable
    gradient_checkpointing: bool = False
    # fp32 keeps master weights of what is trained (exact small updates); bf16 is what diffusers + PEFT
    # do with a bf16 model: 2.7 GiB less for a r64 LoRA on the 20 B transformer, and faster matmuls
    trainable_dtype: Literal["fp32", "bf16"] = "fp32"
    # editkit.models.accel's lossless fast path: fused RoPE/GELU, cuDNN attention, regional compile
    # (single GPU or DDP; the first steps compile, 10-30 s)
    compile: bool = False
    # modules trained fully beside the LoRA and saved with it as one adapter bundle: new ones the
    # family offers (`ste`) and existing ones by name pattern (`img_in`, `norm_out`, globs)
    extra_modules: list[str] = Field(default_factory=list)
    rope_frames: Literal["own", "shared"] = "own"  # condition images at their own RoPE frames or the target's

    @model_validator(mode="after")
    def _extra_modules(self):
        if self.extra_modules and self.mode != "lora":
            raise ValueError("extra_modules: needs mode lora (a full fine-tune trains every module already)")
        if any(not name.strip() for name in self.extra_modules):
            raise ValueError("extra_modules: a name is empty; give module names such as ste or img_in")
        if len(set(self.extra_modules)) < len(self.extra_modules):
            raise ValueError("extra_modules: a name is given twice; give each once")
        return self


class TimestepConfig(_Strict):
    sampling: Literal["uniform", "logit_normal", "shifted", "discrete"] = "shifted"
    mean: float = 0.0  # logit-normal
    std: float = Field(1.0, gt=0)  # logit-normal
    values: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)  # discrete set
    weighting: Literal["none", "sd3", "bell"] = "none"

    @field_validator("values")
    @classmethod
    def _sigmas(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in values):
            raise ValueError("every value must be a sigma in (0, 1]")
        return values


class LbmConfig(_Strict):
    bridge_noise: float = Field(0.005, ge=0)  # σ of the bridge noise
    sub_stream_weight: float = Field(0.0, ge=0)  # white image -> target stream; 0 = off
    pixel_loss_weight: float = Field(0.0, ge=0)  # decoded-crop L1 on the predicted target; 0 = off
    pixel_crop: int = Field(8, ge=1)  # side (in latent cells) of the crop decoded for the pixel loss


class ObjectiveConfig(_Strict):
    kind: Literal["flow_matching", "lbm"] = "flow_matching"
    timesteps: TimestepConfig = Field(default_factory=TimestepConfig)
    mask_weight: float = Field(0.0, ge=0)  # extra loss weight inside the edit region
    text_dropout: float = Field(0.0, ge=0, le=1)  # swap in the empty-text embedding
    image_dropout: float = Field(0.0, ge=0, le=1)  # zero the condition-image latents
    lbm: LbmConfig = Field(default_factory=LbmConfig)


class OptimConfig(_Strict):
    name: Literal["adamw", "prodigy_sf"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, ge=0)  # 0 or null: no clipping; ignored (no clipping) with prodigy_sf
    schedule: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial",
                      "constant_with_warmup"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if any(not 0 <= b < 1 for b in betas):
            raise ValueError("both betas must be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _prodigy_lr(self):
        if self.name == "prodigy_sf" and "lr" not in self.model_fields_set:
            self.lr = 1.0
        return self


class TrainLoop(_Strict):
    max_steps: int = Field(1000, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, no on the CPU
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1)
    validate_every: int = Field(0, ge=0)  # 0 = off
    preview_every: int = Field(0, ge=0)  # 0 = off
    preview_steps: int = Field(8, ge=1)
    preview_cfg: float = Field(1.0, ge=0)
    val_samples: int = Field(4, ge=1)
    tensorboard: bool = True
    wandb: bool = False  # offline mode; needs `pip install wandb`
    export_lora: bool = True  # deployable exports (LoRA layouts / transformer / vae) in every checkpoint


class VaeStage(_Strict):
    """The `vae` stage: an AutoencoderKLQwenImage trained from scratch on images."""

    base_dim: int = Field(8, ge=1)  # the defaults are the tiny preset's VAE shape, so the tiny transformer fits it
    z_dim: int = Field(4, ge=1)
    dim_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 2], min_length=2)
    num_res_blocks: int = Field(1, ge=1)
    temperal_downsample: list[bool] | None = None  # default: [False, True, True, ...] as the Qwen VAE
    input_channels: Literal[3, 4] = 3  # 4: an RGBA VAE
    size: int = Field(64, ge=1)  # training images are resized/cropped to size x size
    loss: Literal["l1", "mse"] = "l1"
    kl_weight: float = Field(1e-6, ge=0)
    stats_batches: int = Field(8, ge=1)  # batches used to measure latents_mean/std at the end


class RgbaVaeStage(_Strict):
    """The `rgba_vae` stage: an RGBA AutoencoderKLQwenImage fine-tuned on `editkit layers prep` data."""

    # the VAE to fine-tune (a VAE folder or a model folder holding vae/): an RGBA one (from
    # `editkit layers convert-vae`) as it is, an RGB one widened to RGBA in memory the same way
    rgb_checkpoint: str | None = None
    include_composites: bool = True  # train on the composites (opaque images) beside the components
    rgb_loss: Literal["premultiplied", "straight"] = "premultiplied"  # L1 on rgb·alpha, or on rgb
    # weight of the alpha L1 beside the RGB L1 (a mean over 3 channels): an alpha error shows in all
    # three channels of a composite; on the tiny VAE at 64 px, 1 left alpha transparent everywhere
    # (val alpha IoU 0.02, 9-background PSNR 16.1 dB after 300 steps), 3 learned it (0.29, 18.0 dB)
    alpha_weight: float = Field(3.0, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    lpips_weight: float = Field(0.0, ge=0)  # perceptual loss on composites over black and white; 0 = off
    # folder with the LPIPS backbone and heads, as `editkit eval --weights lpips=DIR` takes (docs/eval.md)
    lpips_weights: str | None = None
    grid_items: int = Field(8, ge=1)  # images in each validation grid

    @model_validator(mode="after")
    def _lpips_needs_weights(self):
        if self.lpips_weight > 0 and not self.lpips_weights:
            raise ValueError("lpips_weight > 0 needs lpips_weights (a folder with the LPIPS backbone and heads, "
                             "e.g. alexnet-owt-7be5be79.pth and alex.pth; docs/eval.md)")
        return self


class DecomposeStage(_Strict):
    """The `decompose` stage: Qwen-Image-Layered trained on `editkit layers prep` data (image -> layers)."""

    resolution: int | None = Field(None, ge=16, le=4096)  # layers at about resolution² pixels; None: the model's
    min_layers: int = Field(1, ge=1)  # samples with fewer or more layers are left out (a curriculum phase's range)
    max_layers: int = Field(64, ge=1)
    prompt: Literal["descriptions", "fixed"] = "descriptions"  # the layers' descriptions joined, or prompt_text
    prompt_text: str = "a layered design"  # the prompt of `fixed`, and of samples without descriptions
    cache: str | None = None  # folder for the encoded prompts and latents (CACHE/<key>/); None: in memory
    init_lora: str | None = None  # start the LoRA from an earlier phase's file (same targets, rank and alpha)

    @model_validator(mode="after")
    def _layer_range(self):
        if self.min_layers > self.max_layers:
            raise ValueError(f"min_layers ({self.min_layers}) is above max_layers ({self.max_layers})")
        if not self.prompt_text.strip():
            raise ValueError("prompt_text: give a non-empty description (a blank one means the auto-caption)")
        return self


class TrainConfig(_Strict):
    stage: Literal["edit", "vae", "rgba_vae", "decompose"] = "edit"
    model: str = "tiny"  # editkit.models.load_model spec: a diffusers folder or tiny[:family]
    family: str | None = None
    transformer: str | None = None  # a transformer folder replacing the model's
    vae_folder: str | None = None  # a VAE folder replacing the model's (--vae; `vae:` is the VAE stage's section)
    text_encoder_folder: str | None = None  # a text encoder folder replacing the model's (--text-encoder)
    output_dir: str = "runs/train"
    seed: int = Field(0, ge=0, lt=2 ** 32)  # numpy takes 32-bit seeds
    data: DataConfig = Field(default_factory=DataConfig)
    train: ModelSection = Field(default_factory=ModelSection)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loop: TrainLoop = Field(default_factory=TrainLoop)
    vae: VaeStage = Field(default_factory=VaeStage)
    rgba_vae: RgbaVaeStage = Field(default_factory=RgbaVaeStage)
    decompose: DecomposeStage = Field(default_factory=DecomposeStage)

    @model_validator(mode="after")
    def _needs_data(self):
        if self.data.multiple not in (8, 16, 32, 64):
            raise ValueError("data.multiple: use 8, 16, 32 or 64")
        if self.data.area < self.data.multiple ** 2:
            raise ValueError(f"data.area: at least one {self.data.multiple}x{self.data.multiple} tile "
                             f"({self.data.multiple ** 2} pixels)")
        if not self.data.train and not self.data.cache:
            raise ValueError("data: give data.train (manifests) or data.cache (cache folders)")
        if self.data.train and self.data.cache:
            raise ValueError("data: give either data.train or data.cache, not both")
        if self.stage == "vae" and not self.data.train:
            raise ValueError("data.train: the vae stage reads images from manifests, not a cache")
        if self.stage == "decompose":
            if len(self.data.train) != 1:
                raise ValueError("data.train: the decompose stage reads one folder written by `editkit layers prep` "
                                 "(data.train: [{manifest: FOLDER}])")
            if self.objective.kind != "flow_matching":
                raise ValueError("objective.kind: the decompose stage trains with flow_matching")
            unused = {"data.val": self.data.val, "objective.image_dropout": self.objective.image_dropout,
                      "objective.mask_weight": self.objective.mask_weight,
                      "train.extra_modules": self.train.extra_modules,
                      "train.rope_frames": self.train.rope_frames != "own"}
            for name, value in unused.items():
                if value:
                    raise ValueError(f"{name}: the decompose stage does not use it (validation is on the prep "
                                     "folder's val split); leave it out")
            if self.decompose.init_lora and self.train.mode != "lora":
                raise ValueError("decompose.init_lora: needs train.mode lora (a full phase starts from "
                                 "`transformer:`, the earlier phase's final/transformer)")
        if self.stage == "rgba_vae":
            if len(self.data.train) != 1:
                raise ValueError("data.train: the rgba_vae stage reads one folder written by `editkit layers prep` "
                                 "(data.train: [{manifest: FOLDER}])")
            if not self.rgba_vae.rgb_checkpoint:
                raise ValueError("rgba_vae.rgb_checkpoint: give the VAE folder to fine-tune (one written by "
                                 "`editkit layers convert-vae`, or an RGB Qwen-Image VAE)")
        if self.data.cache_weights is not None and len(self.data.cache_weights) != len(self.data.cache):
            raise ValueError("data.cache_weights: give one weight per data.cache folder")
        return self


# What a resume may change: where and how often the run reports, saves, validates and previews,
# and speed/memory switches that leave the maths alone. Every other setting (stage, model, data,
# objective, optimiser and lr, schedule, seed, LoRA, batch size, accumulation, precision) enters
# the run's fingerprint, and `--resume` refuses a run folder made with other values.
RESUMABLE = ("output_dir", "data.val", "train.gradient_checkpointing", "train.compile",
             "loop.checkpoint_every", "loop.keep_last", "loop.log_every", "loop.validate_every",
             "loop.preview_every", "loop.preview_steps", "loop.preview_cfg", "loop.val_samples",
             "loop.tensorboard", "loop.wandb", "loop.export_lora", "rgba_vae.grid_items",
             "decompose.cache")
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")  # learning rates that do not depend on loop.max_steps


def max_steps_resumable(cfg: TrainConfig) -> bool:
    """Whether a run may be extended (loop.max_steps raised on resume) without changing its past:
    true when the learning rate does not depend on the total (constant schedules, prodigy_sf)."""
    return cfg.optim.name == "prodigy_sf" or cfg.optim.schedule in STEP_FREE_SCHEDULES


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trajectory_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings (dotted names) that decide the trained weights: the config minus RESUMABLE."""
    free = set(RESUMABLE) | ({"loop.max_steps"} if max_steps_resumable(cfg) else set())
    return {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if k not in free}


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r}: write key=value, e.g. optim.lr=1e-4")
    key, value = text.split("=", 1)
    if not key.strip():
        raise UserError(f"override {text!r}: the key is empty; write key=value, e.g. optim.lr=1e-4")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys (`optim.lr=1e-4`, `data.cache=[a,b]`) in a nested dict; values parsed as YAML."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {k} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"field {field}: unknown field; check the spelling (docs/training.md lists the fields)"
    return f"field {field}: {msg}"


def _absolute(value, base: Path):
    """A path value made absolute against base (anything that is not a string is left to validation)."""
    if not isinstance(value, str) or not value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def absolute_paths(raw: dict, base: str | Path) -> dict:
    """A copy of a raw config whose relative paths are made absolute against base."""
    from editkit.models.loading import is_tiny_spec

    base = Path(base).absolute()
    out = dict(raw)
    for key in ("transformer", "vae_folder", "text_encoder_folder", "output_dir"):
        if key in raw:
            out[key] = _absolute(raw[key], base)
    if "model" in raw and not is_tiny_spec(raw["model"]):
        out["model"] = _absolute(raw["model"], base)
    for name, keys in (("rgba_vae", ("rgb_checkpoint", "lpips_weights")), ("decompose", ("cache", "init_lora"))):
        stage = raw.get(name)
        if isinstance(stage, dict):
            out[name] = {**stage, **{k: _absolute(stage[k], base) for k in keys if k in stage}}
    data = raw.get("data")
    if isinstance(data, dict):
        data = out["data"] = dict(data)
        if "val" in data:
            data["val"] = _absolute(data["val"], base)
        if isinstance(data.get("cache"), list):
            data["cache"] = [_absolute(c, base) for c in data["cache"]]
        if isinstance(data.get("train"), list):
            data["train"] = [{**d, "manifest": _absolute(d["manifest"], base)}
                             if isinstance(d, dict) and "manifest" in d else d for d in data["train"]]
    return out


def validate_config(raw: dict, source: str = "config") -> TrainConfig:
    """A checked TrainConfig; relative paths still in `raw` are taken against the working directory."""
    try:
        return TrainConfig.model_validate(absolute_paths(raw, Path.cwd()))
    except ValidationError as err:
        raise UserError(f"{source}: {_first_error(err)}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or none), apply `key=value` overrides, validate."""
    raw: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"{p}: config file not found; give the path of a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise UserError(f"{p}: not UTF-8 text (byte {err.start}); a training config is a YAML text file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the config must be a mapping of sections (stage, model, data, ...)")
        raw = absolute_paths(raw, p.parent)
    return validate_config(apply_overrides(raw, overrides or []), source)

