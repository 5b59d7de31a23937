"""Adapter bundles: a LoRA and the modules trained fully beside it (`train.extra_modules`), one file.

A bundle is one safetensors file (`adapter.safetensors` in a run's `final/` and checkpoints' `export/`):
- `transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`: the LoRA in editkit's diffusers
  layout (editkit.models.lora; the alphas as 0-d tensors, so the file round-trips bit for bit);
- `editkit_extra.<param>`: the extra modules' weights. A family module (`ste`, editkit.models.ste)
  keeps its own parameter names under its name (`editkit_extra.ste.weight`); an existing module
  trained fully (`img_in`, `norm_out`, a glob) keeps its transformer parameter names
  (`editkit_extra.img_in.weight`), whose trained values replace the base model's;
- header `editkit_adapter`: JSON metadata — format version, base family and model, the LoRA's
  ranks, alphas and target modules (PEFT `LoraConfig` fields), the extra modules in training
  order (name, kind, parameters), the RoPE frame mode it was trained with, the training config's digest and the step.

The LoRA files of the usual layouts (diffusers, ComfyUI, DiffSynth) are still written beside the
bundle. `AppliedBundle` puts a bundle on a loaded model with switches per extra module (the
`--without ste` ablation, the app's check boxes); `apply_adapters` loads `--lora` files and the
bundle's LoRA together as PEFT adapters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editkit.errors import UserError

BUNDLE_FILE = "adapter.safetensors"
META_KEY = "editkit_adapter"
FORMAT_VERSION = 1
EXTRA_PREFIX = "editkit_extra."
LORA_PREFIX = "transformer."
ADAPTER_NAME = "adapter"
"""The PEFT adapter name of a bundle's LoRA on a live transformer (`--lora` files are lora0, lora1, ...)."""
FAMILY_KIND, MODULE_KIND = "family", "module"


def submodule_name(name: str) -> str:
    """Where family extra module `name` lives on the transformer (`editkit_ste`)."""
    return f"editkit_{name}"


def family_extras(family) -> dict:
    """A family's new modules (`ModelFamily.extra_modules`, optional): name -> factory."""
    offered = getattr(family, "extra_modules", None)
    return dict(offered()) if offered is not None else {}


def transformer_param(name: str, kind: str, param: str) -> str:
    """The transformer parameter of a bundle parameter of extra module `name`."""
    return f"{submodule_name(name)}.{param.removeprefix(name + '.')}" if kind == FAMILY_KIND else param


def bundle_param(name: str, kind: str, param: str) -> str:
    """A transformer parameter of extra module `name` as the bundle names it."""
    return f"{name}.{param.removeprefix(submodule_name(name) + '.')}" if kind == FAMILY_KIND else param


# ----- the file ----------------------------------------------------------------------------------

@dataclass
class ExtraModule:
    """One extra module's weights: `kind` "family" (a module the family adds) or "module" (an
    existing transformer module trained fully); `tensors` by bundle parameter name."""

    kind: str
    tensors: dict[str, torch.Tensor]


@dataclass
class Bundle:
    """A bundle in memory: the LoRA (editkit's diffusers layout), the extra modules, the metadata.

    `meta` holds what the header says beyond the tensors: `family`, `base_model`, `rope_frames`,
    `config_digest`, `step`, ... (`save_bundle` adds the LoRA config and the extras' parameters)."""

    lora: dict[str, torch.Tensor]
    extras: dict[str, ExtraModule] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return self.meta.get("family")

    @property
    def rope_frames(self) -> str:
        return self.meta.get("rope_frames", "own")

    def header(self) -> dict:
        """The metadata as written: `meta` plus the format version, the LoRA config and the extras."""
        from editkit.models import lora

        config = lora.peft_config(lora.parse(self.lora, "diffusers")) if self.lora else None
        extras = [{"name": name, "kind": extra.kind, "params": sorted(extra.tensors)}
                  for name, extra in self.extras.items()]  # a list: the order of train.extra_modules
        return {**self.meta, "version": FORMAT_VERSION, "lora": config, "extra_modules": extras}


