"""Samplers over an EditModel: flow-matching Euler with true CFG, and the LBM bridge sampler.

`sample` reproduces the diffusers Qwen-Image-Edit pipelines step for step (the family's
`FlowMatchEulerDiscreteScheduler` with dynamic shift, sigmas `linspace(1, 1/N, N)`, mu from
the target's token count, the transformer gets `t / 1000`, true CFG rescaled to the
conditional prediction's norm, initial noise drawn per sample from its own CPU generator as
the pipeline draws it), but on batches: each sample has its own seed and CFG scale, and the
conditional and unconditional passes run as one batch.

Conventions shared with training (`editkit.train`): flow matching uses
`x_s = (1 - s) * x_target + s * noise` and the network predicts `noise - x_target`; the latent
bridge uses `x_s = (1 - s) * x_target + s * x_source + bridge_noise * sqrt(s (1 - s)) * eps` and
the network predicts `x_source - x_target`; in both, `s` in [0, 1] is what the transformer gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from editkit.infer import defaults
from editkit.models.family import EditInputs, EditModel

StepCallback = Callable[[int, int], None]
"""Called as `callback(step_done, total_steps)` after each step."""


def _seeds(seeds: Sequence[int] | int | None, batch: int) -> list[int]:
    if seeds is None:
        return [int(s) for s in torch.randint(0, 2**31 - 1, (batch,))]
    if isinstance(seeds, int):
        return [seeds + i for i in range(batch)]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
    return [int(s) for s in seeds]


def initial_noise(
    model: EditModel, width: int, height: int, seeds: Sequence[int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Packed Gaussian noise `(B, N, 4C)`, sample i drawn from a CPU generator seeded `seeds[i]`.

    Drawn exactly as the pipeline draws it for `generator=torch.Generator("cpu").manual_seed(seed)`,
    so an edit is reproducible across batch compositions and devices.
    """
    from diffusers.utils.torch_utils import randn_tensor

    latent_h, latent_w = model.latent_size(width, height)
    shape = (1, 1, model.latent_channels, latent_h, latent_w)
    noise = [
        randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=model.device, dtype=dtype)
        for seed in seeds
    ]
    return model.pack(torch.cat(noise)[:, 0])  # the pipeline's (B, 1, C, h, w) layout


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """mu of the resolution-dependent shift for `image_seq_len` target tokens: linear between the
    family scheduler's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the
    pipelines' `calculate_shift`. The one place both sampling and training (`train/timesteps.py`)
    take it from; the values come from the scheduler config only (diffusers fills its defaults)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = scheduler_config
    return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                           c["max_shift"])


def make_scheduler(model: EditModel, steps: int, image_seq_len: int):
    """A fresh copy of the family's scheduler set to `steps` steps for `image_seq_len` target tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    mu = dynamic_shift_mu(scheduler.config, image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=model.device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


def _cfg_batch(inputs: EditInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and negative prompt embeddings stacked into one batch, padded to one length."""
    length = max(inputs.prompt_embeds.shape[1], inputs.negative_embeds.shape[1])
    embeds = torch.cat([_pad_to(inputs.prompt_embeds, length), _pad_to(inputs.negative_embeds, length)])
    mask = torch.cat([_pad_to(inputs.prompt_mask, length), _pad_to(inputs.negative_mask, length)])
    return embeds, mask


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """True CFG as in the pipelines: `uncond + scale (cond - uncond)`, rescaled to `cond`'s norm per token."""
    combined = uncond + scale * (cond - uncond)
    rescaled = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return rescaled.to(cond.dtype)


def sample(
    model: EditModel,
    inputs: EditInputs,
    steps: int = defaults.STEPS,
    true_cfg_scale: float | Sequence[float] = defaults.TRUE_CFG_SCALE,
    seeds: Sequence[int] | int | None = None,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    attention_kwargs: dict | None = None,
    image_cfg: Sequence[float | None] | None = None,
) -> torch.Tensor:
    """Denoise a batch; returns packed target latents `(B, N, 4C)`.

    True CFG runs for sample i when its scale is > 1 and `inputs` has its negative prompt
    (`inputs.has_negative[i]`); the others get the conditional prediction unchanged. A model with
    its own `sample_latents` (`editkit.models.family.CustomSampler`) runs the loop itself, with
    `true_cfg_scale` as its guidance scale and `image_cfg` as its image guidance.
    """
    batch = inputs.batch_size
    dtype = inputs.prompt_embeds.dtype
    if latents is None or seeds is not None:  # no global RNG draw when latents and no seeds are given
        seeds = _seeds(seeds, batch)
    if latents is None:
        latents = initial_noise(model, inputs.width, inputs.height, seeds, dtype)
    cfgs = [true_cfg_scale] * batch if isinstance(true_cfg_scale, (int, float)) else list(true_cfg_scale)
    custom = getattr(model, "sample_latents", None)
    if custom is not None:
        seeds = seeds if seeds is not None else _seeds(None, batch)
        return custom(inputs, steps, [float(c) for c in cfgs], seeds, latents, callback, attention_kwargs,
                      list(image_cfg) if image_cfg is not None else [None] * batch)
    scales = torch.as_tensor(cfgs, dtype=torch.float32)
    use_cfg = (scales > 1) & torch.as_tensor(inputs.has_negative, dtype=torch.bool)
    any_cfg = bool(use_cfg.any())
    if any_cfg:
        embeds, mask = _cfg_batch(inputs)
        cond = None if inputs.cond_latents is None else torch.cat([inputs.cond_latents] * 2)
        shapes = inputs.img_shapes * 2
        # one scale for all: a Python float, so low-precision arithmetic matches the pipeline's
        scale = float(scales[0]) if bool((scales == scales[0]).all()) else scales.view(-1, 1, 1).to(latents.device)
        use = use_cfg.view(-1, 1, 1).to(latents.device)
    else:
        embeds, mask, cond, shapes = inputs.prompt_embeds, inputs.prompt_mask, inputs.cond_latents, inputs.img_shapes
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: skip the attention mask (as the pipelines do), once, not per step

    scheduler = make_scheduler(model, steps, latents.shape[1])
    with torch.no_grad(), model.denoising():
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(batch).to(latents.dtype) / 1000
            model_in = torch.cat([latents] * 2) if any_cfg else latents
            step_t = torch.cat([timestep] * 2) if any_cfg else timestep
            pred = model.predict(model_in, step_t, embeds, mask, shapes, cond, attention_kwargs)
            if any_cfg:
                cond_pred, uncond_pred = pred.chunk(2)
                pred = torch.where(use, guided(cond_pred, uncond_pred, scale), cond_pred)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i + 1, steps)
    return latents


