"""Where on the path each training sample sits (σ in (0, 1]) and how much its loss counts.

Convention (diffusers' flow matching): x_σ = (1-σ)·x0 + σ·noise; σ=1 is pure noise (or, for LBM,
pure source), σ=0 the clean target; the transformer gets σ as its timestep.
"""

from __future__ import annotations

import math

import torch

from editkit.train.config import TimestepConfig


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^mu / (e^mu + 1/σ - 1): the scheduler's `time_shift_type="exponential"`."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_sigmas(cfg: TimestepConfig, n: int, generator: torch.Generator | None = None,
                  image_seq_len: int | None = None, shift: dict | None = None) -> torch.Tensor:
    """n values of σ in (0, 1] drawn as cfg.sampling says (float32, CPU)."""
    if cfg.sampling == "discrete":
        values = torch.tensor(cfg.values, dtype=torch.float32)
        return values[torch.randint(len(values), (n,), generator=generator)]
    if cfg.sampling == "logit_normal":
        return torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator)).clamp(1e-5, 1.0)
    u = 1.0 - torch.rand(n, generator=generator)  # (0, 1]
    if cfg.sampling == "uniform":
        return u
    if image_seq_len is None:
        raise ValueError("shifted timestep sampling needs the image sequence length")
    if shift is None:
        raise ValueError("shifted timestep sampling needs the model's scheduler config (shift=)")
    from editkit.infer.sampler import dynamic_shift_mu

    return exponential_shift(u, dynamic_shift_mu(shift, image_seq_len))


def _bell(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.exp(-2 * (sigmas - 0.5) ** 2) - math.exp(-0.5)


# Mean of the raw bell over σ ~ U(0, 1), so the bell weights average to 1 (as DiffSynth's table does).
_BELL_MEAN = float(_bell(torch.linspace(0, 1, 100001, dtype=torch.float64)).mean())


def loss_weights(kind: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight: none (1), sd3 (the SD3 paper's cosmap) or bell (DiffSynth, mean 1)."""
    if kind == "none":
        return torch.ones_like(sigmas)
    if kind == "sd3":
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3("cosmap", sigmas)
    if kind == "bell":
        return _bell(sigmas) / _BELL_MEAN
    raise ValueError(f"unknown loss weighting {kind!r}")
