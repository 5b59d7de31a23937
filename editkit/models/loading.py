"""Load an EditModel from a local diffusers-format folder or a tiny preset; write tiny presets.

Folder layout (a Qwen-Image-Edit snapshot): transformer/, vae/, text_encoder/, tokenizer/,
processor/, scheduler/ and model_index.json. Nothing is fetched from the network. The
transformer may come from another folder (`transformer=`): either a component folder
(config.json + weights) or a snapshot root holding transformer/.
"""

from __future__ import annotations

import json
from pathlib import Path

from editkit.errors import UserError
from editkit.models.families import DEFAULT_FAMILY, detect_family, get_family

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

COMPONENT_FILES = {
    "transformer": ("config.json", "*.safetensors*"),
    "vae": ("config.json", "*.safetensors*"),
    "text_encoder": ("config.json", "*.safetensors*"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json|vocab.json"),
    "processor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
}
"""What each component folder must hold (glob patterns; `a|b`: either will do)."""

TINY_PREFIX = "tiny"


def is_tiny_spec(spec) -> bool:
    """Is a model spec a tiny preset ("tiny" or "tiny:<family>") rather than a folder?"""
    text = str(spec)
    return text == TINY_PREFIX or text.startswith(TINY_PREFIX + ":")


def resolve_dtype(name: str, device: str) -> str:
    """The dtype name to load with: "auto" is bf16 on a CUDA device and fp32 elsewhere."""
    if name == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return name


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def missing_files(folder: Path, components) -> list[str]:
    """Paths (relative to `folder`) of required component files that are absent."""
    missing = []
    for name in components:
        for requirement in COMPONENT_FILES[name]:
            options = requirement.split("|")
            if not any(any((folder / name).glob(pattern)) for pattern in options):
                missing.append(" or ".join(f"{name}/{pattern}" for pattern in options))
    return missing


def _transformer_folder(path: str | Path) -> Path:
    path = Path(path)
    if (path / "transformer").is_dir():
        path = path / "transformer"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors*")):
        raise UserError(
            f"{path}: not a transformer folder (needs config.json and *.safetensors); "
            "pass a diffusers transformer folder or a snapshot containing transformer/"
        )
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-download it or restore it from the model "
                        "snapshot") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; re-download it or restore it from the model snapshot")
    return data


def _check_safetensors(path: Path) -> None:
    """The file's header parses and covers the whole file (a truncated or emptied file fails)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: damaged safetensors file ({reason}); re-download it, or save the model "
                        "again") from None


def check_files(folders) -> None:
    """Every JSON file and safetensors header in `folders` is readable (no weights are read), so a
    damaged file is one line naming it rather than a loader's traceback."""
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            _read_json(path)
        for path in sorted(Path(folder).glob("*.safetensors")):
            _check_safetensors(path)


def resolve_family(root: Path, transformer_dir: Path, family: str | None) -> str:
    """The family: given, else from the transformer's snapshot, else from the root's model_index.json."""
    if family is not None:
        return get_family(family).name
    transformer_config = _read_json(transformer_dir / "config.json")
    for index_file in (transformer_dir.parent / "model_index.json", root / "model_index.json"):
        found = detect_family(_read_json(index_file), transformer_config)
        if found:
            return found
    raise UserError(
        f"{root}: cannot tell the model family from model_index.json; pass --family (e.g. {DEFAULT_FAMILY})"
    )