def bridge_start(model: EditModel, sources, width: int, height: int) -> torch.Tensor:
    """Normalised latents `(B, C, h, w)` the LBM bridge starts from: each sample's first source image
    (None: a white image) covering (width, height) at its own aspect, centre-cropped.

    Training (`editkit.train.samples`), its previews and the engine all build the start so: a
    source of another aspect than the output is cropped, never stretched.
    """
    from PIL import Image

    from editkit.data.images import resize_to_bucket

    white = Image.new("RGB", (width, height), (255, 255, 255))
    images = [white if image is None else resize_to_bucket(image.convert("RGB"), (width, height)) for image in sources]
    return model.encode_images(images, width, height)


def sample_bridge(
    model: EditModel,
    inputs: EditInputs,
    source_latents: torch.Tensor,
    steps: int = 1,
    bridge_noise: float = defaults.BRIDGE_NOISE,
    seeds: Sequence[int] | int | None = None,
    callback: StepCallback | None = None,
    attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """Latent bridge matching: walk from packed source latents (s=1) to the target (s=0).

    Sigmas `linspace(1, 0, steps + 1)`; at each step the network's drift gives a target
    estimate `x - s v`, and the next point is put back on the bridge between that estimate and
    the source, with the bridge noise `bridge_noise * sqrt(s (1 - s))` re-injected.
    """
    if not 1 <= steps <= 1000:
        raise ValueError(f"bridge steps must be >= 1, got {steps}")
    batch = source_latents.shape[0]
    generators = [torch.Generator("cpu").manual_seed(s) for s in _seeds(seeds, batch)]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = source_latents
    with torch.no_grad(), model.denoising():
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            timestep = torch.full((batch,), s, device=x.device, dtype=x.dtype)
            drift = model.predict(
                x, timestep, inputs.prompt_embeds, inputs.prompt_mask, inputs.img_shapes, inputs.cond_latents,
                attention_kwargs,
            )
            target = x - s * drift
            x = (1 - s_next) * target + s_next * source_latents
            if s_next > 0 and bridge_noise > 0:
                eps = torch.cat([torch.randn(x.shape[1:], generator=g).unsqueeze(0) for g in generators])
                x = x + bridge_noise * (s_next * (1 - s_next)) ** 0.5 * eps.to(x.device, x.dtype)
            if callback is not None:
                callback(i + 1, steps)
    return x


def edit_images(
    model: EditModel,
    prompts: Sequence[str],
    images: Sequence[Sequence],
    negative_prompts: Sequence[str | None] | None = None,
    true_cfg_scale: float | Sequence[float] = defaults.TRUE_CFG_SCALE,
    steps: int = defaults.STEPS,
    seeds: Sequence[int] | int | None = None,
    width: int | None = None,
    height: int | None = None,
    callback: StepCallback | None = None,
) -> list:
    """Edit a batch whose samples share output size and source-image sizes; returns PIL images."""
    inputs = model.prepare(prompts, images, width, height, negative_prompts)
    packed = sample(model, inputs, steps, true_cfg_scale, seeds, callback=callback)
    with torch.no_grad():
        return model.to_pil(model.decode_packed(packed, inputs.width, inputs.height))
