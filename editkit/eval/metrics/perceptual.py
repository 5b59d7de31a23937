"""DreamSim and LPIPS: perceptual distances that depend on optional packages.

- dreamsim: the `dreamsim` package (optional; not a dependency of editkit). `--weights dreamsim=DIR`
  is its cache_dir holding the downloaded checkpoints. Distance between prediction and ground
  truth (lower = more similar), images resized to 224x224 bicubic in [0, 1] as its preprocess does.
- lpips: both implementations (torchmetrics' LPIPS and the `lpips` package) build their AlexNet/VGG
  backbone from torchvision, which editkit's environment cannot have (the PyPI wheel is CUDA-built
  and breaks CPU torch). Where torchvision is importable, `--weights lpips=DIR` names a torch hub
  folder holding the backbone checkpoint and torchmetrics' LPIPS (AlexNet) runs; otherwise the
  metric is reported unavailable with that reason.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from PIL import Image

from editkit.eval.metrics import preprocess as pp
from editkit.eval.metrics.base import FeatureMetric
from editkit.eval.sample import Sample


def _tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1], resized to `size`×`size` (bicubic) unless `size` is None."""
    return pp.pixel_values(pp.unit_range(size), images)


class _PairDistance(FeatureMetric):
    column = ""

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, samples: list[Sample]) -> list[dict]:
        out = [{self.column: math.nan} for _ in samples]
        idx = [i for i, s in enumerate(samples) if s.target is not None]
        if not idx:
            return out
        with torch.no_grad():
            for i in idx:  # images of a batch may differ in size: one pair at a time
                pred = self.prepare([samples[i].pred])
                target = self.prepare([samples[i].target])
                out[i][self.column] = float(self.distance(pred.to(self.device), target.to(self.device)).reshape(-1)[0])
        return out

    def prepare(self, images):
        return _tensor(images)


class DreamSimMetric(_PairDistance):
    name = "dreamsim"
    columns = ("dreamsim",)
    column = "dreamsim"
    hint = "the dreamsim cache_dir with its checkpoints (pip install dreamsim)"

    @classmethod
    def unavailable_reason(cls, path):
        if importlib.util.find_spec("dreamsim") is None:
            return ("dreamsim: the `dreamsim` package is not installed (pip install dreamsim), "
                    "then pass --weights dreamsim=CACHE_DIR")
        return super().unavailable_reason(path)

    def load(self, path, device):
        path = self.require_weights(path)
        from dreamsim import dreamsim

        self.device = device
        self.model, _ = dreamsim(pretrained=True, cache_dir=str(path), device=str(device))

    def prepare(self, images):
        return _tensor(images, 224)

    def distance(self, pred, target):
        return self.model(pred, target)


class LpipsMetric(_PairDistance):
    name = "lpips"
    columns = ("lpips",)
    column = "lpips"
    hint = "a torch hub folder holding the AlexNet checkpoint (needs torchvision)"

    @classmethod
    def unavailable_reason(cls, path):
        if importlib.util.find_spec("torchvision") is None:
            return ("lpips: needs torchvision (torchmetrics' LPIPS and the lpips package build their "
                    "backbone from it), which editkit's CPU-torch environment cannot install")
        return super().unavailable_reason(path)

    def load(self, path, device):
        path = self.require_weights(path)
        torch.hub.set_dir(str(path))
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.device = device
        self.model = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)

    def distance(self, pred, target):
        return self.model(pred, target)
