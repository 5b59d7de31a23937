"""Load a model of any family from a local diffusers-format folder or a tiny preset; write folders.

Nothing is fetched from the network. The family (given, or detected from the folder) says which
component folders a snapshot holds and loads them (`editkit.models.family.ModelFamily`); this
module checks the files first, so that a missing or damaged file is one line naming it. The
transformer may come from another folder (`transformer=`): either a component folder (config.json
+ weights) or a snapshot root holding transformer/. So may the VAE and the text encoder (`vae=`,
`text_encoder=`, the CLI's --vae / --text-encoder): the family then loads a view of the model
folder whose vae/ or text_encoder/ is the other folder (symlinks in a temporary folder), so
every family takes them without knowing; a replacement is checked first (its files, and the
config keys that decide how it fits the rest: class, latent channels, downsampling levels,
hidden size, vocabulary), and messages name the real folders.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from editkit.errors import UserError
from editkit.models.families import DEFAULT_FAMILY, detect_family, get_family
from editkit.models.family import VIEW_AREAS

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

TINY_PREFIX = "tiny"

COMPONENT_OPTIONS = {"vae": "--vae", "text_encoder": "--text-encoder"}
"""Components `load_model` takes from another folder (beside the transformer), with their CLI option."""
_FIT_KEYS = ("_class_name", "model_type", "architectures", "z_dim", "latent_channels", "in_channels",
             "input_channels", "out_channels", "hidden_size", "vocab_size", "projection_dim", "d_model")
_LEVEL_KEYS = ("dim_mult", "block_out_channels", "temperal_downsample")
"""Config lists whose length is a number of downsampling levels."""


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


def component_folder(name: str, path: str | Path, option: str) -> Path:
    """A component given on the command line: the folder itself (config.json + weights) or `path/<name>`."""
    path = Path(path)
    if (path / name).is_dir():
        path = path / name
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors*")):
        raise UserError(f"{option} {path}: not a {name} folder (needs config.json and *.safetensors); pass a "
                        f"diffusers {name} folder or a model folder containing {name}/")
    return path


def _fit_keys(config: dict) -> dict:
    """The config values that decide whether a component fits the others (nested text_config included)."""
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    out = {key: config.get(key, nested.get(key)) for key in _FIT_KEYS}
    out.update({f"len({key})": len(config[key]) for key in _LEVEL_KEYS if isinstance(config.get(key), list)})
    return {key: value for key, value in out.items() if value is not None}


def check_components(root: Path, family, components: dict[str, Path]) -> None:
    """Each replacement folder holds the family's files for it, readable, and fits the folder's own
    component where the model folder has one (same `_fit_keys`); a UserError names the option and folder."""
    for name, folder in components.items():
        option = COMPONENT_OPTIONS[name]
        if name not in family.component_files:
            raise UserError(f"{option}: family {family.name} has no {name}/ component; leave {option} out")
        missing = missing_files(folder.parent, {folder.name: family.component_files[name]})
        if missing:
            raise UserError(f"{option} {folder}: incomplete {name} folder, missing {', '.join(missing)}")
        check_files([folder])
        own = root / name / "config.json"
        if not own.is_file():
            continue
        theirs, ours = _fit_keys(_read_json(folder / "config.json")), _fit_keys(_read_json(own))
        differ = [f"{key}={theirs[key]!r} (the model's: {ours[key]!r})" for key in sorted(set(theirs) & set(ours))
                  if theirs[key] != ours[key]]
        if differ:
            raise UserError(f"{option} {folder}: does not fit the model {root}: its config.json has "
                            f"{', '.join(differ)}; give a {name} of the model's architecture")


@contextlib.contextmanager
def folder_view(root: Path, components: dict[str, Path]):
    """`root` with its `name/` entries replaced by `components` (symlinks in a temporary folder), for a
    family's `load_folder`; messages about the view name the real folders. Nothing replaced: `root`."""
    if not components:
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="editkit-view-") as tmp:
        view = Path(tmp) / root.name
        view.mkdir()
        for entry in root.iterdir():
            if entry.name not in components:
                (view / entry.name).symlink_to(entry.absolute())
        for name, folder in components.items():
            (view / name).symlink_to(folder.absolute())
        try:
            yield view
        except UserError as err:
            message = str(err)
            for name, folder in components.items():
                message = message.replace(str(view / name), str(folder))
            raise UserError(message.replace(str(view), str(root))) from None


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
def weights_that_fit(root: Path | str):
    """Weights that parse but do not fit their config (a damaged header names other tensors or
    shapes, an edited config.json asks for other sizes) are one line, not the loader's traceback.
    The loaders say it as a ValueError (shape mismatch); tensors a header lacks stay on the meta
    device, which `load_model` checks after loading. `root` is what the message names."""
    try:
        yield
    except (ValueError, NotImplementedError, KeyError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"{root}: its weights do not fit its config.json ({reason}); re-download the model "
                        "or save it again") from None


