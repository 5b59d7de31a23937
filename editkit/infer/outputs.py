"""Output images: PNGs that carry their generation settings, written atomically.

The settings (prompt, negative, seed, steps, cfg, model, lora, sizes, ...) go as JSON into the PNG
text chunk `editkit`, so any output can be traced back or re-run; `read_settings` reads them back.
`save_image` picks the format from the suffix: JPEG and WebP (quality 95) cannot hold that chunk,
so their settings go to a sidecar `<name>.json` beside the image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from editkit.errors import UserError
from editkit.utils.atomic import atomic_path, write_json

SETTINGS_KEY = "editkit"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """An image path to write: a known suffix, not a folder, no file in the way of its folders."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give an image file name such as {path / 'edit.png'}")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{option} {path}: unknown image suffix {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(FORMATS)}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{option} {path}: {blocking} is a file, not a folder; choose another path")
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the settings of a JPEG/WebP output go: `<name>.json` (e.g. edit.jpg.json)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_image(path: str | os.PathLike, image: Image.Image, settings: dict | None = None) -> Path:
    """Write `image` in the format its suffix names (see `FORMATS`), atomically, with its settings."""
    path = check_output_file(path)
    if FORMATS[path.suffix.lower()] == "PNG":
        return save_png(path, image, settings)
    with atomic_path(path) as tmp:
        image.convert("RGB").save(tmp, format=FORMATS[path.suffix.lower()], quality=QUALITY)
    if settings:
        write_json(sidecar_path(path), settings)
    return path


def save_png(path: str | os.PathLike, image: Image.Image, settings: dict | None = None) -> Path:
    """Write `image` as PNG with `settings` (JSON-able) in its text chunk; temp file, then rename."""
    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_text(SETTINGS_KEY, json.dumps(settings, ensure_ascii=False, sort_keys=True, default=str))
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_settings(path: str | os.PathLike) -> dict:
    """The settings an output was generated with: a PNG's text chunk, else a JPEG/WebP's sidecar
    ({} when it has none)."""
    sidecar = sidecar_path(path)
    if Path(path).suffix.lower() != ".png" and sidecar.is_file():
        return json.loads(sidecar.read_text())
    try:
        with Image.open(path) as img:
            text = img.text.get(SETTINGS_KEY) if hasattr(img, "text") else None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the PNG ({err.__class__.__name__}); is it an editkit output?") from None
    return json.loads(text) if text else {}
