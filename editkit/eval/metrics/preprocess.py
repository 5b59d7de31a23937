"""Image preprocessing for feature models with PIL + numpy only (transformers' image processors
need torchvision in recent versions, which editkit cannot install)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC}


@dataclass
class Preprocess:
    """Resize (shortest edge, or to a fixed height x width), centre crop, normalise.

    `shortest_edge` keeps the aspect ratio; `resize_to` is (height, width) and does not.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    resize_to: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    resample: int = Image.BICUBIC

    def image(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        if self.resize_to is not None:
            img = img.resize((self.resize_to[1], self.resize_to[0]), self.resample)
        elif self.shortest_edge is not None:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)  # truncation, as transformers does
            size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
            img = img.resize(size, self.resample)
        if self.crop is not None:
            img = center_crop(img, *self.crop)
        array = np.asarray(img, dtype=np.float32) / 255.0
        return (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, H, W) float32."""
        return torch.from_numpy(np.stack([self.image(img) for img in images])).permute(0, 3, 1, 2).contiguous()


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    w, h = img.size
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _hw(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if "height" in value:
        return int(value["height"]), int(value["width"])
    return None


def from_folder(folder: Path, default: Preprocess) -> Preprocess:
    """The preprocessing described by the folder's preprocessor_config.json, else `default`."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return default
    cfg = json.loads(path.read_text())
    size = cfg.get("size")
    shortest = size.get("shortest_edge") if isinstance(size, dict) else None
    return Preprocess(
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        shortest_edge=shortest if cfg.get("do_resize", True) else None,
        resize_to=None if shortest or not cfg.get("do_resize", True) else _hw(size),
        crop=_hw(cfg.get("crop_size")) if cfg.get("do_center_crop") else None,
        resample=_RESAMPLE.get(cfg.get("resample", 3), Image.BICUBIC),
    )


def naflex_size(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2's target size: keep the aspect ratio, sides multiples of `patch`, at most `max_patches`
    patches (the same binary search as transformers' Siglip2 image processor)."""

    def scaled(scale: float, size: int) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch) * (scaled(mid, width) / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


def naflex_patches(images: list[Image.Image], patch: int, max_patches: int,
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> dict[str, torch.Tensor]:
    """SigLIP2 inputs: pixel_values (B, max_patches, patch*patch*3), pixel_attention_mask, spatial_shapes."""
    values, masks, shapes = [], [], []
    for img in images:
        img = img.convert("RGB")
        h, w = naflex_size(img.height, img.width, patch, max_patches)
        array = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        hp, wp = h // patch, w // patch
        patches = array.reshape(hp, patch, wp, patch, 3).transpose(0, 2, 1, 3, 4).reshape(hp * wp, -1)
        padded = np.zeros((max_patches, patches.shape[1]), np.float32)
        padded[: len(patches)] = patches
        mask = np.zeros(max_patches, np.int32)
        mask[: len(patches)] = 1
        values.append(padded)
        masks.append(mask)
        shapes.append((hp, wp))
    return {
        "pixel_values": torch.from_numpy(np.stack(values)),
        "pixel_attention_mask": torch.from_numpy(np.stack(masks)),
        "spatial_shapes": torch.tensor(shapes, dtype=torch.long),
    }
