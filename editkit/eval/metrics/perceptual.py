"""DreamSim and LPIPS: perceptual distances (lower = more similar) from weights on the user's disk.

Both run on torch alone, on the CPU install too (no torchvision, no `lpips` / `dreamsim` package):
- lpips (editkit.eval.metrics.lpips_net): LPIPS v0.1; `--weights lpips=DIR` holds torchvision's
  AlexNet, VGG16 or SqueezeNet 1.1 checkpoint and the `lpips` package's linear heads (`--lpips-net`
  picks one when the folder holds several). Images at the ground truth's size, pixels in [0, 1] mapped
  to [-1, 1]. `lpips`: whole images; `lpips_out`: the edit region (mask) zero-filled, black, in both
  images, as PIE-Bench's background LPIPS is computed (zero-filled, not left out).
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
    columns = ("lpips", "lpips_out")
    column = "lpips"
    hint = ("a folder with torchvision's alexnet-owt-7be5be79.pth and the lpips package's v0.1 alex.pth, "
            "or vgg16-397923af.pth and vgg.pth, or squeezenet1_1-b8a52dc0.pth and squeeze.pth; docs/eval.md")

    def __init__(self, net: str | None = None):
        """`net`: the backbone (alex, vgg, squeeze); None: the first of them the weights folder holds."""
        self.net = self._checked(net)

    @staticmethod
    def _checked(net: str | None) -> str | None:
        from editkit.eval.metrics.lpips_net import trunk_named

        return None if net is None else trunk_named(net).name

    @classmethod
    def settings(cls, net: str | None = None) -> dict:
        """The chosen backbone ("auto": the folder decides) is part of the eval folder's fingerprint."""
        return {"net": cls._checked(net) or "auto"}

    def load(self, path, device):
        from editkit.eval.metrics.lpips_net import load_lpips

        path = self.require_weights(path)
        self.device = device
        self.network = load_lpips(path, device, "--weights lpips", self.net)

    def distance(self, pred, target):
        return self.network(2 * pred - 1, 2 * target - 1)

    def compute(self, samples: list[Sample]) -> list[dict]:
        rows = super().compute(samples)
        outside = [i for i, s in enumerate(samples)
                   if s.target is not None and s.mask is not None and not s.mask.all()]
        filled = [Sample(samples[i].id, pp.zero_filled(samples[i].pred, samples[i].mask),
                         pp.zero_filled(samples[i].target, samples[i].mask)) for i in outside]
        for row in rows:
            row["lpips_out"] = math.nan
        for i, row in zip(outside, super().compute(filled)):
            rows[i]["lpips_out"] = row["lpips"]
        return rows