def load_model(
    spec: str | Path,
    family: str | None = None,
    transformer: str | Path | None = None,
    dtype: str = "bf16",
    device: str | None = None,
    attention_backend: str | None = None,
    compile: bool = False,
    vae_image_size: int | None = None,
    vlm_image_size: int | None = None,
    seed: int = 0,
):
    """Load an EditModel.

    spec: a local diffusers-format folder, or "tiny" / "tiny:<family>" (built in code with
    `seed`). `vae_image_size` / `vlm_image_size` are the side (pixels) of the square whose area
    the VAE / VLM views of source images keep (defaults: the family's, 1024 and 384; tiny: 64).
    `attention_backend` is a diffusers attention backend name (e.g. "flash", "_native_cudnn");
    `compile` compiles the transformer's repeated blocks with torch.compile.
    """
    for option, side in (("--vae-image-size", vae_image_size), ("--vlm-image-size", vlm_image_size)):
        if side is not None and not 16 <= side <= 4096:
            raise UserError(f"{option} {side}: give a side in pixels from 16 to 4096")
    import torch

    from editkit.models.edit_model import EditModel

    torch_type = torch_dtype(dtype)
    spec_text = str(spec)
    if is_tiny_spec(spec_text):
        parts, extra = _tiny_parts(spec_text, family, seed)
    else:
        parts, extra = _folder_parts(Path(spec), family, transformer, torch_type)
    if transformer is not None and "transformer" not in extra.get("loaded", ()):
        transformer_dir = _transformer_folder(transformer)
        check_files([transformer_dir])
        parts["transformer"] = _load_transformer(transformer_dir, torch_type)
    sizes = dict(extra.get("sizes", {}))
    if vae_image_size is not None:
        sizes["vae_image_area"] = int(vae_image_size) ** 2
    if vlm_image_size is not None:
        sizes["vlm_image_area"] = int(vlm_image_size) ** 2
    spec_family = get_family(extra["family"])
    check_transformer_flags(spec_family, parts["transformer"].config)
    model = EditModel(family=spec_family, **parts, **sizes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=torch_type)
    for module in (model.transformer, model.vae, model.text_encoder):
        module.eval().requires_grad_(False)
    if attention_backend:
        set_attention_backend(model.transformer, attention_backend)
    if compile:
        from editkit.models import accel

        accel.fuse_block_ops(model)  # lossless; see editkit/models/accel.py and docs/benchmarks.md
        model.split_prompt_lengths()
        accel.compile_blocks(model)
    return model


FAMILY_FLAGS = ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond")
"""Transformer config flags that tell families apart (absent from a family's flags: False)."""


def check_transformer_flags(family, transformer_config) -> None:
    """The transformer must have the family's flags (a 2509 transformer is no 2511 and vice versa)."""
    for flag in FAMILY_FLAGS:
        expected, found = bool(family.transformer_flags.get(flag, False)), bool(transformer_config.get(flag, False))
        if expected != found:
            raise UserError(
                f"family {family.name} needs a transformer with {flag}={expected}, but its config.json has "
                f"{flag}={found}; pass the right --family (or --transformer)"
            )


