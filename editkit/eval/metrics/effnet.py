"""The out-of-the-box feature metric: EfficientNet-Lite0 (packaged ImageNet weights).

Per sample: `effnet_sim` = cosine similarity of the 1280-d pooled features of prediction and ground
truth. The features are kept (in the per-sample cache) for the run-level FID/KID.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from editkit.eval.metrics.base import FeatureMetric, cosine
from editkit.eval.metrics.efficientnet import load_efficientnet_lite0, preprocess
from editkit.eval.sample import Sample


class EffNetMetric(FeatureMetric):
    name = "effnet"
    columns = ("effnet_sim",)
    needs_weights = False

    def load(self, path, device):
        self.device = device
        self.model = load_efficientnet_lite0(device)

    def features(self, images) -> torch.Tensor:
        with torch.no_grad():
            return self.model(preprocess(images).to(self.device)).float().cpu()

    def compute(self, samples: list[Sample]) -> list[dict]:
        pred = self.features([s.pred for s in samples])
        idx = [i for i, s in enumerate(samples) if s.target is not None]
        target = self.features([samples[i].target for i in idx]) if idx else None
        out = [{"effnet_sim": math.nan, "_effnet_pred": pred[i].numpy()} for i in range(len(samples))]
        if idx:
            for j, (i, value) in enumerate(zip(idx, cosine(pred[idx], target))):
                out[i]["effnet_sim"] = value
                out[i]["_effnet_target"] = target[j].numpy()
        return out


def image_similarity(a, b, device: str = "cpu") -> float:
    """Cosine similarity of two PIL images' EfficientNet-Lite0 features (a convenience for scripts)."""
    metric = EffNetMetric()
    metric.load(None, torch.device(device))
    feats = metric.features([a, b])
    return float(np.asarray(cosine(feats[:1], feats[1:]))[0])
