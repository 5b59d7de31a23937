"""What the web app accepts: file types, image size, number of sources, the instruction.

Each check raises `UserError` with one line the user can act on; the Gradio layer shows it as
a `gr.Error`. Image sizes are read from the file header before decoding, so an oversized upload
is refused without spending memory on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from editkit.data.images import load_image, load_mask
from editkit.errors import UserError

ACCEPTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class AppLimits:
    """Upload limits of one served app (set by `editkit serve` flags)."""

    max_image_side: int = 2048
    max_sources: int = 3
    max_file_mb: int = 25
    max_instruction_chars: int = 2000

    def __post_init__(self) -> None:
        if self.max_image_side < 16:
            raise UserError(f"--max-image-side {self.max_image_side}: must be at least 16 pixels")
        if self.max_sources < 1:
            raise UserError(f"--max-sources {self.max_sources}: must be at least 1")
        if self.max_file_mb < 1:
            raise UserError(f"--max-file-mb {self.max_file_mb}: must be at least 1")


def check_instruction(text: str | None, limits: AppLimits) -> str:
    """The instruction, stripped; refuses an empty or overlong one."""
    text = (text or "").strip()
    if not text:
        raise UserError("The instruction is empty: describe the edit (English or Chinese), e.g. 'make the sky red'")
    if len(text) > limits.max_instruction_chars:
        raise UserError(f"The instruction has {len(text)} characters; "
                        f"shorten it to at most {limits.max_instruction_chars}")
    return text


def _display_name(path: str | os.PathLike) -> str:
    return Path(path).name


def _check_file(path: str | os.PathLike, what: str, limits: AppLimits) -> None:
    name = _display_name(path)
    suffix = Path(path).suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise UserError(f"{name}: {what} must be one of {', '.join(ACCEPTED_SUFFIXES)} "
                        f"(got '{suffix or 'no extension'}')")
    size_mb = Path(path).stat().st_size / 2**20
    if size_mb > limits.max_file_mb:
        raise UserError(f"{name}: {what} is {size_mb:.1f} MB; the limit is {limits.max_file_mb} MB")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UserError(f"{name}: {what} is not a readable image; re-export it as PNG or JPEG") from None
    if max(width, height) > limits.max_image_side:
        raise UserError(
            f"{name}: {what} is {width}x{height}; the limit is {limits.max_image_side} pixels per side "
            "— downscale it first"
        )


def load_sources(paths: list[str | os.PathLike] | None, limits: AppLimits) -> list[Image.Image]:
    """Open the uploaded source images as RGB after checking type, size and count."""
    paths = [p for p in (paths or []) if p]
    if not paths:
        raise UserError("No source image: upload at least one image (PNG, JPEG, WebP or BMP)")
    if len(paths) > limits.max_sources:
        raise UserError(f"{len(paths)} source images uploaded; this app accepts at most {limits.max_sources}")
    for index, path in enumerate(paths):
        _check_file(path, f"source image {index + 1}", limits)
    return [_decoded(path, "source image") for path in paths]


def load_uploaded_mask(path: str | os.PathLike, size: tuple[int, int], limits: AppLimits) -> Image.Image:
    """An uploaded mask as "L" 0/255 (white = edit region), resized (nearest) to the source's size."""
    _check_file(path, "mask", limits)
    try:
        return load_mask(path, size=size)
    except UserError:
        raise UserError(f"{_display_name(path)}: mask cannot be decoded; re-export it as PNG") from None


def _decoded(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        return load_image(path, "keep")  # the engine gives it the model's mode
    except UserError:
        raise UserError(f"{_display_name(path)}: {what} cannot be decoded; re-export it as PNG or JPEG") from None