def save_bundle(path: str | os.PathLike, bundle: Bundle) -> Path:
    """Write `bundle` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from editkit.utils.atomic import atomic_path

    tensors = {}
    for key, tensor in bundle.lora.items():
        if not key.startswith(LORA_PREFIX):
            raise ValueError(f"bundle LoRA key {key!r} is not in the diffusers layout")
        tensors[key] = tensor
    for name, extra in bundle.extras.items():
        for param, tensor in extra.tensors.items():
            key = EXTRA_PREFIX + param
            if key in tensors:
                raise UserError(f"train.extra_modules: parameter {param} belongs to two extra modules; name each "
                                "module once")
            tensors[key] = tensor
    header = {"format": "pt", META_KEY: json.dumps(bundle.header(), sort_keys=True)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """A bundle's header metadata (no tensors read); UserError when the file is no bundle."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--adapter {path}: file not found; give the adapter.safetensors of a training run")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"--adapter {path}: cannot read it ({err.__class__.__name__}); is it an adapter "
                        "bundle (.safetensors)?") from None
    if META_KEY not in header:
        raise UserError(f"--adapter {path}: not an editkit adapter bundle (no {META_KEY} metadata); a plain LoRA "
                        "file goes to --lora")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError:
        raise UserError(f"--adapter {path}: damaged {META_KEY} metadata; export the bundle again") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"--adapter {path}: bundle format {meta.get('version') if isinstance(meta, dict) else '?'} "
                        f"is not one this editkit reads ({FORMAT_VERSION}); update editkit")
    return meta


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle file; UserError for a file that is not a complete bundle."""
    from safetensors import safe_open

    meta = read_meta(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lora_sd = {k: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    extras, listed = {}, set()
    for spec in meta.pop("extra_modules") or []:
        name = spec["name"]
        missing = [p for p in spec["params"] if EXTRA_PREFIX + p not in tensors]
        if missing:
            raise UserError(f"--adapter {path}: extra module {name!r} lacks tensor {EXTRA_PREFIX}{missing[0]}; "
                            "the file is incomplete")
        extras[name] = ExtraModule(spec["kind"], {p: tensors[EXTRA_PREFIX + p] for p in spec["params"]})
        listed |= {EXTRA_PREFIX + p for p in spec["params"]}
    stray = sorted(set(tensors) - set(lora_sd) - listed)
    if stray:
        raise UserError(f"--adapter {path}: tensor {stray[0]!r} belongs to no LoRA module or extra module; "
                        "the file was changed after export")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"--adapter {path}: tensor {key!r} holds NaN or inf values (a diverged run?); "
                            "use an earlier checkpoint's bundle")
    meta.pop("version")
    meta.pop("lora")
    return Bundle(lora=lora_sd, extras=extras, meta=meta)


def check_family(meta: dict, family: str, source: str) -> None:
    if meta.get("family") != family:
        raise UserError(f"--adapter {source}: a bundle for family {meta.get('family')}, but the model is {family}; "
                        "use a bundle trained on this model's family")


# ----- on a loaded model -------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterChoice:
    """What `--adapter BUNDLE --without NAME --rope-frames MODE` ask for, checked before the model loads.

    `rope_frames` is the mode to run: the one given, else the bundle's (`own` without a bundle)."""

    path: str | None = None
    without: tuple[str, ...] = ()
    rope_frames: str = "own"

    @classmethod
    def parse(cls, path: str | os.PathLike | None, without: Sequence[str] | None = None,
              rope_frames: str | None = None) -> AdapterChoice:
        from editkit.models.rope_frames import check

        without = tuple(without or ())
        if rope_frames is not None:
            check(rope_frames)
        if path is None:
            if without:
                raise UserError(f"--without {without[0]}: names an extra module of an adapter bundle; give --adapter")
            return cls(rope_frames=rope_frames or "own")
        meta = read_meta(path)
        known = [spec["name"] for spec in meta.get("extra_modules") or []]
        for name in without:
            if name not in known:
                raise UserError(f"--without {name}: the bundle {path} has no extra module of that name; it has "
                                f"{', '.join(known) or 'none'}")
        return cls(str(path), without, rope_frames or meta.get("rope_frames", "own"))


