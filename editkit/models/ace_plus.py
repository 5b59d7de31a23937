"""The ACE++ family (ali-vilab ACE_plus): FLUX.1-Fill-dev with an ACE++ LoRA, in ACE++'s input layout.

ACE++ is FLUX.1-Fill-dev plus one of its LoRAs (portrait, subject, local_editing; `--lora`, see
docs/models.md), run through the Flux Fill sampler (`editkit.models.flux_fill`) unchanged. What
this family changes is what its inference code (`inference/utils.py`, `inference/ace_plus_diffusers.py`
of github.com/ali-vilab/ACE_plus) feeds that sampler, reproduced here on tensors:

- the layout: the reference image (optional) resized to the height of the image to edit and
  placed on its left; the image to edit blanked under its mask (`x * (1 - mask * repainting_scale)`,
  mask binarised at > 128, an empty mask meaning the whole image); the reference half unmasked;
  images cropped to an aspect of at most 4; the canvas scaled down (never up) to at most the output
  area (ACE++'s 4096 tokens of 16x16 pixels at 1024x1024), sides and the seam rounded down to
  multiples of 16, nearest-exact;
- the output: the canvas decoded whole, the part right of the seam cut out, 30 more columns
  trimmed at the seam and the rest resized back (ACE++'s `postprocess`). ACE++'s scripts then
  resize it to the edit image's original size; editkit returns it at the canvas's scale (the size
  `output_size` reports), so that sizes, masks and fusion agree with the samples the engine draws;
- the prompt: the instruction as given to both text encoders, with `{image}` (the image to edit)
  one special T5 token, as ACE++ loads its T5 tokenizer;
- the defaults: 28 steps, guidance 50, repainting scale 1 (its "repainting" edit type; the
  annotator-driven types of its local_editing examples — contour, depth, mosaic, recolor with
  scale 0.5 or 0 — need scepter's annotators and are not run).

A request's images are `[image to edit]` (local editing) or `[image to edit, reference]` (the
reference beside it); its mask lies on the image to edit. Reference generation without an image to
edit (ACE++'s blank canvas) is `[any image of the output size, reference]` with an all-white mask:
with repainting scale 1 the image is blanked entirely, as ACE++'s zero image is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from editkit.errors import UserError
from editkit.models.family import SamplingDefaults
from editkit.models.flux_fill import FillLayout, FluxFillFamily, FluxFillModel
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")

TOKEN_PIXELS = 16
"""Pixels per side of one transformer token (8x VAE x 2x2 patch): ACE++'s `d`."""


@dataclass(frozen=True)
class AcePlusFamily(FluxFillFamily):
    """ACE++ on a FLUX.1-Fill-dev folder (the LoRA is given with `--lora`)."""

    name: str = "ace-plus"
    description: str = ("ACE++: FLUX.1 Fill + an ACE++ LoRA (portrait, subject, local_editing); the reference "
                        "beside the image to edit, the mask over the part to fill")
    max_images: int | None = 2
    """The image to edit, then an optional reference."""
    sampling: SamplingDefaults = SamplingDefaults(steps=28, cfg=50.0, needs_mask=True)
    """ACE++'s inference defaults: 28 steps, guidance 50."""
    t5_special_tokens: tuple[str, ...] = ("{image}",)
    seam_trim: int = 30
    repainting_scale: float = 1.0
    """How much of the image to edit is blanked under the mask (1: all, ACE++'s "repainting")."""
    max_aspect_ratio: float = 4.0

    def facade(self):
        return AcePlusModel

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """Never from a folder alone: ACE++ runs on a FLUX.1-Fill-dev folder, chosen with --family ace-plus
        (folders editkit writes name it in model_index.json)."""
        return False


FAMILIES = (AcePlusFamily(),)
"""Registered in editkit.models.families."""


