"""LoRA files: key layouts, lossless conversion between them, safe save/load, and adapters on a model.

Layouts (module names are the diffusers `QwenImageTransformer2DModel` names, e.g.
`transformer_blocks.0.attn.to_q`; DiffSynth and ComfyUI use the same names):

- ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` — what
  ``QwenImageEditPlusPipeline.load_lora_weights`` reads. On disk the alphas live in the safetensors
  header (``lora_adapter_metadata``, the PEFT ``LoraConfig`` diffusers writes), so diffusers loads
  the file with the right scale; in memory they are ``transformer.<module>.alpha`` tensors.
- ``peft``: ``<module>.lora_A.weight`` — what ``peft.get_peft_model_state_dict`` returns.
- ``diffsynth``: ``<module>.lora_A.default.weight`` — DiffSynth-Studio saves the trainable
  parameters of its PEFT-injected DiT as they are named (adapter name ``default``, no prefix).
- ``comfyui``: ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` plus
  ``diffusion_model.<module>.alpha`` (``lora_A``/``lora_B`` are read too).

Read only: ``kohya`` (``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight``, musubi-tuner
and kohya scripts), turned into the diffusers layout by diffusers' own converter, which folds
each alpha into the weights (same effect, no alpha left); ``flux-bfl``: LoRAs of the Flux
transformer in Black Forest Labs' module names (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ...) with the ``lora_unet_`` (kohya) or ``diffusion_model.`` (ComfyUI)
prefix — ACE++'s released LoRAs — renamed to diffusers' Flux modules; a fused projection
(qkv, linear1) becomes one LoRA per part, each with the whole down matrix, its rows of the up
matrix and the alpha (the same weight change).

Every layout may carry one ``alpha`` per module; the effective scale is ``alpha / rank`` (PEFT's
``lora_alpha / r``); without an alpha the scale is 1. Conversion only renames keys: tensors and
alphas are kept bit for bit, so any round trip is lossless. ComfyUI files always get an alpha
(``rank`` when the source had none, which means the same scale).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from editkit.errors import UserError

LAYOUTS = ("diffusers", "peft", "diffsynth", "comfyui")
"""Layouts editkit writes (and reads); `kohya` files are read too."""
MAX_SCALE = 10.0
"""Largest |scale| of a LoRA applied at inference; beyond it the weights only blow up the image."""
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_COMFY_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIX = "transformer."

# One regex per layout: module name, then which tensor ("A", "B" or "alpha").
_PATTERNS = {
    "diffusers": re.compile(r"^transformer\.(?P<m>.+?)\.(?:(?P<ab>lora_[AB])\.weight|(?P<alpha>alpha))$"),
    "peft": re.compile(r"^(?P<m>.+?)\.(?:(?P<ab>lora_[AB])\.weight|(?P<alpha>alpha))$"),
    "diffsynth": re.compile(r"^(?P<m>.+?)\.(?:(?P<ab>lora_[AB])\.default\.weight|(?P<alpha>alpha))$"),
    "comfyui": re.compile(
        r"^diffusion_model\.(?P<m>.+?)\.(?:(?P<ab>lora_[AB]|lora_down|lora_up)\.weight|(?P<alpha>alpha))$"),
}
_AB = {"lora_A": "A", "lora_B": "B", "lora_down": "A", "lora_up": "B"}


@dataclass
class LoraModule:
    """One adapted linear layer: down (A, rank x in), up (B, out x rank), optional alpha (0-d tensor)."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


