"""The one image policy: how every job opens, sizes and buckets images and masks.

- Every pixel mode Pillow decodes is first brought to 8 bits by the range of its type
  (`to_8bit`): 16-bit grey ("I;16", "I;16B/L/N", 16-bit PNG/PGM read as "I") is divided by 257,
  unsigned 32-bit ("I" from TIFF) by 16843009, float ("F") must hold values in [0, 1] and is
  multiplied by 255. Signed integer samples, floats outside [0, 1] and modes Pillow cannot
  convert are refused with one line naming the file. Pillow itself reads 16-bit-per-channel RGB(A)
  and grey+alpha as 8 bits (the high byte). CMYK, YCbCr, LAB and HSV use Pillow's conversions
  (no ICC colour management).
- Images are EXIF-transposed and converted to RGB (or RGBA). Transparency (an alpha channel, or
  a PNG transparent colour) is composited **over white** when RGB is asked for, so a cut-out does
  not turn black; every editkit job (build, train, infer, eval, the app) reads images this way.
- Masks are single-channel "L", binarised to 0/255 (white = edit region), threshold 128. The rule
  for any mode (`binarize_mask`): a mask with transparency that is not fully opaque is read from
  its alpha (opaque = edit region); otherwise a pixel is in the edit region when its brightest
  channel is >= 128 (so white, red or any bright colour on black all mark the edit region).
- Sizes follow the Qwen-Image-Edit pipelines (`calculate_dimensions` in diffusers'
  `pipeline_qwenimage_edit*.py`): keep the aspect ratio, aim at a pixel area, round each side to
  a multiple of 32 (16 is allowed for small models), each side at least one multiple (`fit_area`).
- Aspect-ratio buckets: a fixed list of sizes of about one area; each image goes to the bucket
  whose aspect ratio is nearest (in log space) and is resized to cover it, then centre-cropped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from editkit.errors import UserError

MASK_THRESHOLD = 128
_MODES = ("RGB", "RGBA", "keep")
# 8-bit modes Pillow converts to RGB/RGBA itself ("La", premultiplied grey, it cannot)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_FLOAT_SLACK = 1e-3  # float images may overshoot [0, 1] by rounding
_EXIF_TURNED = (5, 6, 7, 8)  # EXIF orientations shown rotated by 90 degrees


def _check_local_file(path: str | os.PathLike, what: str) -> Path:
    text = str(path)
    if "://" in text:
        raise UserError(f"{text}: {what} is a URL; editkit does not download files — save it locally and give the path")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found; check the path "
                        "(relative paths resolve against the manifest's folder)")
    return p


def _decode_error(p: Path, what: str, err: Exception) -> UserError:
    return UserError(f"{p}: {what} cannot be decoded ({err.__class__.__name__}); replace or re-export the file")


def _rawmode(img: Image.Image) -> str:
    """How the file stores its samples (e.g. "I;16B", "I;32S", "RGB;16B"), from the decoder's tile
    (read before `load()`, which empties it); "" when unknown."""
    for tile in img.tile[:1]:
        args = tile[3]
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str):
            return raw
    return ""


def open_8bit(path: str | os.PathLike, what: str = "image") -> tuple[Image.Image, str | None]:
    """The decoded image in an 8-bit mode (EXIF orientation applied) and a note saying how higher
    bit-depth samples were reduced (None for 8-bit files); a UserError naming the file otherwise."""
    p = _check_local_file(path, what)
    try:
        img = Image.open(p)
        rawmode = _rawmode(img)
        img.load()
        img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _decode_error(p, what, err) from None
    return to_8bit(img, rawmode, f"{p}: {what}")


def to_8bit(img: Image.Image, rawmode: str = "", where: str = "image") -> tuple[Image.Image, str | None]:
    """`img` in an 8-bit mode (alpha and PNG transparency kept) and a note on any depth reduction.

    `rawmode` is the file's sample layout (see `_rawmode`); it tells a 32-bit "I" from a 16-bit one
    and signed from unsigned samples. `where` starts the error message ("path: image").
    """
    mode = img.mode
    if mode in EIGHT_BIT_MODES:
        return img, (f"16 bits per channel ({rawmode}), read as 8 bits" if ";16" in rawmode else None)
    if mode.startswith("I;16"):
        values, scale, note = np.asarray(img), 257, f"16-bit grey ({mode}), read as 8 bits (value / 257)"
    elif mode == "I":
        values = np.asarray(img)
        scale, note = _integer_scale(values, rawmode, where)
        if scale != 257:  # Pillow keeps unsigned 32-bit samples in int32: read the bits back as unsigned
            values = np.ascontiguousarray(values).view(np.uint32)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float64)
        _check_float_range(values, where)
        values, scale, note = np.clip(values, 0.0, 1.0) * 255, 1, "32-bit float grey (F), read as 8 bits (x 255)"
    else:
        raise UserError(f"{where} has pixel mode {mode!r}, which editkit cannot read; re-export it as an 8-bit PNG")
    grey = Image.fromarray(np.rint(values.astype(np.float64) / scale).astype(np.uint8))
    transparent = img.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(np.asarray(img) == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha)), note
    return grey, note


def _integer_scale(values: np.ndarray, rawmode: str, where: str) -> tuple[int, str]:
    """Divisor and note for a 32-bit "I" image: unsigned 32-bit TIFF samples, or 16-bit values
    (16-bit PNG and PGM files decode to "I" too); signed samples have no brightness scale."""
    if rawmode == "I" or rawmode.endswith("S"):
        raise UserError(f"{where} has signed integer samples ({rawmode or 'I'}), which have no brightness "
                        "range; re-export it as an unsigned 8- or 16-bit PNG")
    if "32" in rawmode:
        return 16843009, f"32-bit grey ({rawmode}), read as 8 bits (value / 16843009)"
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise UserError(f"{where} holds integer values {int(values.min())}..{int(values.max())}, outside 0..65535; "
                        "re-export it as an 8- or 16-bit PNG")
    return 257, f"16-bit grey ({rawmode or 'I'}), read as 8 bits (value / 257)"


def _check_float_range(values: np.ndarray, where: str) -> None:
    if not values.size:
        return
    if not np.isfinite(values).all():
        raise UserError(f"{where} is a float image with NaN or infinite values; re-export it as an 8- or 16-bit PNG")
    lo, hi = float(values.min()), float(values.max())
    if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
        raise UserError(f"{where} is a float image with values {lo:g}..{hi:g}; editkit reads float images as 0..1 — "
                        "rescale it or re-export it as an 8- or 16-bit PNG")


def has_transparency(img: Image.Image) -> bool:
    """An alpha channel or a transparent colour (PNG tRNS)."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image of any supported mode as 8-bit `mode`, EXIF orientation applied: "RGB"
    (transparency composited over white), "RGBA", or "keep" (RGBA when it has transparency, else RGB;
    a source image whose model decides later, `as_mode`)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    img, _ = open_8bit(path, "image")
    if mode == "keep":
        mode = "RGBA" if has_transparency(img) else "RGB"
    return as_mode(img, mode)


