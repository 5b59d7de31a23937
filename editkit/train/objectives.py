"""Training objectives on VAE latents: flow matching and latent bridge matching (LBM).

Both work on latents of any shape (B, ...) and a `predict(x_t, sigmas) -> velocity` callable that
already carries the conditioning (instruction embeddings, condition-image latents), so they can
be checked against hand-computed values without a model.

Time convention (diffusers): σ=1 is where sampling starts (noise, or the source for LBM), σ=0 the
target; the network predicts the velocity dx/dσ, i.e. noise - target (flow matching) or
source - target (LBM: the bridge drift).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from editkit.train.config import ObjectiveConfig
from editkit.train.timesteps import loss_weights, sample_sigmas

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to back-propagate
    parts: dict[str, float] = field(default_factory=dict)  # logged components


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None,
                 sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (times an optional per-element map), weighted per sample, averaged."""
    err = (pred.float() - target.float()) ** 2
    if weight_map is not None:
        err = err * weight_map.float()
    per_sample = err.flatten(1).mean(1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


def mask_weight_map(mask: torch.Tensor | None, latent_shape: torch.Size, extra: float) -> torch.Tensor | None:
    """1 + extra·mask at latent resolution (mask: (B,1,H,W) in [0,1], white = edit region).

    The pixel mask is reduced with area averaging to the latents' last two dimensions, so a latent
    cell counts in proportion to how much of it the edit covers.
    """
    if mask is None or extra == 0:
        return None
    small = F.interpolate(mask.float(), size=tuple(latent_shape[-2:]), mode="area")
    small = small.view(small.shape[0], 1, *([1] * (len(latent_shape) - 4)), *small.shape[-2:])
    return 1.0 + extra * small


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_matching_loss(predict: Predict, target: torch.Tensor, cfg: ObjectiveConfig,
                       generator: torch.Generator | None = None, image_seq_len: int | None = None,
                       shift: dict | None = None, mask: torch.Tensor | None = None) -> LossOutput:
    """Rectified flow: x_σ = (1-σ)·x0 + σ·ε, the network predicts ε - x0."""
    b = target.shape[0]
    sigmas = sample_sigmas(cfg.timesteps, b, generator, image_seq_len, shift)
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float32).to(target.device, target.dtype)
    pred = predict(noisy_latents(target, noise, sigmas), sigmas)
    loss = weighted_mse(pred, noise - target, mask_weight_map(mask, target.shape, cfg.mask_weight),
                        loss_weights(cfg.timesteps.weighting, sigmas))
    return LossOutput(loss, {"fm": loss.item()})


def bridge_point(source: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
                  bridge_noise: float) -> torch.Tensor:
    """A point on the Brownian bridge from target (σ=0) to source (σ=1).

    x_σ = σ·x_src + (1-σ)·x_tgt + b·sqrt(σ(1-σ))·ε — the LBM paper's x_t with t = 1 - σ.
    """
    s = _expand(sigmas, target)
    return s * source + (1 - s) * target + bridge_noise * torch.sqrt(s * (1 - s)) * noise


def _bridge_term(predict: Predict, source, target, sigmas, generator, bridge_noise, weight_map):
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float32).to(target.device, target.dtype)
    x_t = bridge_point(source, target, sigmas, noise, bridge_noise)
    pred = predict(x_t, sigmas)
    return weighted_mse(pred, source - target, weight_map), x_t, pred


def lbm_loss(predict: Predict, source: torch.Tensor, target: torch.Tensor, cfg: ObjectiveConfig,
             generator: torch.Generator | None = None, white: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> LossOutput:
    """Latent bridge matching from source latents to target latents (+ sub stream, + pixel loss).

    The sub stream is the same bridge started from the latents of a pure white image (`white`),
    weighted by cfg.lbm.sub_stream_weight. The pixel loss decodes one random latent crop of the
    one-step target estimate x_σ - σ·v and of the true target and compares them with L1.
    """
    lbm = cfg.lbm
    b = target.shape[0]
    sigmas = sample_sigmas(cfg.timesteps, b, generator)
    weight_map = mask_weight_map(mask, target.shape, cfg.mask_weight)
    main, x_t, pred = _bridge_term(predict, source, target, sigmas, generator, lbm.bridge_noise, weight_map)
    loss, parts = main, {"lbm": main.item()}
    if lbm.sub_stream_weight > 0:
        if white is None:
            raise ValueError("the LBM sub stream needs the white-image latents")
        sub, _, _ = _bridge_term(predict, white.expand_as(target), target, sigmas, generator,
                                 lbm.bridge_noise, weight_map)
        loss = loss + lbm.sub_stream_weight * sub
        parts["lbm_sub"] = sub.item()
    if lbm.pixel_loss_weight > 0:
        if decode is None:
            raise ValueError("the LBM pixel loss needs the VAE decoder")
        estimate = x_t - _expand(sigmas, x_t) * pred
        crop_est, crop_tgt = random_latent_crop(estimate, target, lbm.pixel_crop, generator)
        with torch.no_grad():
            ref = decode(crop_tgt)
        pix = (decode(crop_est).float() - ref.float()).abs().mean()
        loss = loss + lbm.pixel_loss_weight * pix
        parts["lbm_pixel"] = pix.item()
    return LossOutput(loss, parts)


def random_latent_crop(a: torch.Tensor, b: torch.Tensor, side: int, generator: torch.Generator | None = None):
    """The same random side x side window (last two dims) of two latent tensors."""
    h, w = a.shape[-2:]
    side = max(1, min(side, h, w))
    top = int(torch.randint(h - side + 1, (1,), generator=generator))
    left = int(torch.randint(w - side + 1, (1,), generator=generator))
    return a[..., top:top + side, left:left + side], b[..., top:top + side, left:left + side]
