"""Image preprocessing of the feature metrics: transformers' PIL image processors.

transformers' default processors for these models are the torchvision ones, which editkit's CPU-torch
environment cannot install; the PIL ones (`*ImageProcessorPil`) need only PIL and numpy.
tests/test_eval_features.py checks each metric's tensors against editkit's earlier PIL + numpy code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editkit.errors import UserError

CONFIG_FILE = "preprocessor_config.json"


def _imagenet() -> dict:
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}


def _bicubic() -> int:
    from transformers.image_utils import PILImageResampling

    return PILImageResampling.BICUBIC


def from_folder(cls, folder: Path, **defaults):
    """`cls.from_pretrained(folder)` when the folder has a preprocessor_config.json (its settings
    completed with `defaults` where it has none), else `cls(**defaults)`."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return cls(**defaults)
    try:
        given = json.loads(path.read_text())
        return cls.from_pretrained(str(folder), **{k: v for k, v in defaults.items() if k not in given})
    except Exception as err:  # bad JSON or settings the processor refuses: many exception types
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"{path}: not a usable {cls.__name__} config ({err.__class__.__name__}: {first}); "
                        "fix or delete it") from err


def clip(folder: Path, image_size: int):
    """CLIP: the folder's config, else shortest edge `image_size` (bicubic), centre crop, CLIP mean/std."""
    from transformers import CLIPImageProcessorPil

    return from_folder(CLIPImageProcessorPil, folder, size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size})


def dino(crop: int):
    """MagicBrush's DINO: short side to crop·256/224 (bicubic), centre crop `crop`, ImageNet mean/std.
    The folder's config is not read: the metric is defined by this preprocessing."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"shortest_edge": round(crop * 256 / 224)}, do_center_crop=True,
                                crop_size={"height": crop, "width": crop}, resample=_bicubic(), **_imagenet())


def dinov3(folder: Path, size: int):
    """DINOv3: the folder's config, else `size`×`size` (bicubic), ImageNet mean/std.

    Through ViT's PIL processor: DINOv3's own processor is torchvision-only (and rescales before it
    resizes, on floats); this keeps editkit's resize of the 8-bit image, then rescale and normalise."""
    from transformers import ViTImageProcessorPil

    return from_folder(ViTImageProcessorPil, folder, size={"height": size, "width": size}, resample=_bicubic(),
                       **_imagenet())


def siglip2(patch: int, max_patches: int):
    """SigLIP2 NaFlex: aspect-preserving resize to at most `max_patches` patches of `patch` px, mean/std 0.5."""
    from transformers import Siglip2ImageProcessorPil

    return Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_patches)


def unit_range(size: int | None = None):
    """Pixels in [0, 1], not normalised; resized to `size`×`size` (bicubic) unless `size` is None."""
    from transformers import ViTImageProcessorPil

    if size is None:
        return ViTImageProcessorPil(do_resize=False, do_normalize=False)
    return ViTImageProcessorPil(size={"height": size, "width": size}, resample=_bicubic(), do_normalize=False)


def inputs(processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The model inputs (pixel_values, and for NaFlex the attention mask and spatial shapes).

    Images are made RGB here with PIL, as before: transformers' own conversion blends transparency
    onto white instead of dropping the alpha channel."""
    return dict(processor(images=[img.convert("RGB") for img in images], return_tensors="pt"))


def pixel_values(processor, images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) float32."""
    return inputs(processor, images)["pixel_values"]


def zero_filled(image: Image.Image, region: np.ndarray) -> Image.Image:
    """`image` as RGB with the pixels of `region` (bool (H, W), the image's size) black: PIE-Bench's
    region metrics zero-fill what they leave out."""
    pixels = np.array(image.convert("RGB"))
    pixels[region] = 0
    return Image.fromarray(pixels)