def detect_layout(state_dict: dict[str, torch.Tensor], source: str = "LoRA") -> str:
    """Which key layout a LoRA state dict uses (see module docstring); UserError if none fits."""
    keys = list(state_dict)
    if not keys:
        raise UserError(f"{source}: the LoRA has no tensors; is it the right file?")
    if any(_BFL_FLUX.match(k) for k in keys):
        return "flux-bfl"
    if any(k.startswith(_COMFY_PREFIX) for k in keys):
        return "comfyui"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".default.weight" in k for k in keys):
        return "diffsynth"
    if all(k.startswith(_DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise UserError(f"{source}: key {keys[0]!r} is not a LoRA key of any known layout ({', '.join(LAYOUTS)}); "
                    "is it a LoRA file?")


def parse(state_dict: dict[str, torch.Tensor], layout: str | None = None,
          source: str = "LoRA") -> dict[str, LoraModule]:
    """State dict of any layout -> {module name: LoraModule}. UserError on stray or unpaired keys."""
    layout = layout or detect_layout(state_dict, source)
    if layout == "kohya":
        state_dict, layout = _from_kohya(state_dict, source), "diffusers"
    elif layout == "flux-bfl":
        state_dict, layout = _from_bfl_flux(state_dict, source), "diffusers"
    if layout not in LAYOUTS:
        raise UserError(f"{source}: unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    pattern = _PATTERNS[layout]
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None or (layout == "peft" and ".default." in key):
            raise UserError(f"{source}: key {key!r} does not fit the {layout} LoRA layout; "
                            "the file mixes layouts or is not a LoRA")
        slot = "alpha" if match["alpha"] else _AB[match["ab"]]
        parts[match["m"]][slot] = tensor
    modules = {}
    for name, slots in parts.items():
        if "A" not in slots or "B" not in slots:
            missing = "down/A" if "A" not in slots else "up/B"
            raise UserError(f"{source}: module {name!r} has no {missing} weight; the file is incomplete")
        a, b = slots["A"], slots["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{source}: module {name!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)} "
                            "that do not form a LoRA (need A: r x in, B: out x r)")
        modules[name] = LoraModule(a, b, slots.get("alpha"))
    return modules


def _from_kohya(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    try:
        return _convert_non_diffusers_qwen_lora_to_diffusers(dict(state_dict))
    except (ValueError, KeyError, IndexError) as err:
        raise UserError(f"{source}: kohya-style LoRA keys could not be converted ({str(err)[:120]})") from None


_BFL_FLUX = re.compile(r"^(?:lora_unet_|diffusion_model\.)(?P<kind>double|single)_blocks[._](?P<i>\d+)[._]"
                       r"(?P<m>.+?)\.(?:(?P<ab>lora_[AB]|lora_down|lora_up)\.weight|(?P<alpha>alpha))$")
_BFL_FLUX_MODULES = {
    # BFL module (dots as underscores) -> diffusers module(s) of that block; a tuple is a fused
    # projection split into its parts (the up matrix's rows: equal parts, or single blocks' linear1:
    # q, k, v of the width and the MLP of 4 widths)
    "double": {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": "attn.to_out.0",
               "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2", "img_mod_lin": "norm1.linear",
               "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "txt_attn_proj": "attn.to_add_out", "txt_mlp_0": "ff_context.net.0.proj",
               "txt_mlp_2": "ff_context.net.2", "txt_mod_lin": "norm1_context.linear"},
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": "proj_out",
               "modulation_lin": "norm.linear"},
}
_BFL_FLUX_BLOCKS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def _from_bfl_flux(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Flux LoRA in BFL module names -> the diffusers layout (alphas kept as `.alpha` tensors)."""
    parts: dict[tuple, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state_dict.items():
        match = _BFL_FLUX.match(key)
        if match is None:
            raise UserError(f"{source}: key {key!r} does not fit the Flux (BFL names) LoRA layout of the "
                            "file's other keys; the file mixes layouts or is not a LoRA")
        name = match["m"].replace(".", "_")
        if name not in _BFL_FLUX_MODULES[match["kind"]]:
            raise UserError(f"{source}: {match['kind']} block module {match['m']!r} (key {key!r}) has no "
                            "diffusers Flux counterpart editkit knows; is it a LoRA of FLUX.1?")
        slot = "alpha" if match["alpha"] else _AB[match["ab"]]
        parts[(match["kind"], match["i"], name)][slot] = tensor
    out: dict[str, torch.Tensor] = {}
    for (kind, index, name), slots in parts.items():
        if "A" not in slots or "B" not in slots:
            raise UserError(f"{source}: {kind} block {index} module {name!r} lacks its "
                            f"{'down' if 'A' not in slots else 'up'} weight; the file is incomplete")
        targets = _BFL_FLUX_MODULES[kind][name]
        targets = (targets,) if isinstance(targets, str) else targets
        up = slots["B"]
        if up.shape[0] % (7 if len(targets) == 4 else len(targets)):
            raise UserError(f"{source}: {kind} block {index} module {name!r} has an up matrix of {up.shape[0]} "
                            "rows, which does not split into its fused parts; is it a LoRA of FLUX.1?")
        widths = [up.shape[0] // 7] * 3 + [4 * up.shape[0] // 7] if len(targets) == 4 else None
        ups = torch.split(up, widths) if widths else torch.chunk(up, len(targets))
        for target, part in zip(targets, ups):
            module = f"{_DIFFUSERS_PREFIX}{_BFL_FLUX_BLOCKS[kind]}.{index}.{target}"
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = slots["A"], part.contiguous()
            if "alpha" in slots:
                out[f"{module}.alpha"] = slots["alpha"]
    return out


def build(modules: dict[str, LoraModule], layout: str) -> dict[str, torch.Tensor]:
    """{module: LoraModule} -> state dict in `layout` (alphas as `<prefix><module>.alpha`)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    prefix = {"diffusers": _DIFFUSERS_PREFIX, "comfyui": _COMFY_PREFIX}.get(layout, "")
    names = {"diffsynth": ("lora_A.default", "lora_B.default"), "comfyui": ("lora_down", "lora_up")}
    down, up = names.get(layout, ("lora_A", "lora_B"))
    out: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        out[f"{prefix}{name}.{down}.weight"] = mod.A
        out[f"{prefix}{name}.{up}.weight"] = mod.B
        alpha = mod.alpha
        if alpha is None and layout == "comfyui":
            alpha = torch.tensor(float(mod.rank))
        if alpha is not None:
            out[f"{prefix}{name}.alpha"] = alpha
    return out


def convert(state_dict: dict[str, torch.Tensor], to: str, source: str = "LoRA") -> dict[str, torch.Tensor]:
    """Rename a LoRA state dict into layout `to` (tensors untouched; see module docstring)."""
    return build(parse(state_dict, source=source), to)


def peft_config(modules: dict[str, LoraModule]) -> dict:
    """PEFT `LoraConfig` kwargs reproducing each module's rank and alpha (the diffusers metadata shape)."""
    ranks = {name: mod.rank for name, mod in modules.items()}
    alphas = {name: float(mod.rank if mod.alpha is None else float(mod.alpha)) for name, mod in modules.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}": v for n, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(modules),
    }


def _alphas_from_metadata(names: list[str], config: dict) -> dict[str, float]:
    pattern = {k.lstrip("^"): v for k, v in config.get("alpha_pattern", {}).items()}
    out = {}
    for name in names:
        hit = next((v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{k}", name)), None)
        out[name] = float(config["lora_alpha"] if hit is None else hit)
    return out


def save_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], layout: str = "diffusers",
              metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA as safetensors in `layout`, atomically. Diffusers files carry the PEFT config.

    `metadata` (str -> str) goes into the safetensors header (e.g. base model, steps, trigger).
    """
    from safetensors.torch import save_file

    from editkit.utils.atomic import atomic_path

    modules = parse(state_dict)
    header = {"format": "pt", "editkit_layout": layout, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if layout == "diffusers":
        header[METADATA_KEY] = json.dumps(
            {f"transformer.{k}": v for k, v in peft_config(modules).items()}, sort_keys=True)
        modules = {n: LoraModule(m.A, m.B) for n, m in modules.items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in build(modules, layout).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (.safetensors, or .pt/.bin/.ckpt with weights_only) -> (state dict, header metadata).

    A diffusers file's alphas come back from its PEFT config as `transformer.<module>.alpha` tensors,
    so `convert` and `save_lora` see the same thing whatever the layout.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        else:
            header = {}
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise many types for a bad file
        raise UserError(f"{path}: cannot read the LoRA ({err.__class__.__name__}: {str(err)[:120]}); "
                        "is it a .safetensors LoRA file?") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
    layout = detect_layout(state_dict, str(path))
    if layout == "diffusers" and METADATA_KEY in header:
        config = {k.removeprefix("transformer."): v for k, v in json.loads(header[METADATA_KEY]).items()}
        modules = parse(state_dict, layout, str(path))
        if "lora_alpha" in config:
            for name, alpha in _alphas_from_metadata(list(modules), config).items():
                state_dict[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    _check_finite(state_dict, path)
    return state_dict, header


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A NaN or inf weight turns every edit into a black image: refuse the file, naming the tensor."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {key!r} holds NaN or inf values; the LoRA is broken "
                            "(a diverged training run?) — use an earlier checkpoint")


# --- adapters on a live transformer (diffusers' PEFT integration) -------------------------------

@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to apply: file path and strength (CLI form `PATH[:SCALE]`)."""

    path: str
    scale: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_SCALE:
            raise UserError(f"LoRA {self.path}: scale {self.scale} is out of range; use a finite scale from "
                            f"-{MAX_SCALE:g} to {MAX_SCALE:g} (1 = as trained)")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UserError(f"--lora {text!r}: scale {tail!r} is not a number; write PATH or PATH:SCALE") from None
        if not Path(path).is_file():
            raise UserError(f"--lora {text!r}: file {path} not found; write PATH or PATH:SCALE")
        return cls(path, scale)


def add_adapter(transformer, state_dict: dict[str, torch.Tensor], adapter_name: str,
                source: str = "LoRA") -> None:
    """Load a LoRA state dict (any layout) into `transformer` as PEFT adapter `adapter_name`."""
    modules = parse(state_dict, source=source)
    known = {name for name, _ in transformer.named_modules()}
    unknown = sorted(set(modules) - known)
    if unknown:
        raise UserError(f"{source}: {len(unknown)} LoRA module(s) are not in this transformer "
                        f"(first: {unknown[0]!r}); is the LoRA for another model family?")
    for name, mod in modules.items():
        layer = transformer.get_submodule(name)
        if getattr(layer, "base_layer", layer).weight.shape != (mod.B.shape[0], mod.A.shape[1]):
            raise UserError(f"{source}: module {name!r} has LoRA shapes {tuple(mod.B.shape)}x{tuple(mod.A.shape)} "
                            "that do not match the model; is the LoRA for another model size?")
    peft_sd = build({n: LoraModule(m.A, m.B) for n, m in modules.items()}, "peft")
    with warnings.catch_warnings():  # several adapters on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(peft_sd, prefix=None, adapter_name=adapter_name, metadata=peft_config(modules))


def apply_loras(transformer, specs: list[LoraSpec], fuse: bool = False) -> list[str]:
    """Load several LoRA files with their scales as adapters `lora0, lora1, ...`, all active.

    Replaces any adapters loaded before. `fuse=True` merges them into the weights (faster sampling;
    `unload_loras` then restores the base weights by unfusing).
    """
    unload_loras(transformer)
    names = []
    for i, spec in enumerate(specs):
        state_dict, _ = load_lora(spec.path)
        add_adapter(transformer, state_dict, f"lora{i}", source=spec.path)
        names.append(f"lora{i}")
    if names:
        transformer.set_adapters(names, weights=[spec.scale for spec in specs])
        if fuse:
            transformer.fuse_lora(adapter_names=names)
    return names


def adapter_names(transformer) -> list[str]:
    return list(getattr(transformer, "peft_config", {}) or {})


def unload_loras(transformer) -> None:
    """Remove every adapter (unfusing first), restoring the base weights exactly as they were."""
    if not adapter_names(transformer):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(m.merged for m in transformer.modules() if isinstance(m, BaseTunerLayer)):
        transformer.unfuse_lora()
    transformer.unload_lora()
