"""The editing engine: many edit requests in, images out, batched by shape.

Requests that share an output size, a number of source images with the same VAE sizes, a step
count and a sampler run as one batch (the diffusers pipelines refuse batches larger than one);
the conditional and unconditional CFG passes run as one batch inside the sampler. Every request
draws its noise from its own seed, so a request gives the same image alone or in any batch (up
to float rounding of batched matmuls).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from editkit.errors import UserError
from editkit.infer import defaults
from editkit.infer import fusion as fusion_ops

SAMPLERS = ("flow", "bridge")
MAX_SIDE = 4096
"""Largest output width or height (a 4096x4096 edit already needs far more than one GPU's memory)."""
MAX_STEPS = 1000
MAX_CFG = 50.0
"""True CFG scales above this only burn the image (the pipelines' examples use 2.5 to 6)."""
MAX_FEATHER = 256
MAX_SEED = 2**63 - 1
"""torch.Generator.manual_seed takes 64-bit seeds; editkit keeps them to the non-negative half."""
Progress = Callable[[int, int], None]
"""`progress(steps_done, steps_total)` over all requests of one `Engine.edit` call."""


@dataclass
class EditRequest:
    """One edit: an instruction, its source images and how to sample it.

    `negative_prompt=None` turns true CFG off for this request (as in the diffusers pipelines);
    `true_cfg_scale` (the family's guidance scale, `SamplingDefaults.cfg`), `steps` and `image_cfg`
    left None take the model family's defaults (`Engine.resolve`); `mask` (white = edit region) is
    needed for `fusion` other than "off" and by families that fill a mask (Flux Fill); `feather` is the
    pixel-mask seam width in pixels. `sampler="bridge"` runs the LBM bridge from the first source
    image (a white image when there is none) in `steps` steps, without CFG.
    """

    prompt: str
    images: list[Image.Image]
    negative_prompt: str | None = defaults.NEGATIVE_PROMPT
    true_cfg_scale: float | None = None
    steps: int | None = None
    seed: int = 0
    width: int | None = None
    height: int | None = None
    mask: Image.Image | None = None
    fusion: str = "off"
    sampler: str = "flow"
    feather: int = 8
    bridge_noise: float = defaults.BRIDGE_NOISE
    image_cfg: float | None = None

    label: str | None = None
    """What messages call this request (a dataset record's origin or id); not a sampling setting."""

    def check(self) -> EditRequest:
        """The request itself, or a UserError for a setting no model can run (sizes are checked
        against the model's size multiple by `Engine.check_size`)."""
        if not self.prompt or not self.prompt.strip():
            raise UserError("the edit instruction is empty; write what to change")
        check_sampling(self.steps, self.seed, self.sampler, self.feather)
        check_cfg(self.true_cfg_scale)
        check_cfg(self.image_cfg, "--image-cfg")
        check_side(self.width, "--width")
        check_side(self.height, "--height")
        fusion_ops.check_mode(self.fusion)
        if self.fusion != "off" and self.mask is None:
            raise UserError(f"fusion {self.fusion!r} needs a mask (white = edit region); give --mask or use fusion off")
        if self.fusion != "off" and not self.images:
            raise UserError(f"fusion {self.fusion!r} needs a source image to take the background from")
        if self.mask is not None and self.images:
            check_mask_size(self.mask.size, self.images[0].size)
        return self


def check_sampling(steps: int | None, seed: int, sampler: str, feather: int) -> None:
    """UserError for --steps, --seed, --sampler or --feather values outside what the engine runs
    (steps None: the family's default, checked once known)."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UserError(f"--steps {steps}: steps must be at least 1 and at most {MAX_STEPS}")
    if sampler == "flow" and steps is not None and steps < 2:
        # one step gives sigmas [1.0]; the scheduler's terminal shift then divides by zero
        raise UserError(f"--steps {steps}: the flow sampler needs at least 2 steps")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: seeds go from 0 to 2**63-1 ({MAX_SEED})")
    if not 0 <= feather <= MAX_FEATHER:
        raise UserError(f"--feather {feather}: the seam width goes from 0 to {MAX_FEATHER} pixels")


def check_cfg(scale: float | None, option: str = "--cfg") -> float | None:
    """A guidance scale from 1 (off) to MAX_CFG, or None (the family's default); inf or nan would
    sample black images."""
    if scale is not None and (not math.isfinite(scale) or not 1.0 <= scale <= MAX_CFG):
        raise UserError(f"{option} {scale}: use a CFG scale from 1 (off) to {MAX_CFG:g}, e.g. 4")
    return scale


def check_side(side: int | None, option: str) -> None:
    """An output width/height: None (follow the source) or 1..MAX_SIDE (the multiple: `Engine.check_size`)."""
    if side is not None and not 1 <= side <= MAX_SIDE:
        raise UserError(f"{option} {side}: output sides go from 1 to {MAX_SIDE} pixels (or leave it out)")


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int], what: str = "the mask") -> None:
    """Masks must match the source image they apply to, as `editkit data validate` demands (a
    resized mask would put the edit region somewhere else than the user drew it)."""
    from editkit.data.images import mask_size_problem

    problem = mask_size_problem(mask_size, image_size, "first source image")
    if problem:
        raise UserError(f"{what}: {problem}")


class Engine:
    """Runs `EditRequest`s on an `EditModel`, with LoRA adapters and mask fusion.

    `model_name` (and `transformer_name`, when the transformer came from another folder) are
    recorded in the outputs' settings and fingerprints; `max_batch` caps the requests per batch
    (the CFG passes double the transformer batch). Calls from several threads (a web app) run one
    at a time, so a LoRA change never lands in the middle of an edit.
    """

    def __init__(self, model, model_name: str = "", max_batch: int = 4, transformer_name: str | None = None,
                 run_settings: dict | None = None):
        self.model = model
        self.model_name = model_name
        self.transformer_name = transformer_name
        self.run_settings = dict(run_settings or {})
        """How the model runs (a few-step preset, the speed switches): recorded in every output's settings."""
        self.max_batch = max_batch
        self.loras: list = []
        self.adapter = None
        """The adapter bundle on the model (`editkit.models.adapter_bundle.AppliedBundle`), or None."""
        self._fuse = False
        self._lock = threading.RLock()

    # ----- LoRA ------------------------------------------------------------------------------

    def load_loras(self, specs: Sequence, fuse: bool = False) -> None:
        """Apply LoRA files (`LoraSpec` or "PATH[:SCALE]" strings), replacing any loaded before."""
        from editkit.models import lora
        from editkit.models.adapter_bundle import apply_adapters

        specs = [s if isinstance(s, lora.LoraSpec) else lora.LoraSpec.parse(s) for s in specs]
        with self._lock:
            apply_adapters(self.model.transformer, specs, self.adapter, fuse=fuse)
            self.loras, self._fuse = specs, fuse

    def unload_loras(self) -> None:
        from editkit.models import lora

        with self._lock:
            lora.unload_loras(self.model.transformer)
            self.loras = []
            if self.adapter is not None:
                self.load_loras([], self._fuse)  # the bundle's LoRA stays

    def load_adapter(self, path, without: Sequence[str] = ()) -> None:
        """Apply an adapter bundle (its LoRA and extra modules, `editkit.models.adapter_bundle`) beside
        the LoRA files, replacing a bundle loaded before (None: just remove it); `without` names extra
        modules to leave off."""
        from editkit.models import adapter_bundle

        bundle = adapter_bundle.load_bundle(path) if path is not None else None
        if bundle is not None:
            adapter_bundle.check_family(bundle.meta, self.model.family.name, str(path))
        with self._lock:
            if self.adapter is not None:
                self.adapter.remove()
                self.adapter = None
            if bundle is not None:
                self.adapter = adapter_bundle.AppliedBundle(bundle, self.model, str(path), without)
            self.load_loras(self.loras, self._fuse)

    def set_adapter_extras(self, names: Sequence[str]) -> None:
        """Switch on exactly these extra modules of the adapter bundle (the others off)."""
        with self._lock:
            self.adapter.set_active(names)

    def adapter_settings(self) -> dict:
        """The adapter bundle (file, sha256, extras on and off) and a RoPE frame mode other than
        "own", when there are: for outputs' settings, run manifests and fingerprints."""
        mode = getattr(self.model, "rope_frames", "own")
        return {**({"adapter": self.adapter.settings()} if self.adapter else {}),
                **({"rope_frames": mode} if mode != "own" else {})}

    # ----- settings --------------------------------------------------------------------------

    def output_size(self, request: EditRequest) -> tuple[int, int]:
        return self.model.output_size(request.images, request.width, request.height)

    def check_size(self, width: int | None, height: int | None) -> None:
        """Explicit output sides must be multiples of the model's size multiple (and in range)."""
        unit = self.model.size_multiple
        for side, option in ((width, "--width"), (height, "--height")):
            check_side(side, option)
            if side is not None and side % unit:
                lower = max(unit, side // unit * unit)
                raise UserError(f"{option} {side}: output sides must be multiples of {unit} for this model "
                                f"(e.g. {lower} or {lower + unit})")

    def fingerprint(self) -> dict:
        """What about the loaded weights decides the images, for resumable jobs' fingerprints: the
        model (and transformer) folder stamps, family, dtype, and every LoRA's bytes and scale."""
        from editkit.utils.fingerprint import file_digest, folder_stamp

        return {
            "model": self.model_name,
            "model_files": folder_stamp(self.model_name) if self.model_name else None,
            "transformer": self.transformer_name,
            "transformer_files": folder_stamp(self.transformer_name) if self.transformer_name else None,
            "family": self.model.family.name,
            "dtype": str(self.model.dtype),
            "lora": [[spec.path, file_digest(spec.path), spec.scale] for spec in self.loras],
            **self.adapter_settings(),
        }

    def resolve(self, request: EditRequest) -> EditRequest:
        """The request with the settings it leaves open filled in from the model family's defaults
        (`ModelFamily.sampling`), its source images in the family's `image_mode`, checked against
        what the family needs."""
        from editkit.data.images import as_mode

        defaults_ = self.model.family.sampling
        filled = dataclasses.replace(
            request,
            images=[as_mode(image, self.model.family.image_mode) for image in request.images],
            true_cfg_scale=defaults_.cfg if request.true_cfg_scale is None else request.true_cfg_scale,
            steps=defaults_.steps if request.steps is None else request.steps,
            image_cfg=defaults_.image_cfg if request.image_cfg is None else request.image_cfg,
        )
        where = f"{request.label}: " if request.label else ""
        if defaults_.needs_mask and request.mask is None:
            raise UserError(f"{where}family {self.model.family.name} fills a masked region: give a mask "
                            "(--mask, or a manifest record's mask; white = region to edit)")
        if filled.image_cfg is not None and defaults_.image_cfg is None:
            raise UserError(f"{where}--image-cfg: family {self.model.family.name} has no image guidance; leave it out")
        return filled.check()

    def takes_mask(self) -> bool:
        """Does the model itself read a mask (not only mask fusion)?"""
        return self.model.family.sampling.needs_mask

    def settings(self, request: EditRequest) -> dict:
        """What produced an output (stored in its PNG): enough to run it again."""
        request = self.resolve(request)
        width, height = self.output_size(request)
        extra = {"transformer": self.transformer_name} if self.transformer_name else {}
        if request.image_cfg is not None:
            extra["image_cfg"] = request.image_cfg
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "true_cfg_scale": request.true_cfg_scale,
            "steps": request.steps,
            "seed": request.seed,
            "sampler": request.sampler,
            "width": width,
            "height": height,
            "source_sizes": [list(img.size) for img in request.images],
            "fusion": request.fusion,
            "model": self.model_name,
            "family": self.model.family.name,
            "lora": [[spec.path, spec.scale] for spec in self.loras],
            **self.adapter_settings(),
            **extra,
            **self.run_settings,
        }

    # ----- editing ---------------------------------------------------------------------------

    def group(self, requests: Sequence[EditRequest], max_batch: int | None = None) -> list[list[int]]:
        """Indices of `requests` in batches of one shape, at most `max_batch` each, in request order."""
        max_batch = max_batch or self.max_batch
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            key = (self.output_size(req), tuple(self.model.vae_size(img) for img in req.images),
                   req.steps, req.sampler, req.bridge_noise if req.sampler == "bridge" else None)
            groups.setdefault(key, []).append(i)
        return [idx[j:j + max_batch] for idx in groups.values() for j in range(0, len(idx), max_batch)]

    def edit(self, requests: Sequence[EditRequest], progress: Progress | None = None,
             max_batch: int | None = None) -> list[Image.Image]:
        """Run every request; returns one image per request, in order."""
        requests = [self.resolve(req.check()) for req in requests]
        for req in requests:
            self.check_size(req.width, req.height)
        with self._lock:
            return self._edit(requests, progress, max_batch)

    def _edit(self, requests: list[EditRequest], progress: Progress | None, max_batch: int | None):
        batches = self.group(requests, max_batch)
        total = sum(requests[b[0]].steps for b in batches)
        done = 0
        out: list[Image.Image | None] = [None] * len(requests)
        for batch in batches:
            def step(i, _n, offset=done):
                if progress is not None:
                    progress(offset + i, total)

            images = self._run_batch([requests[i] for i in batch], step)
            for i, image in zip(batch, images):
                out[i] = image
            done += requests[batch[0]].steps
        return out

    @torch.no_grad()
    def _run_batch(self, reqs: list[EditRequest], step: Progress) -> list[Image.Image]:
        from editkit.infer import sampler

        model, first = self.model, reqs[0]
        width, height = self.output_size(first)
        inputs = model.prepare([r.prompt for r in reqs], [r.images for r in reqs], width, height,
                               [_used_negative(r) for r in reqs] if first.sampler == "flow" else None,
                               masks=[r.mask for r in reqs] if self.takes_mask() else None)
        seeds = [r.seed for r in reqs]
        needs_source = first.sampler == "bridge" or any(r.fusion in fusion_ops.LATENT_MODES for r in reqs)
        source = self._source_latents(reqs, width, height) if needs_source else None
        if first.sampler == "flow":
            noise = sampler.initial_noise(model, width, height, seeds, inputs.prompt_embeds.dtype)
            runner = self._masked(reqs, width, height, noise - source) if source is not None else model
            packed = sampler.sample(runner, inputs, first.steps, [r.true_cfg_scale for r in reqs],
                                    seeds, latents=noise, callback=step, image_cfg=[r.image_cfg for r in reqs])
        else:
            runner = self._masked(reqs, width, height, torch.zeros_like(source))
            packed = sampler.sample_bridge(runner, inputs, source, first.steps, first.bridge_noise, seeds,
                                           callback=step)
        _check_finite(packed, reqs, "sampled latents")
        pixels = model.decode_packed(packed, width, height).float()
        _check_finite(pixels, reqs, "decoded pixels")
        images = model.to_pil(pixels)
        return [self._fuse_pixels(r, img) for r, img in zip(reqs, images)]

    def _source_latents(self, reqs: list[EditRequest], width: int, height: int) -> torch.Tensor:
        """Packed latents of each request's first source image (white if none) at the output size,
        built as training builds the LBM bridge start (`sampler.bridge_start`)."""
        from editkit.infer.sampler import bridge_start

        starts = bridge_start(self.model, [r.images[0] if r.images else None for r in reqs], width, height)
        return self.model.pack(starts).to(self.model.dtype)

    def _masked(self, reqs: list[EditRequest], width: int, height: int, background_velocity: torch.Tensor):
        """The model, or (for latent-mask requests) the model whose velocity outside the mask is
        `background_velocity` — the velocity that keeps those latents on the source's path."""
        if not any(r.fusion in fusion_ops.LATENT_MODES for r in reqs):
            return self.model
        latent_hw = self.model.latent_size(width, height)
        channels = self.model.latent_channels
        weights = [fusion_ops.latent_mask(r.mask, latent_hw) if r.fusion in fusion_ops.LATENT_MODES
                   else torch.ones(latent_hw) for r in reqs]
        weight = torch.stack(weights)[:, None].expand(-1, channels, -1, -1)
        packed_weight = self.model.pack(weight.contiguous()).to(background_velocity)

        def keep_background(velocity: torch.Tensor) -> torch.Tensor:
            # with flow matching, the velocity `noise - source` moves the latents exactly along
            # `(1 - s) source + s noise`, so after the last step they are the source's there; the CFG
            # batch (conditional and negative stacked) is handled by tiling
            repeat = math.ceil(velocity.shape[0] / packed_weight.shape[0])
            tile = (repeat, *[1] * (velocity.ndim - 1))  # packed latents of any rank
            return fusion_ops.blend_latents(velocity, background_velocity.repeat(tile), packed_weight.repeat(tile))

        return self.model.with_velocity_hook(keep_background)

    @staticmethod
    def _fuse_pixels(req: EditRequest, image: Image.Image) -> Image.Image:
        if req.fusion in fusion_ops.PIXEL_MODES:
            return fusion_ops.paste_background(image, req.images[0], req.mask, req.feather)
        return image


def _check_finite(values: torch.Tensor, reqs: list[EditRequest], what: str) -> None:
    """Refuse NaN/inf latents or pixels: saved, they would be black images that look like results."""
    finite = torch.isfinite(values).flatten(1).all(dim=1).tolist()
    bad = [req for req, ok in zip(reqs, finite) if not ok]
    if bad:
        name = bad[0].label or f"the edit {bad[0].prompt[:60]!r}"
        more = f" (and {len(bad) - 1} more of its batch)" if len(bad) > 1 else ""
        raise UserError(f"{name}{more}: the {what} are not finite (NaN or inf), so no image was saved; likely "
                        "cause: a LoRA with broken weights or a huge scale, an extreme CFG scale, or fp16 overflow "
                        "(try --dtype bf16 or fp32)")


def _used_negative(req: EditRequest) -> str | None:
    """The (resolved) request's negative prompt when its sampling uses one (true CFG > 1 or an image
    guidance scale), else None, so a CFG-1 edit (the Lightning presets) skips encoding it."""
    if req.true_cfg_scale > 1 or req.image_cfg is not None:
        return req.negative_prompt
    return None
