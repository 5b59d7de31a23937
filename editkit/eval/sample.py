"""One evaluation sample: a record's images and a prediction, aligned to the reference size.

Resize policy (stated in every summary): the prediction is resized to the ground truth's size
(PIL bicubic), as MagicBrush does; the mask is resized with nearest neighbour and the sources with
bicubic to that size. Without a ground truth the first source's size is the reference.

`pred` and `target` are RGB (transparency composited over white, `editkit.data.images.load_image`);
`add_rgba` also gives a sample both as RGBA arrays (`pred_rgba`, `target_rgba`), for the metrics
of RGBA reconstructions (`editkit.eval.metrics.rgba`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from editkit.data.records import EditRecord

RESIZE_POLICY = (
    "prediction resized to the ground truth's size (PIL bicubic; first source's size when there is no "
    "ground truth); mask resized with nearest neighbour, sources with bicubic; pixel values in [0, 1]"
)


@dataclass
class Sample:
    id: str
    pred: Image.Image
    target: Image.Image | None = None
    mask: np.ndarray | None = None  # bool (H, W), True = edit region
    sources: list[Image.Image] = field(default_factory=list)
    text: str = ""  # caption for text-image similarity
    task: str | None = None
    pred_rgba: np.ndarray | None = None  # (H, W, 4) float64 in [0, 1], straight alpha; see add_rgba
    target_rgba: np.ndarray | None = None
    instruction: str = ""  # the record's edit instruction (the VLM judge's question)


def caption(record: EditRecord) -> str:
    """Text for CLIP-T: the target caption from the metadata when present, else the instruction."""
    meta = record.metadata or {}
    for key in ("target_caption", "output_caption", "caption"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    return record.instruction


def to_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]."""
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def _rgba_array(path, size: tuple[int, int]) -> np.ndarray:
    """The image at `path` as (H, W, 4) float64 in [0, 1], resized to `size` (PIL bicubic) when it differs."""
    from editkit.data.images import load_image

    img = load_image(path, "RGBA")
    if img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def load_sample(record: EditRecord, pred_path: Path) -> Sample:
    from editkit.data.images import load_image, load_mask

    target = load_image(record.target) if record.target else None
    sources = [load_image(p) for p in record.sources]
    pred = load_image(pred_path)
    reference = target.size if target is not None else sources[0].size if sources else pred.size
    if pred.size != reference:
        pred = pred.resize(reference, Image.BICUBIC)
    sources = [s if s.size == reference else s.resize(reference, Image.BICUBIC) for s in sources]
    mask = None
    if record.mask:
        m = load_mask(record.mask)
        if m.size != reference:
            m = m.resize(reference, Image.NEAREST)
        mask = np.asarray(m) > 127
    return Sample(record.id, pred, target, mask, sources, caption(record), record.task,
                  instruction=record.instruction)


def add_rgba(sample: Sample, record: EditRecord, pred_path: Path) -> Sample:
    """`sample` with `pred_rgba` and `target_rgba` (None without a ground truth), aligned like its RGB images."""
    sample.pred_rgba = _rgba_array(pred_path, sample.pred.size)
    sample.target_rgba = _rgba_array(record.target, sample.pred.size) if record.target else None
    return sample