@dataclass(frozen=True)
class AceGeometry:
    """Where everything of one ACE++ sample lies (pixels, (width, height))."""

    edit: tuple[int, int]
    """The image to edit (after the aspect crop, or resized to an explicit output size)."""
    reference: tuple[int, int] | None
    """The reference beside it before the canvas is scaled (None: no reference)."""
    canvas: tuple[int, int]
    """The canvas the model denoises (multiples of 16)."""
    seam: int
    """Canvas columns left of the output (0 without a reference)."""
    resize_canvas: bool
    """Is the stacked canvas scaled (nearest-exact) to `canvas`? (An explicit output size is not.)"""

    @property
    def output(self) -> tuple[int, int]:
        return self.canvas[0] - self.seam, self.canvas[1]


def _round_down(value: float) -> int:
    return max(TOKEN_PIXELS, int(value) // TOKEN_PIXELS * TOKEN_PIXELS)


def crop_box(size: tuple[int, int], max_aspect: float) -> tuple[int, int, int, int]:
    """The centre crop to an aspect of at most `max_aspect` (ACE++'s `image_check`, torchvision's
    CenterCrop arithmetic), as a PIL box."""
    width, height = size
    crop_w, crop_h = width, height
    if height / width > max_aspect:
        crop_h = int(max_aspect * width)
    elif width / height > max_aspect:
        crop_w = int(max_aspect * height)
    left, top = int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


def geometry(edit_size: tuple[int, int], reference_size: tuple[int, int] | None, max_area: int,
             max_aspect: float = 4.0, output: tuple[int, int] | None = None) -> AceGeometry:
    """ACE++'s layout arithmetic for an image to edit and an optional reference (their sizes).

    Without `output`: ACE++'s own (the reference at the edit image's height, the canvas scaled down
    to at most `max_area` pixels, sides and seam rounded down to multiples of 16). With `output`
    (an explicit output size): the image to edit at that size, the reference at its height with a
    width rounded down to 16, the canvas not scaled (the output is exactly `output`).
    """
    box = crop_box(edit_size, max_aspect)
    edit = (box[2] - box[0], box[3] - box[1])
    ref = None
    if reference_size is not None:
        rbox = crop_box(reference_size, max_aspect)
        ref = (rbox[2] - rbox[0], rbox[3] - rbox[1])
    if output is not None:
        seam = 0 if ref is None else _round_down(ref[0] * output[1] / ref[1])
        return AceGeometry(output, None if ref is None else (seam, output[1]), (seam + output[0], output[1]), seam,
                           False)
    placed = None if ref is None else (int(ref[0] * (edit[1] / ref[1])), edit[1])
    width, height = edit[0] + (placed[0] if placed else 0), edit[1]
    max_tokens = max_area / TOKEN_PIXELS**2
    scale = min(1.0, math.sqrt(max_tokens / ((height / TOKEN_PIXELS) * (width / TOKEN_PIXELS))))
    canvas = (_round_down(width * scale), _round_down(height * scale))
    seam = 0 if placed is None else int(placed[0] * scale) // TOKEN_PIXELS * TOKEN_PIXELS
    seam = min(seam, canvas[0] - TOKEN_PIXELS)
    return AceGeometry(edit, placed, canvas, seam, True)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (3, H, W) in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(array.copy()).permute(2, 0, 1) - 0.5) / 0.5


