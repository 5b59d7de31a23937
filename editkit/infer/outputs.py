"""Output images: PNGs that carry their generation settings, written atomically.

The settings (prompt, negative, seed, steps, cfg, model, lora, sizes, ...) go as JSON into the PNG
text chunk `editkit`, so any output can be traced back or re-run; `read_settings` reads them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from editkit.errors import UserError
from editkit.utils.atomic import atomic_path

SETTINGS_KEY = "editkit"


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
    """The settings a PNG was generated with ({} when it has none)."""
    try:
        with Image.open(path) as img:
            text = img.text.get(SETTINGS_KEY) if hasattr(img, "text") else None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the PNG ({err.__class__.__name__}); is it an editkit output?") from None
    return json.loads(text) if text else {}