def _model_label(root: Path, components: dict[str, Path]) -> str:
    """The model folder as messages name it: with the replaced components, when there are."""
    extra = "".join(f" {COMPONENT_OPTIONS[name]} {folder}" for name, folder in components.items())
    return f"{root} (with{extra})" if extra else str(root)


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
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
):
    """Load an EditModel.

    spec: a local diffusers-format folder, or "tiny" / "tiny:<family>" (built in code with
    `seed`). `transformer`, `vae`, `text_encoder`: take that component from another folder (a
    component folder, or a model folder holding it; not with a tiny spec for `vae` and
    `text_encoder`, whose preset builds them in code). `vae_image_size` / `vlm_image_size` are the
    side (pixels) of the square whose area the VAE / VLM views of source images keep (defaults: the
    family's, 1024 and 384; tiny: 64).
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
    components = given_components(spec, vae=vae, text_encoder=text_encoder)
    if is_tiny_spec(spec):
        spec_family = get_family(str(spec).partition(":")[2] or family or DEFAULT_FAMILY)
        model = spec_family.build_tiny(seed=seed, areas=given)
    else:
        root = Path(spec)
        transformer_dir, spec_family, areas = inspect_folder(root, family, transformer, components)
        with weights_that_fit(_model_label(root, components)), folder_view(root, components) as view:
            model = spec_family.load_folder(view, transformer_dir, torch_type, {**areas, **given}, device=stream_to)
        for name, module in model.modules().items():
            missing = next((n for n, p in module.named_parameters() if p.is_meta), None)
            if missing is not None:  # the file's header names other tensors than the config needs
                where = components.get(name, f"{root}/{name}")
                raise UserError(f"{where}: its weights lack {missing} (a damaged or mismatched safetensors "
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


def component_paths(**paths) -> dict[str, str]:
    """The component folders given (`vae=`, `text_encoder=`; None: the model's own), as `load_model`
    keywords: what commands pass on, record in outputs' settings and stamp in fingerprints."""
    unknown = set(paths) - set(COMPONENT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown components {sorted(unknown)}; known: {sorted(COMPONENT_OPTIONS)}")
    return {name: str(path) for name, path in paths.items() if path is not None}


def given_components(spec, **paths) -> dict[str, Path]:
    """The checked component folders given for `spec` (`vae=`, `text_encoder=`; None: the model's own)."""
    chosen = component_paths(**paths)
    if chosen and is_tiny_spec(spec):
        option = COMPONENT_OPTIONS[next(iter(chosen))]
        raise UserError(f"{option}: needs a model folder; the tiny preset builds every component in code "
                        "(write it as a folder with `editkit model save-tiny DIR` and pass --model DIR)")
    return {name: component_folder(name, path, COMPONENT_OPTIONS[name]) for name, path in chosen.items()}


def inspect_folder(root: Path, family: str | None, transformer: str | Path | None,
                   components: dict[str, Path] | None = None):
    """Check a model folder without loading weights: (transformer folder, family, editkit view areas).

    `components` (from `given_components`) replace the folder's own, which it then need not have.
    A UserError names the folder and lists every missing file, or names a damaged JSON or safetensors file.
    """
    components = components or {}
    if not root.is_dir():
        raise UserError(f"{root}: model folder not found; pass a diffusers-format folder or 'tiny'")
    transformer_dir = root / "transformer"
    if transformer is not None:
        transformer_dir = _transformer_folder(transformer)
    index = _read_json(root / "model_index.json")
    detected = family or detect_family(index, _read_json(transformer_dir / "config.json"))
    files = get_family(detected or DEFAULT_FAMILY).component_files
    needed = {name: globs for name, globs in files.items()
              if not (name == "transformer" and transformer is not None) and name not in components}
    missing = missing_files(root, needed)
    if missing:
        raise UserError(f"{root}: incomplete model folder, missing {', '.join(missing)}")
    check_files([root, transformer_dir, *(root / c for c in needed if c != "transformer")])
    spec = get_family(resolve_family(root, transformer_dir, family))
    spec.check_transformer(_read_json(transformer_dir / "config.json"))
    check_components(root, spec, components)
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
