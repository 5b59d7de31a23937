"""DreamSim and LPIPS: perceptual distances (lower = more similar) from weights on the user's disk.

Both run on torch alone, on the CPU install too (no torchvision, no `lpips` / `dreamsim` package):
- lpips (editkit.eval.metrics.lpips_net): LPIPS v0.1; `--weights lpips=DIR` holds torchvision's
  AlexNet (or VGG16) checkpoint and the `lpips` package's linear heads. Whole images, at the ground
  truth's size, pixels in [0, 1] mapped to [-1, 1].
- dreamsim (editkit.eval.metrics.dreamsim_net): `--weights dreamsim=DIR` is the `dreamsim` package's
  cache_dir (its default ensemble, or a single-branch variant); images resized to its 224x224
  (bicubic) in [0, 1], as its preprocess does.
docs/eval.md lists the files and their layouts.
"""

from __future__ import annotations

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
    """A distance between prediction and ground truth, batched over pairs of one image size."""

    column = ""
    size: int | None = None  # images resized to size×size; None: kept as they are

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, samples: list[Sample]) -> list[dict]:
        out = [{self.column: math.nan} for _ in samples]
        groups: dict = {}
        for i, s in enumerate(samples):
            if s.target is not None:
                groups.setdefault(None if self.size else (s.pred.size, s.target.size), []).append(i)
        with torch.no_grad():
            for idx in groups.values():
                pred = _tensor([samples[i].pred for i in idx], self.size).to(self.device)
                target = _tensor([samples[i].target for i in idx], self.size).to(self.device)
                for i, value in zip(idx, self.distance(pred, target).float().cpu().tolist()):
                    out[i][self.column] = value
        return out


class DreamSimMetric(_PairDistance):
    name = "dreamsim"
    columns = ("dreamsim",)
    column = "dreamsim"
    hint = ("the dreamsim package's cache_dir: checkpoints/dino_vitbase16_pretrain.pth, clip_vitb16_pretrain.pth.tar, "
            "open_clip_vitb16_pretrain.pth.tar, ensemble_lora/; docs/eval.md")

    def load(self, path, device):
        from editkit.eval.metrics.dreamsim_net import load_dreamsim

        path = self.require_weights(path)
        self.device = device
        self.network = load_dreamsim(path, device, "--weights dreamsim")
        self.size = self.network.image_size

    def distance(self, pred, target):
        return self.network(pred, target)


class LpipsMetric(_PairDistance):
    name = "lpips"
    columns = ("lpips",)
    column = "lpips"
    hint = ("a folder with torchvision's alexnet-owt-7be5be79.pth and the lpips package's v0.1 alex.pth, "
            "or vgg16-397923af.pth and vgg.pth; docs/eval.md")

    def load(self, path, device):
        from editkit.eval.metrics.lpips_net import load_lpips

        path = self.require_weights(path)
        self.device = device
        self.network = load_lpips(path, device, "--weights lpips")

    def distance(self, pred, target):
        return self.network(2 * pred - 1, 2 * target - 1)
