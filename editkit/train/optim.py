"""Optimisers and learning-rate schedules.

AdamW (fused on CUDA) with gradient clipping, or Prodigy + ScheduleFree (lr 1.0, no clipping).
A schedule-free optimiser keeps two weight sequences: `eval_mode` switches the model to the
averaged weights for validation, previews and saving, `train_mode` switches back before the
next step. For AdamW both are no-ops.
"""

from __future__ import annotations

import torch

from editkit.train.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.name == "prodigy_sf":
        from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree

        return ProdigyPlusScheduleFree(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                       eps=cfg.eps)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """An LR schedule with warm-up (diffusers.optimization.get_scheduler). ScheduleFree gets a constant one."""
    from diffusers.optimization import get_scheduler

    name = "constant" if cfg.name == "prodigy_sf" else cfg.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)


def clips_gradients(cfg: OptimConfig) -> bool:
    return cfg.name != "prodigy_sf" and cfg.max_grad_norm is not None and cfg.max_grad_norm > 0


def _schedule_free(optimizer) -> object | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimisers
    return inner if hasattr(inner, "eval") and hasattr(inner, "train") else None


def eval_mode(optimizer) -> None:
    """Before validation, previews or saving: schedule-free weights to their evaluation point."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.eval()


def train_mode(optimizer) -> None:
    """Before the next optimiser step (undoes eval_mode)."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.train()
