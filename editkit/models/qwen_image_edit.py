"""EditModel: the one facade over a Qwen-Image-Edit model, used by training and inference alike.

It owns everything that must agree between the trainer and the engine: the VLM prompt
(family template, image tokens, dropped system-prompt tokens), the VLM and VAE views of the
source images, latent normalisation with the VAE's mean/std, 2x2 packing, RoPE `img_shapes`
and the transformer call (2511's `zero_cond_t` is handled inside diffusers' transformer from
`img_shapes`: the first entry is the target, the rest are condition images).

Shapes: "latents" are normalised VAE latents `(B, C, h, w)` (h, w = pixels / 8); "packed"
latents are `(B, h/2 * w/2, 4C)`, the transformer's tokens. Sizes are `(width, height)` in pixels.
Unlike the diffusers pipelines, every method takes a batch (B > 1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from editkit.models.families import Family


def fit_area(area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with about `area` pixels and aspect `ratio` (w/h), rounded to `multiple`.

    The diffusers pipelines' `calculate_dimensions`.
    """
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / multiple) * multiple, round(height / multiple) * multiple


def _make_processor(image_processor, tokenizer):
    """A Qwen2-VL processor for images and text only.

    transformers type-checks the video processor against a class that needs torchvision (not
    installed); image editing never uses video, so the processor is built without one.
    """
    from transformers import Qwen2VLProcessor

    class ImageTextProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