class AppliedBundle:
    """A bundle's extra modules on a loaded model, each switched on or off; its LoRA for `apply_adapters`.

    Family modules are attached to the transformer (editkit.models.ste) with the bundle's weights;
    for an existing module the base weights are kept on the CPU, so switching it off (or `remove`)
    puts them back exactly.
    """

    def __init__(self, bundle: Bundle, model, path: str, without: Iterable[str] = ()):
        from editkit.utils.fingerprint import file_digest

        check_family(bundle.meta, model.family.name, path)
        self.path, self.sha256 = str(path), file_digest(path)
        self.meta = bundle.meta
        self.lora = bundle.lora
        self.transformer = model.transformer
        self._family_modules: dict[str, torch.nn.Module] = {}
        self._trained: dict[str, dict[str, torch.Tensor]] = {}
        self._base: dict[str, dict[str, torch.Tensor]] = {}
        factories = family_extras(model.family)
        for name, extra in bundle.extras.items():
            if extra.kind == FAMILY_KIND:
                if name not in factories:
                    raise UserError(f"--adapter {path}: extra module {name!r} is not one family {model.family.name} "
                                    "offers; use an editkit that knows it")
                self._attach(name, extra, factories[name])
            else:
                self._trained[name] = extra.tensors
                self._base[name] = {p: self._param(p).detach().to("cpu", copy=True) for p in extra.tensors}
        self.names = list(bundle.extras)
        self.active: list[str] = []
        self.set_active([n for n in self.names if n not in set(without)])

    def _attach(self, name: str, extra: ExtraModule, factory) -> None:
        module = factory(self.transformer, submodule_name(name))
        state = {param.removeprefix(name + "."): t for param, t in extra.tensors.items()}
        own = module.state_dict()
        wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if wrong or set(state) - set(own):
            module.detach(self.transformer, submodule_name(name))
            raise UserError(f"--adapter {self.path}: extra module {name!r} does not fit this model "
                            f"(parameter {(wrong or sorted(set(state) - set(own)))[0]!r}); is the bundle for "
                            "another model size?")
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)
        self._family_modules[name] = module

    def _param(self, name: str) -> torch.nn.Parameter:
        params = dict(self.transformer.named_parameters())
        if name in params:
            return params[name]
        why = ("a --lora file adapts that module; load that LoRA without it" if any(
            n.replace(".base_layer", "") == name for n in params) else "this model has no such parameter")
        raise UserError(f"--adapter {self.path}: the bundle replaces {name}, but {why}")

    def set_active(self, names: Iterable[str]) -> None:
        """Switch on exactly the extra modules `names` (the others off)."""
        names = list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise UserError(f"adapter extra {unknown[0]!r} is not in the bundle; it has {', '.join(self.names)}")
        for name, module in self._family_modules.items():
            module.set_active(name in names)
        with torch.no_grad():
            for name in self._trained:
                values = self._trained[name] if name in names else self._base[name]
                for param, tensor in values.items():
                    self._param(param).copy_(tensor)
        self.active = [n for n in self.names if n in names]

    def check_loras(self) -> None:
        """UserError when a loaded LoRA wraps a module whose weights the bundle replaces."""
        for name in self._trained:
            for param in self._trained[name]:
                self._param(param)

    def remove(self) -> None:
        """Put the base weights back and detach the family modules."""
        self.set_active([])
        for name, module in self._family_modules.items():
            module.detach(self.transformer, submodule_name(name))
        self._family_modules = {}

    def settings(self) -> dict:
        """For outputs' settings, run manifests and fingerprints: the file, its sha256, which extras were on."""
        return {"path": self.path, "sha256": self.sha256, "extras": self.active,
                "without": [n for n in self.names if n not in self.active]}


def apply_adapters(transformer, specs: Sequence, applied: AppliedBundle | None, fuse: bool = False) -> list[str]:
    """The `--lora` files (`LoraSpec`s, adapters lora0, lora1, ...) and the bundle's LoRA (adapter
    "adapter", scale 1) as the transformer's active adapters, replacing any loaded before;
    `fuse` merges them into the weights (editkit.models.lora.apply_loras)."""
    from editkit.models import lora

    names = lora.apply_loras(transformer, list(specs))
    weights = [spec.scale for spec in specs]
    if applied is not None and applied.lora:
        lora.add_adapter(transformer, applied.lora, ADAPTER_NAME, source=applied.path)
        names, weights = [*names, ADAPTER_NAME], [*weights, 1.0]
        transformer.set_adapters(names, weights=weights)
    if applied is not None:
        applied.check_loras()
    if fuse and names:
        transformer.fuse_lora(adapter_names=names)
    return names