def as_mode(img: Image.Image, mode: str) -> Image.Image:
    """An 8-bit image as "RGB" (transparency composited over white) or "RGBA" (an RGB image is opaque)."""
    if mode == "RGBA":
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if mode != "RGB":
        raise ValueError(f"mode must be RGB or RGBA, not {mode!r}")
    if has_transparency(img):  # an alpha channel, or an RGB / palette image's transparent colour
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def binarize_mask(mask: Image.Image) -> Image.Image:
    """Any image as a 0/255 "L" mask by the mask rule: alpha when it is not fully opaque, else the
    brightest channel; >= 128 is white = edit region."""
    img, _ = to_8bit(mask, where="mask")
    region = None
    if has_transparency(img):
        alpha = img.convert("RGBA").getchannel("A")
        region = alpha if alpha.getextrema()[0] < 255 else None
    if region is None and img.mode in ("1", "L", "LA"):
        region = img.convert("L")
    if region is None:
        r, g, b = img.convert("RGB").split()
        region = ImageChops.lighter(ImageChops.lighter(r, g), b)
    return region.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open a mask as "L" 0/255 (white = edit region; see `binarize_mask`), EXIF-transposed;
    resized (nearest) to `size`."""
    img, _ = open_8bit(path, "mask")
    mask = binarize_mask(img)
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
    return mask


def oriented_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(width, height) as shown: the stored size, sides swapped when the EXIF orientation turns the
    image by 90 degrees (5-8). The one rule for sizing a file without decoding it (bucketing, the
    training cache's shape keys); it agrees with the decoded, EXIF-transposed image.

    JPEG, WebP and TIFF are read from the header only; a PNG whose EXIF is not before its pixels is
    decoded by Pillow to look for a later eXIf chunk.
    """
    p = _check_local_file(path, what)
    try:
        with Image.open(p) as img:
            turned = img.getexif().get(0x0112, 1) in _EXIF_TURNED
            return img.size[::-1] if turned else img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _decode_error(p, what, err) from None


def mask_size_problem(mask_size: tuple[int, int], image_size: tuple[int, int], which: str = "source") -> str | None:
    """The message when a mask's size differs from its image's (None when they match); the one
    wording of this check for `data validate` and the inference engine."""
    if tuple(mask_size) == tuple(image_size):
        return None
    return (f"mask is {mask_size[0]}x{mask_size[1]} but the {which} is {image_size[0]}x{image_size[1]}; "
            "resize the mask to its image")


SIZE_MULTIPLES = (8, 16, 32, 64)  # side multiples the VAE (8) and 2x2 latent packing (16) accept


def fit_area(area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels at aspect `ratio` (width / height), sides multiples of `multiple`.

    The arithmetic of diffusers' Qwen-Image-Edit `calculate_dimensions` (Python's round), with one
    clamp: each side is at least `multiple`. diffusers rounds a side shorter than `multiple / 2`
    to 0, which no image or latent can have; the clamp gives one tile instead, so at such extreme
    ratios the area exceeds `area`. There is no upper clamp: the long side follows area and ratio.
    """
    if multiple not in SIZE_MULTIPLES:
        raise ValueError(f"multiple must be one of {SIZE_MULTIPLES}, not {multiple}")
    if not area > 0 or not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"area and ratio must be positive, got area {area}, ratio {ratio}")
    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def target_size(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """`fit_area` at the aspect ratio of a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return fit_area(area, width / height, multiple)


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
