"""Load a model of any family from a local diffusers-format folder or a tiny preset; write folders.

Nothing is fetched from the network. The family (given, or detected from the folder) says which
component folders a snapshot holds and loads them (`editkit.models.family.ModelFamily`); this
module checks the files first, so that a missing or damaged file is one line naming it. The
transformer may come from another folder (`transformer=`): either a component folder (config.json
+ weights) or a snapshot root holding transformer/.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from editkit.errors import UserError
from editkit.models.families import DEFAULT_FAMILY, detect_family, get_family
from editkit.models.family import VIEW_AREAS

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

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


def missing_files(folder: Path, component_files: dict) -> list[str]:
    """Paths (relative to `folder`) of required component files (name -> globs) that are absent."""
    missing = []
    for name, requirements in component_files.items():
        for requirement in requirements:
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


@contextlib.contextmanager
def weights_that_fit(root: Path):
    """Weights that parse but do not fit their config (a damaged header names other tensors or
    shapes, an edited config.json asks for other sizes) are one line, not the loader's traceback.
    The loaders say it as a ValueError (shape mismatch); tensors a header lacks stay on the meta
    device, which `load_model` checks after loading."""
    try:
        yield
    except (ValueError, NotImplementedError, KeyError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"{root}: its weights do not fit its config.json ({reason}); re-download the model "
                        "or save it again") from None


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
    `compile` compiles the transformer's repeated blocks with torch.compile. On a device other
    than the CPU (e.g. each torchrun rank's own GPU), a folder's weights are read straight onto
    it, shard by shard, so host memory never holds the whole model.
    """
    for option, side in (("--vae-image-size", vae_image_size), ("--vlm-image-size", vlm_image_size)):
        if side is not None and not 16 <= side <= 4096:
            raise UserError(f"{option} {side}: give a side in pixels from 16 to 4096")
    import torch

    torch_type = torch_dtype(dtype)
    given = {key: int(side) ** 2 for key, side in (("vae_image_area", vae_image_size),
                                                  ("vlm_image_area", vlm_image_size)) if side is not None}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stream_to = None if torch.device(device).type == "cpu" else device  # CPU loading is unchanged
    if is_tiny_spec(spec):
        spec_family = get_family(str(spec).partition(":")[2] or family or DEFAULT_FAMILY)
        model = spec_family.build_tiny(seed=seed, areas=given)
    else:
        root = Path(spec)
        transformer_dir, spec_family, areas = inspect_folder(root, family, transformer)
        with weights_that_fit(root):
            model = spec_family.load_folder(root, transformer_dir, torch_type, {**areas, **given}, device=stream_to)
        for name, module in model.modules().items():
            missing = next((n for n, p in module.named_parameters() if p.is_meta), None)
            if missing is not None:  # the file's header names other tensors than the config needs
                raise UserError(f"{root}/{name}: its weights lack {missing} (a damaged or mismatched safetensors "
                                "file); re-download the model or save it again")
    if transformer is not None and is_tiny_spec(spec):
        transformer_dir = _transformer_folder(transformer)
        check_files([transformer_dir])
        model.family.check_transformer(_read_json(transformer_dir / "config.json"))
        model = model.with_transformer(model.family.load_transformer(transformer_dir, torch_type, device=stream_to))
    model.to(device=device, dtype=torch_type)  # places what was built or loaded on the CPU; sets model.device
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    if attention_backend:
        set_attention_backend(model.transformer, attention_backend)
    if compile:
        from editkit.models import accel

        accel.fuse_block_ops(model)  # lossless; see editkit/models/accel.py and docs/benchmarks.md
        model.split_prompt_lengths()
        accel.compile_blocks(model)
    return model


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


def inspect_folder(root: Path, family: str | None, transformer: str | Path | None):
    """Check a model folder without loading weights: (transformer folder, family, editkit view areas).

    A UserError names the folder and lists every missing file, or names a damaged JSON or safetensors file.
    """
    if not root.is_dir():
        raise UserError(f"{root}: model folder not found; pass a diffusers-format folder or 'tiny'")
    transformer_dir = root / "transformer"
    if transformer is not None:
        transformer_dir = _transformer_folder(transformer)
    index = _read_json(root / "model_index.json")
    detected = family or detect_family(index, _read_json(transformer_dir / "config.json"))
    files = get_family(detected or DEFAULT_FAMILY).component_files
    needed = {name: globs for name, globs in files.items() if not (name == "transformer" and transformer is not None)}
    missing = missing_files(root, needed)
    if missing:
        raise UserError(f"{root}: incomplete model folder, missing {', '.join(missing)}")
    check_files([root, transformer_dir, *(root / c for c in needed if c != "transformer")])
    spec = get_family(resolve_family(root, transformer_dir, family))
    spec.check_transformer(_read_json(transformer_dir / "config.json"))
    areas = {key: int(index[f"_editkit_{key}"]) for key in VIEW_AREAS if f"_editkit_{key}" in index}
    return transformer_dir, spec, areas


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
    if is_tiny_spec(spec):
        model = load_model(str(spec), family=family, dtype="fp32", device="cpu")
        return {
            "family": model.family.name,
            **{key: getattr(model, key) for key in VIEW_AREAS},
            "transformer_config": dict(model.transformer.config),
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in model.modules().items()},
        }
    root = Path(spec)
    transformer_dir, spec_family, areas = inspect_folder(root, family, transformer)
    weights = {name: transformer_dir if name == "transformer" else root / name
               for name, globs in spec_family.component_files.items() if "*.safetensors*" in globs}
    return {
        "family": spec_family.name,
        **{key: areas.get(key, getattr(spec_family, key)) for key in VIEW_AREAS},
        "transformer_config": _read_json(transformer_dir / "config.json"),
        "parameters": {name: _count_parameters(folder) for name, folder in weights.items()},
    }


def save_model(model, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write a loaded model as a diffusers-format folder its family loads back (atomically);
    `extra` adds `_editkit_<key>` entries to its model_index.json (e.g. what wrote the folder)."""
    from editkit.utils.atomic import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.family.write_folder(model, tmp, extra=extra)
    return out_dir


def save_tiny(out_dir: str | Path, family: str = DEFAULT_FAMILY, seed: int = 0) -> Path:
    """Write the tiny preset of `family` as a diffusers-format folder (atomically)."""
    return save_model(get_family(family).build_tiny(seed=seed), out_dir)