def set_attention_backend(transformer, name: str) -> None:
    """Route the transformer's attention through a diffusers backend; Hub-downloaded kernels are refused."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName if not b.value.endswith("_hub"))
    if name.lower() not in known:
        raise UserError(f"attention backend {name!r} is not available offline; use one of {', '.join(known)}")
    try:
        transformer.set_attention_backend(name.lower())
    except (ImportError, RuntimeError, ValueError) as err:
        raise UserError(f"attention backend {name!r} cannot run here ({err}); try 'native'") from None


def _tiny_parts(spec: str, family: str | None, seed: int):
    from editkit.models.tiny import TINY_AREA, build_tiny

    name = spec.partition(":")[2] or family or DEFAULT_FAMILY
    name = get_family(name).name
    tiny = build_tiny(name, seed=seed)
    parts = {
        "transformer": tiny.transformer,
        "vae": tiny.vae,
        "text_encoder": tiny.text_encoder,
        "tokenizer": tiny.tokenizer,
        "image_processor": tiny.image_processor,
        "scheduler": tiny.scheduler,
    }
    sizes = {"vlm_image_area": TINY_AREA, "vae_image_area": TINY_AREA, "output_area": TINY_AREA}
    return parts, {"family": name, "sizes": sizes}


def _load_transformer(folder: Path, torch_type):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch_type, local_files_only=True)


def _folder_parts(root: Path, family: str | None, transformer: str | Path | None, torch_type):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    transformer_dir, name, sizes = inspect_folder(root, family, transformer)
    parts = {
        "transformer": _load_transformer(transformer_dir, torch_type),
        "vae": AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=torch_type, local_files_only=True),
        "text_encoder": Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root / "text_encoder", dtype=torch_type, local_files_only=True
        ),
        "tokenizer": Qwen2Tokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        "image_processor": Qwen2VLImageProcessorPil.from_pretrained(root / "processor", local_files_only=True),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True),
    }
    return parts, {"family": name, "sizes": sizes, "loaded": ("transformer",)}


_SIZE_KEYS = ("vlm_image_area", "vae_image_area", "output_area")


def inspect_folder(root: Path, family: str | None, transformer: str | Path | None):
    """Check a model folder without loading weights: (transformer folder, family, editkit view sizes).

    A UserError names the folder and lists every missing file, or names a damaged JSON or safetensors file.
    """
    if not root.is_dir():
        raise UserError(f"{root}: model folder not found; pass a diffusers-format folder or 'tiny'")
    needed = [c for c in COMPONENT_FILES if not (c == "transformer" and transformer is not None)]
    missing = missing_files(root, needed)
    if missing:
        raise UserError(f"{root}: incomplete model folder, missing {', '.join(missing)}")
    transformer_dir = _transformer_folder(transformer) if transformer is not None else root / "transformer"
    check_files([root, transformer_dir, *(root / c for c in needed if c != "transformer")])
    name = resolve_family(root, transformer_dir, family)
    index = _read_json(root / "model_index.json")
    sizes = {key: int(index[f"_editkit_{key}"]) for key in _SIZE_KEYS if f"_editkit_{key}" in index}
    return transformer_dir, name, sizes


def _count_parameters(folder: Path) -> int:
    """Parameter count from safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:  # headers only; no torch needed
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def describe(spec: str | Path, family: str | None = None, transformer: str | Path | None = None) -> dict:
    """What a model spec holds, from configs and weight headers only (cheap for 20 B models)."""
    spec_text = str(spec)
    if is_tiny_spec(spec_text):
        model = load_model(spec_text, family=family, dtype="fp32", device="cpu")
        return {
            "family": model.family.name,
            "vlm_image_area": model.vlm_image_area,
            "vae_image_area": model.vae_image_area,
            "output_area": model.output_area,
            "transformer_config": dict(model.transformer.config),
            "parameters": {
                name: sum(p.numel() for p in getattr(model, name).parameters())
                for name in ("transformer", "vae", "text_encoder")
            },
        }
    root = Path(spec)
    transformer_dir, name, sizes = inspect_folder(root, family, transformer)
    defaults = get_family(name)
    return {
        "family": name,
        **{key: sizes.get(key, getattr(defaults, key)) for key in _SIZE_KEYS},
        "transformer_config": _read_json(transformer_dir / "config.json"),
        "parameters": {
            "transformer": _count_parameters(transformer_dir),
            "vae": _count_parameters(root / "vae"),
            "text_encoder": _count_parameters(root / "text_encoder"),
        },
    }


def save_tiny(out_dir: str | Path, family: str = DEFAULT_FAMILY, seed: int = 0) -> Path:
    """Write the tiny preset of `family` as a diffusers-format folder (atomically)."""
    from editkit.models.tiny import TINY_AREA, build_tiny
    from editkit.utils.atomic import atomic_dir

    spec = get_family(family)
    tiny = build_tiny(spec.name, seed=seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tiny.transformer.save_pretrained(tmp / "transformer")
        tiny.vae.save_pretrained(tmp / "vae")
        tiny.text_encoder.save_pretrained(tmp / "text_encoder")
        tiny.tokenizer.save_pretrained(tmp / "tokenizer")
        tiny.tokenizer.save_pretrained(tmp / "processor")
        tiny.image_processor.save_pretrained(tmp / "processor")
        tiny.scheduler.save_pretrained(tmp / "scheduler")
        index = model_index(spec.name, {key: TINY_AREA for key in _SIZE_KEYS})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def model_index(family: str, areas: dict[str, int], **extra) -> dict:
    """The model_index.json of a diffusers-format folder of `family` that load_model reads back:
    component classes, the family, and the image areas (vlm_image_area, vae_image_area, output_area)."""
    import diffusers

    spec = get_family(family)
    return {
        "_class_name": spec.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "_editkit_family": spec.name,
        **{f"_editkit_{key}": int(areas[key]) for key in _SIZE_KEYS},
        **{f"_editkit_{key}": value for key, value in extra.items()},
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
