"""What to train: LoRA on the transformer (peft), full fine-tuning, extra modules (new ones a family
offers, existing ones by name) trained beside the LoRA, modules unfrozen by name.

Which modules a named LoRA preset (`train.lora.targets: default | expanded`) covers is a fact of
the model family (`family.lora_targets`), and so is which modules never receive a gradient
(`family.unused_modules(transformer)`: for Qwen-Image the last block's text stream, whose output
the model discards). editkit leaves those out of LoRA targets and freezes them in full
fine-tuning: DDP then needs no `find_unused_parameters` (which costs an extra graph walk every
step) and no optimiser slot is spent on weights that cannot learn.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from editkit.errors import UserError
from editkit.train.config import ModelSection

ALL_LINEAR = "all-linear"


def _is_unused(name: str, unused: list[str]) -> bool:
    return any(name == u or name.startswith(u + ".") for u in unused)


def _matches(name: str, pattern: str) -> bool:
    """A glob (`*.attn.to_q`, `transformer_blocks.1*`) matches the full name; a plain name matches a suffix."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def lora_target_modules(transformer: nn.Module, targets: str | list[str], family) -> list[str]:
    """Full names of the Linear modules a LoRA goes on, without the family's unused modules.

    `targets`: a preset of `family.lora_targets`, "all-linear", or module-name patterns.
    """
    if isinstance(targets, str) and targets in family.lora_targets:
        patterns = list(family.lora_targets[targets])
    elif targets == ALL_LINEAR:
        patterns = ["*"]
    elif isinstance(targets, str):
        patterns = [targets]
    else:
        patterns = list(targets)
    unused = family.unused_modules(transformer)
    names = [n for n, m in transformer.named_modules()
             if isinstance(m, nn.Linear) and not _is_unused(n, unused) and any(_matches(n, p) for p in patterns)]
    if not names:
        raise UserError(f"train.lora.targets: {targets!r} matches no Linear module of the transformer; "
                        f"use {', '.join([*family.lora_targets, ALL_LINEAR])} or module-name patterns such as "
                        "'*.attn.to_q'")
    return names


def add_lora(transformer: nn.Module, section: ModelSection, family) -> list[str]:
    """Freeze the transformer and add a peft LoRA adapter ("default"); returns the target modules."""
    from peft import LoraConfig

    cfg = section.lora
    targets = lora_target_modules(transformer, cfg.targets, family)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=cfg.dropout,
        init_lora_weights=True if cfg.init == "default" else "gaussian",
        target_modules=targets,
    ))
    return targets


def unfreeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Make parameters of the modules matching the patterns trainable; returns the module names."""
    names = []
    for pattern in patterns:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
        if not hits:
            raise UserError(f"train.unfreeze: {pattern!r} matches no module of the transformer; "
                            "give module names such as 'img_in' or globs such as 'transformer_blocks.0.*'")
        for n in hits:
            model.get_submodule(n).requires_grad_(True)
        names += hits
    return names


def add_extra_modules(transformer: nn.Module, names: list[str], family, lora_targets: list[str]) -> dict:
    """train.extra_modules: trained fully beside the LoRA and saved with it as an adapter bundle
    (editkit.models.adapter_bundle).

    A name the family offers (`extra_modules()`, e.g. `ste`) attaches that new, zero-initialised
    module; any other name is a module-name pattern (as train.unfreeze: `img_in`, `norm_out`, a
    glob) whose existing modules are unfrozen. Returns {name: {"kind", "params": [transformer
    parameter names]}}, which the export turns into the bundle.
    """
    from editkit.models import adapter_bundle as ab

    offered = ab.family_extras(family)
    extras: dict = {}
    owner: dict[str, str] = {}
    for name in names:
        if name in offered:
            module = offered[name](transformer, ab.submodule_name(name))
            module.requires_grad_(True)
            params = [f"{ab.submodule_name(name)}.{p}" for p, _ in module.named_parameters()]
            kind = ab.FAMILY_KIND
        else:
            unused = family.unused_modules(transformer)
            hits = [n for n, _ in transformer.named_modules() if n and _matches(n, name) and not _is_unused(n, unused)]
            if not hits:
                raise UserError(f"train.extra_modules: {name!r} is neither a module family {family.name} offers "
                                f"({', '.join(offered) or 'none'}) nor matches a module of the transformer; give "
                                "module names such as 'img_in' or globs such as 'transformer_blocks.0.*'")
            adapted = [h for h in hits if any(h == t or h.startswith(t + ".") or t.startswith(h + ".")
                                              for t in lora_targets)]
            if adapted:
                raise UserError(f"train.extra_modules: {name!r} covers {adapted[0]}, which the LoRA adapts "
                                "(train.lora.targets); train a module one way: leave it out of one list")
            params = sorted({f"{h}.{p}" for h in hits for p, _ in transformer.get_submodule(h).named_parameters()
                             if not _is_unused(f"{h}.{p}", unused)})
            if not params:
                raise UserError(f"train.extra_modules: {name!r} matches modules without weights ({hits[0]}); "
                                "name modules that have parameters")
            for param in params:
                transformer.get_parameter(param).requires_grad_(True)
            kind = ab.MODULE_KIND
        for param in params:
            if param in owner:
                raise UserError(f"train.extra_modules: {name!r} and {owner[param]!r} both cover {param}; name each "
                                "module once")
            owner[param] = name
        extras[name] = {"kind": kind, "params": params}
    return extras


def setup_trainable(transformer: nn.Module, section: ModelSection, family) -> dict:
    """Apply train.mode (lora / full), train.extra_modules and train.unfreeze; freeze the family's
    unused modules.

    `family`: the model family (`EditModel.family`), for its LoRA presets, extra and unused modules.
    """
    info: dict = {"mode": section.mode}
    if section.mode == "lora":
        info["lora_targets"] = add_lora(transformer, section, family)
        if section.extra_modules:
            info["extra_modules"] = add_extra_modules(transformer, section.extra_modules, family,
                                                      info["lora_targets"])
    else:
        transformer.requires_grad_(True)
    if section.unfreeze:
        info["unfrozen"] = unfreeze(transformer, section.unfreeze)
    for name in family.unused_modules(transformer):
        transformer.get_submodule(name).requires_grad_(False)
    if section.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    info["trainable_params"] = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return info


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise UserError(f"{source}: checkpoint weights do not fit this model/config "
                        f"({len(missing)} missing, {len(unknown)} unknown, e.g. {(missing + unknown)[0]}); "
                        "resume with the config the run was started with")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
