"""The one image policy: how every job opens, sizes and buckets images and masks.

- Images are EXIF-transposed and converted to RGB (or RGBA); transparent pixels are composited
  on white when RGB is asked for, so a cut-out does not turn black.
- Masks are single-channel "L", binarised to 0/255 (white = edit region), threshold 128.
- Sizes follow the Qwen-Image-Edit pipelines (`calculate_dimensions` in diffusers'
  `pipeline_qwenimage_edit_plus.py`): keep the aspect ratio, aim at a pixel area, round each
  side to a multiple of 32 (16 is allowed for small models).
- Aspect-ratio buckets: a fixed list of sizes of about one area; each image goes to the bucket
  whose aspect ratio is nearest (in log space) and is resized to cover it, then centre-cropped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from editkit.errors import UserError

MASK_THRESHOLD = 128
_MODES = ("RGB", "RGBA")


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    text = str(path)
    if "://" in text:
        raise UserError(f"{text}: {what} is a URL; editkit does not download files — save it locally and give the path")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found; check the path (relative paths resolve against the manifest's folder)")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{p}: {what} cannot be decoded ({err.__class__.__name__}); replace or re-export the file") from None
    return img


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to `mode` ("RGB" or "RGBA")."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    img = ImageOps.exif_transpose(_open(path, "image"))
    if mode == "RGBA":
        return img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def binarize_mask(mask: Image.Image) -> Image.Image:
    """Grey levels to a 0/255 "L" mask (>= 128 is white = edit region)."""
    return mask.convert("L").point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open a mask as "L" 0/255 (white = edit region), EXIF-transposed; resized (nearest) to `size`."""
    img = ImageOps.exif_transpose(_open(path, "mask"))
    if img.mode in ("RGBA", "LA"):
        img = img.convert("RGBA").getchannel("A") if _alpha_is_the_mask(img) else img.convert("L")
    mask = binarize_mask(img)
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
    return mask


def _alpha_is_the_mask(img: Image.Image) -> bool:
    """An RGBA mask whose colour is flat but whose alpha varies carries the mask in its alpha."""
    rgba = img.convert("RGBA")
    lo, hi = rgba.convert("L").getextrema()
    alo, ahi = rgba.getchannel("A").getextrema()
    return lo == hi and alo != ahi


def target_size(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(w, h) of about `area` pixels with the aspect ratio of width x height, sides multiples of `multiple`.

    Same arithmetic as diffusers' Qwen `calculate_dimensions` (Python's round), with each side at
    least one `multiple`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if multiple not in (8, 16, 32, 64):
        raise ValueError(f"multiple must be 8, 16, 32 or 64, not {multiple}")
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def resize_to_area(img: Image.Image, area: int, multiple: int = 32,
                   resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize to `target_size` (aspect ratio kept up to the rounding, as the Qwen pipelines do)."""
    size = target_size(img.width, img.height, area, multiple)
    return img if img.size == size else img.resize(size, resample)


def make_buckets(area: int, multiple: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Bucket sizes (w, h) of about `area` pixels, sides multiples of `multiple`, ratios up to max_ratio.

    Walks the short side in steps of `multiple` up to the square, takes the long side that keeps
    the area, and adds both orientations; sorted by aspect ratio.
    """
    if area < multiple * multiple:
        raise ValueError(f"area {area} is smaller than one {multiple}x{multiple} tile")
    buckets = set()
    short = multiple
    while short * short <= area:
        long = max(short, round(area / short / multiple) * multiple)
        if long / short <= max_ratio:
            buckets.update({(short, long), (long, short)})
        short += multiple
    return sorted(buckets, key=lambda b: b[0] / b[1])


def bucket_for(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to width/height (log distance; ties go to the first)."""
    if not buckets:
        raise ValueError("bucket list is empty")
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int],
                     resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize to cover `bucket` keeping the aspect ratio, then centre-crop to exactly `bucket`."""
    bw, bh = bucket
    if img.size == (bw, bh):
        return img
    scale = max(bw / img.width, bh / img.height)
    w, h = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((w, h), resample)
    left, top = (w - bw) // 2, (h - bh) // 2
    return img.crop((left, top, left + bw, top + bh))
