"""The edit mask drawn in Gradio's ImageEditor, as a binary "L" image (white = edit region).

The editor (type="pil", image_mode="RGBA") returns {"background", "layers", "composite"}; every
brush stroke lives in a layer as opaque pixels over full transparency. The mask is the union of
the layers' alpha channels, so the brush colour does not matter.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageChops


def mask_from_editor(value: dict[str, Any] | None, size: tuple[int, int]) -> Image.Image | None:
    """The union of the painted layers as a 0/255 mask of `size`, or None when nothing is painted."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    mask = None
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A")
        mask = alpha if mask is None else ImageChops.lighter(mask, _resized(alpha, mask.size))
    if mask is None or mask.getbbox() is None:
        return None
    return _resized(mask.point(lambda v: 255 if v > 0 else 0), size)


def _resized(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    return mask if mask.size == tuple(size) else mask.resize(tuple(size), Image.Resampling.NEAREST)