def _binary_mask(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) in {0, 1}: pixels > 128; an empty mask means the whole image (ACE++'s rule)."""
    import numpy as np

    array = (np.asarray(mask.convert("L")) > 128).astype(np.float32)
    if not array.any():
        array = np.ones_like(array)
    return torch.from_numpy(array)[None]


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, H, W) resized to (width, height) = `size` as torchvision resizes tensors (bilinear with
    antialias; nearest-exact)."""
    options = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(x[None], size=(size[1], size[0]), mode=mode, **options)[0]


def ace_canvas(edit: Image.Image, mask: Image.Image, reference: Image.Image | None, max_area: int,
               repainting_scale: float = 1.0, max_aspect: float = 4.0,
               output: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, AceGeometry]:
    """One sample's canvas in ACE++'s layout: `(masked pixels (3, H, W) in [-1, 1], mask (1, H, W),
    geometry)` — the reference (unmasked) left of the image to edit, which is blanked under its mask
    by `repainting_scale` (see `geometry` for the sizes)."""
    if mask.size != edit.size:
        raise UserError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image to edit is "
                        f"{edit.size[0]}x{edit.size[1]}; give a mask of the image's size")
    where = geometry(edit.size, None if reference is None else reference.size, max_area, max_aspect, output)
    box = crop_box(edit.size, max_aspect)
    pixels, fill = _to_tensor(edit.crop(box)), _binary_mask(mask.crop(box))
    if output is not None:
        pixels, fill = _resize(pixels, where.edit, "bilinear"), _resize(fill, where.edit, "nearest-exact")
    pixels = pixels * (1 - fill * repainting_scale)
    if reference is not None:
        ref = _resize(_to_tensor(reference.crop(crop_box(reference.size, max_aspect))), where.reference, "bilinear")
        pixels = torch.cat([ref, pixels], dim=-1)
        fill = torch.cat([torch.zeros(1, *ref.shape[1:]), fill], dim=-1)
    if where.resize_canvas:
        pixels, fill = _resize(pixels, where.canvas, "nearest-exact"), _resize(fill, where.canvas, "nearest-exact")
    return pixels, fill, where


class AcePlusModel(FluxFillModel):
    """The Flux Fill facade fed ACE++'s in-context layout (the output is the canvas right of the seam)."""

    def _geometry(self, images: Sequence[Image.Image], width: int | None = None,
                  height: int | None = None) -> AceGeometry:
        """The layout of one sample's images; an explicit size other than the layout's own output is
        the image to edit's size in the canvas."""
        if not images:
            raise UserError(f"family {self.family.name} needs the image to edit (and optionally a reference "
                            "image after it); give --image")
        reference = images[1].size if len(images) > 1 else None
        natural = geometry(images[0].size, reference, self.output_area, self.family.max_aspect_ratio)
        if (width is None and height is None) or (width, height) == natural.output:
            return natural
        m = self.size_multiple
        if width is None or height is None:  # one side given: the other follows the image to edit's aspect
            src_w, src_h = natural.edit
            width = width or round(height * src_w / src_h)
            height = height or round(width * src_h / src_w)
        output = (max(m, width // m * m), max(m, height // m * m))
        return geometry(images[0].size, reference, self.output_area, self.family.max_aspect_ratio, output)

    def output_size(self, images: Sequence[Image.Image], width: int | None = None, height: int | None = None):
        """The output (width, height): the part of ACE++'s canvas right of the seam (the image to edit,
        scaled with the canvas to at most the output area); an explicit size is the image to edit's
        size in the canvas, kept as it is."""
        if not images:
            return super().output_size(images, width, height)
        return self._geometry(images, width, height).output

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """A source's own size: the layout follows the sizes of both images of a request."""
        return image.size

    def fill_layout(self, images: Sequence[Sequence[Image.Image]], masks: Sequence[Image.Image], width: int,
                    height: int) -> FillLayout:
        """Each sample's ACE++ canvas (`ace_canvas`) for the output (width, height); the samples of a
        batch share their layout (the engine groups requests by their images' sizes)."""
        pixels, fills, layouts = [], [], set()
        for sample, mask in zip(images, masks):
            where = self._geometry(sample, width, height)
            explicit = None if where.resize_canvas else where.output
            canvas, fill, where = ace_canvas(sample[0], mask, sample[1] if len(sample) > 1 else None,
                                             self.output_area, self.family.repainting_scale,
                                             self.family.max_aspect_ratio, explicit)
            pixels.append(canvas)
            fills.append(fill)
            layouts.add(where)
        if len(layouts) != 1:
            raise ValueError("a batch needs one ACE++ layout (images of the same sizes); group requests by shape")
        return FillLayout(torch.stack(pixels).to(self.device), torch.stack(fills).to(self.device))