@dataclass
class EditInputs:
    """Everything the sampler needs for one batch of edits that share sizes."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    cond_latents: torch.Tensor | None
    img_shapes: list[list[tuple[int, int, int]]]
    width: int
    height: int
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    has_negative: list[bool] = field(default_factory=list)
    """Per sample: was a negative prompt given (true CFG needs one)."""

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


class EditModel:
    """Transformer + VAE + Qwen2.5-VL text encoder of one family, with the family's conventions."""

    def __init__(
        self,
        family: Family,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        image_processor,
        scheduler,
        vlm_image_area: int | None = None,
        vae_image_area: int | None = None,
        output_area: int | None = None,
    ):
        from diffusers.image_processor import VaeImageProcessor

        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.processor = _make_processor(image_processor, tokenizer)
        self.scheduler = scheduler
        self.vlm_image_area = vlm_image_area or family.vlm_image_area
        self.vae_image_area = vae_image_area or family.vae_image_area
        self.output_area = output_area or family.output_area
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        self.latent_channels = vae.config.z_dim
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.drop_idx = len(tokenizer(family.system_prompt)["input_ids"])
        first = next(transformer.parameters())
        self.device: torch.device = first.device
        """Execution device: where inputs, noise and prompts are made (kept when weights are offloaded)."""
        self.dtype: torch.dtype = first.dtype
        """Compute dtype of embeddings and latents (kept when weights are stored in another dtype)."""
        self._velocity_hooks: tuple = ()
        self._split_lengths = False

    # ----- derived views (clients never assign to a facade's attributes) ---------------------

    def with_transformer(self, transformer) -> EditModel:
        """The same model running another transformer module (e.g. the DDP/FSDP-wrapped one a
        training loop steps), sharing every other part."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def without_encoders(self) -> EditModel:
        """The same model without the VLM and VAE, for training from caches: their memory is freed
        once the caller drops the full model. Encoding or decoding then raises a clear error."""
        view = copy.copy(self)
        view.text_encoder = view.vae = None
        return view

    def with_velocity_hook(self, hook) -> EditModel:
        """The same model whose `predict` output passes through `hook(velocity) -> velocity` (the
        engine's latent-mask fusion blends in the background's velocity so)."""
        view = copy.copy(self)
        view._velocity_hooks = (*self._velocity_hooks, hook)
        return view

    def split_prompt_lengths(self, enabled: bool = True) -> None:
        """Run a batch of right-padded prompts of different lengths as one unmasked pass per
        length (the same function; faster attention without a mask, see editkit.models.accel)."""
        self._split_lengths = enabled

    # ----- placement -------------------------------------------------------------------------

    def to(self, device=None, dtype=None) -> EditModel:
        """Move and cast all three networks; `device` / `dtype` are where and in what inputs are made."""
        for module in (self.transformer, self.vae, self.text_encoder):
            # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even a harmless one
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Output width and height are multiples of this (VAE downsampling x 2x2 packing)."""
        return self.vae_scale_factor * 2

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): given, or the family's output area at the reference image's aspect."""
        if (width is None or height is None) and images:
            ref = images[0] if self.family.size_reference == "first" else images[-1]
            auto_w, auto_h = fit_area(self.output_area, ref.width / ref.height)
            width, height = width or auto_w, height or auto_h
        elif width is None or height is None:
            side = int(math.sqrt(self.output_area))
            width, height = width or side, height or side
        m = self.size_multiple
        return width // m * m, height // m * m

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VAE sees a source image."""
        return fit_area(self.vae_image_area, image.width / image.height)

    def vlm_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VLM sees a source image (before its own patch rounding)."""
        return fit_area(self.vlm_image_area, image.width / image.height)

    def vlm_view(self, image: Image.Image) -> Image.Image:
        """A source image as the VLM gets it (resized as the pipelines resize it)."""
        width, height = self.vlm_size(image)
        return self.image_processor.resize(_rgb(image), height, width)

    def img_shapes(self, width: int, height: int, cond_sizes: Sequence[tuple[int, int]]):
        """RoPE frames of one sample: the target first, then each condition image, in packed units."""
        unit = self.size_multiple
        return [(1, height // unit, width // unit), *[(1, h // unit, w // unit) for w, h in cond_sizes]]

    # ----- prompt ----------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None):
        """VLM embeddings of instructions, each with its own source images.

        Returns `(embeds (B, L, D), mask (B, L) long)`: the last hidden state without the
        system-prompt tokens, right-padded to the longest prompt of the batch.
        """
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = [self.family.prompt(p, len(imgs)) for p, imgs in zip(prompts, images)]
        views = [self.vlm_view(img) for imgs in images for img in imgs]
        inputs = self.processor(text=texts, images=views or None, padding=True, return_tensors="pt").to(self.device)
        # the base model's last (normed) hidden state: the pipelines' hidden_states[-1] without the LM head
        hidden = self.text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
        ).last_hidden_state
        valid = inputs["attention_mask"].bool()
        kept = [hidden[i][valid[i]][self.drop_idx :] for i in range(hidden.shape[0])]
        length = max(k.shape[0] for k in kept)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.long, device=hidden.device)
        for i, k in enumerate(kept):
            embeds[i, : k.shape[0]] = k
            mask[i, : k.shape[0]] = 1
        return embeds.to(self.dtype), mask

    # ----- latents ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 3, H, W) tensor in [-1, 1]."""
        return torch.cat([self.image_processor.preprocess(_rgb(img), height, width) for img in images])

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` of pixels `(B, 3, H, W)` in [-1, 1] (the VAE's mode)."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std)[:, :, 0]

    def encode_images(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` of PIL images resized to (width, height)."""
        return self.encode_latents(self.preprocess(images, width, height))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in about [-1, 1] from normalised latents `(B, C, h, w)`."""
        latents = latents.unsqueeze(2).to(self.vae.dtype)
        mean, std = self._latent_stats(latents)
        latents = latents / (1.0 / std) + mean
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def decode_packed(self, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` from packed target latents of a (width, height) image."""
        return self.decode_latents(self.unpack(packed, *self.latent_size(width, height)))

    def to_pil(self, pixels: torch.Tensor) -> list[Image.Image]:
        """PIL images from decoded pixels (the pipelines' postprocessing)."""
        return self.image_processor.postprocess(pixels, output_type="pil")

    def _latent_stats(self, latents: torch.Tensor):
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents to `(B, h/2 * w/2, 4C)` tokens of 2x2 patches."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """`(B, N, 4C)` tokens back to `(B, C, h, w)` latents."""
        b, _, channels = packed.shape
        latents = packed.view(b, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, latent_height, latent_width)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of (width, height) pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode_conditions(self, images: Sequence[Sequence[Image.Image]]):
        """Packed condition latents `(B, N_cond, 4C)` and the VAE sizes of each source image.

        Every sample must have the same number of source images with the same VAE sizes (the
        engine groups requests so); returns `(None, [])` when there are no source images.
        """
        sizes = [self.vae_size(img) for img in images[0]] if images else []
        for sample in images[1:]:
            if [self.vae_size(img) for img in sample] != sizes:
                raise ValueError("a batch needs source images of the same count and sizes; group requests by shape")
        if not sizes:
            return None, []
        packed = [
            self.pack(self.encode_images([sample[j] for sample in images], w, h)) for j, (w, h) in enumerate(sizes)
        ]
        return torch.cat(packed, dim=1), sizes

    # ----- transformer -----------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        img_shapes: list[list[tuple[int, int, int]]],
        cond_latents: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity for packed target tokens `latents` (B, N, 4C); differentiable.

        `timestep` is the flow-matching sigma in [0, 1] (the pipelines' `t / 1000`), a float or
        one value per sample. Condition tokens are appended after the target tokens and their
        outputs dropped. All samples must share `img_shapes` (diffusers' RoPE uses the first).
        """
        args = (latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs)
        if self._split_lengths:
            from editkit.models.accel import predict_by_prompt_length

            velocity = predict_by_prompt_length(self._predict_once, *args)
        else:
            velocity = self._predict_once(*args)
        for hook in self._velocity_hooks:
            velocity = hook(velocity)
        return velocity

    def _predict_once(self, latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents,
                      attention_kwargs):
        if any(shapes != img_shapes[0] for shapes in img_shapes):
            raise ValueError("all samples of a batch must share img_shapes; group requests by shape")
        batch, num_target = latents.shape[:2]
        hidden = latents if cond_latents is None else torch.cat([latents, cond_latents.to(latents.dtype)], dim=1)
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.as_tensor(timestep, device=latents.device).expand(batch)
        if prompt_mask is not None and bool(prompt_mask.all()):
            prompt_mask = None
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep.to(device=latents.device, dtype=latents.dtype),
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=prompt_mask,
            img_shapes=img_shapes,
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return out[:, :num_target]

    # ----- whole requests --------------------------------------------------------------------

    @torch.no_grad()
    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        width: int | None = None,
        height: int | None = None,
        negative_prompts: Sequence[str | None] | None = None,
    ) -> EditInputs:
        """Encode a batch of edits (prompts, their source images, negatives) for the sampler.

        The output size defaults to the family's rule applied to the first sample's images.
        A negative prompt of None means "no true CFG for this sample" ("" is a valid negative).
        """
        width, height = self.output_size(images[0] if images else [], width, height)
        has_negative = [n is not None for n in negative_prompts] if negative_prompts else [False] * len(prompts)
        neg_embeds = neg_mask = None
        if any(has_negative):  # one VLM pass for prompts and negatives
            both, both_mask = self.encode_prompt([*prompts, *(n or "" for n in negative_prompts)], [*images, *images])
            embeds, mask = _trim(both[: len(prompts)], both_mask[: len(prompts)])
            neg_embeds, neg_mask = _trim(both[len(prompts) :], both_mask[len(prompts) :])
        else:
            embeds, mask = self.encode_prompt(prompts, images)
        cond_latents, cond_sizes = self.encode_conditions(images)
        shapes = self.img_shapes(width, height, cond_sizes)
        return EditInputs(
            prompt_embeds=embeds,
            prompt_mask=mask,
            cond_latents=None if cond_latents is None else cond_latents.to(embeds.dtype),
            img_shapes=[shapes] * len(prompts),
            width=width,
            height=height,
            negative_embeds=neg_embeds,
            negative_mask=neg_mask,
            has_negative=has_negative,
        )


def _trim(embeds: torch.Tensor, mask: torch.Tensor):
    """Drop padding columns that no sample of the batch uses."""
    length = int(mask.sum(dim=1).max())
    return embeds[:, :length], mask[:, :length]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
