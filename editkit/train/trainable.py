"""What to train: LoRA on the transformer (peft), full fine-tuning, extra modules unfrozen by name.

The last transformer block's text-stream output is never used (the model keeps only the image
stream after the final block), so `attn.to_add_out` and `txt_mlp` of that block never receive a
gradient. editkit leaves them out of LoRA targets and freezes them in full fine-tuning: DDP then
needs no `find_unused_parameters` (which costs an extra graph walk every step) and no optimiser
slot is spent on weights that cannot learn.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from editkit.errors import UserError
from editkit.train.config import ModelSection

# DiffSynth-Studio's Qwen-Image LoRA targets (module-name suffixes).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                   "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
# The 2511 workflows add the input/output projections.
EXPANDED_TARGETS = DEFAULT_TARGETS + ("img_in", "txt_in", "proj_out")


def unused_module_names(transformer: nn.Module) -> list[str]:
    """Modules of the last block's text stream whose output the model discards."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        return []
    last = f"transformer_blocks.{len(blocks) - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_mlp"]


def _is_unused(name: str, unused: list[str]) -> bool:
    return any(name == u or name.startswith(u + ".") for u in unused)


def _matches(name: str, pattern: str) -> bool:
    """A glob (`*.attn.to_q`, `transformer_blocks.1*`) matches the full name; a plain name matches a suffix."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def lora_target_modules(transformer: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the Linear modules a LoRA goes on, without the unused last-block text modules."""
    if targets == "default":
        patterns = list(DEFAULT_TARGETS)
    elif targets == "expanded":
        patterns = list(EXPANDED_TARGETS)
    elif targets == "all-linear":
        patterns = ["*"]
    elif isinstance(targets, str):
        patterns = [targets]
    else:
        patterns = list(targets)
    unused = unused_module_names(transformer)
    names = [n for n, m in transformer.named_modules()
             if isinstance(m, nn.Linear) and not _is_unused(n, unused) and any(_matches(n, p) for p in patterns)]
    if not names:
        raise UserError(f"train.lora.targets: {targets!r} matches no Linear module of the transformer; "
                        "use default, expanded, all-linear or module-name patterns such as '*.attn.to_q'")
    return names


def add_lora(transformer: nn.Module, section: ModelSection) -> list[str]:
    """Freeze the transformer and add a peft LoRA adapter ("default"); returns the target modules."""
    from peft import LoraConfig

    cfg = section.lora
    targets = lora_target_modules(transformer, cfg.targets)
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


def setup_trainable(transformer: nn.Module, section: ModelSection) -> dict:
    """Apply train.mode (lora / full) and train.unfreeze; freeze the unused last-block text modules."""
    info: dict = {"mode": section.mode}
    if section.mode == "lora":
        info["lora_targets"] = add_lora(transformer, section)
    else:
        transformer.requires_grad_(True)
    if section.unfreeze:
        info["unfrozen"] = unfreeze(transformer, section.unfreeze)
    for name in unused_module_names(transformer):
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
