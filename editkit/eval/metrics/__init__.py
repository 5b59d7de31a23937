"""The metric registry.

Groups (names for `--metrics`):
- per-sample, CPU: `pixel` (MSE/MAE/PSNR/SSIM whole, `_in`, `_out`), `seam` (seam, seam_excess, ghost),
  `rgba` (RGBA reconstructions: 9-background PSNR/SSIM, alpha-weighted L1, alpha soft IoU)
- per-sample, batched on the device: `effnet` (works out of the box), `clip`, `dino`, `dinov3`,
  `siglip2`, `dreamsim`, `lpips` (these need `--weights NAME=PATH`), `judge` (a local Qwen2.5-VL VLM
  judge, GEdit-Bench's VIEScore protocol by default: judge_sc, judge_pq, judge_overall; `--weights judge=DIR`)
- per-run: `fid` (FID and KID with EfficientNet-Lite0 features; needs `effnet`)
"""

from __future__ import annotations

from editkit.eval import layerd
from editkit.eval.metrics import pixel, rgba, seams
from editkit.eval.metrics.base import FeatureMetric, Unavailable
from editkit.eval.metrics.effnet import EffNetMetric
from editkit.eval.metrics.hf import ClipMetric, DinoMetric, Dinov3Metric, Siglip2Metric
from editkit.eval.metrics.judge import JudgeMetric
from editkit.eval.metrics.perceptual import DreamSimMetric, LpipsMetric

SAMPLE_GROUPS: dict[str, tuple[str, ...]] = {"pixel": pixel.COLUMNS, "seam": seams.COLUMNS, "rgba": rgba.COLUMNS}
FEATURE_METRICS: dict[str, type[FeatureMetric]] = {
    cls.name: cls for cls in (EffNetMetric, ClipMetric, DinoMetric, Dinov3Metric, Siglip2Metric,
                              DreamSimMetric, LpipsMetric, JudgeMetric)
}
RUN_GROUPS: dict[str, tuple[str, ...]] = {"fid": ("fid_effnet", "kid_effnet", "kid_effnet_std")}
ALL_GROUPS = (*SAMPLE_GROUPS, *FEATURE_METRICS, *RUN_GROUPS)
DEFAULT_GROUPS = ("pixel", "seam", "effnet", "fid")
# Direction of "better" for reports (True: higher is better). Columns not listed: higher is better.
LOWER_IS_BETTER = {
    *(c for c in pixel.COLUMNS if c.startswith(("mse", "mae"))),
    "seam", "seam_excess", "ghost", "rgba_l1", "dreamsim", "lpips", "lpips_out", "fid_effnet", "kid_effnet",
    *layerd.LOWER_IS_BETTER_COLUMNS,  # `eval --task layers`
}


def higher_is_better(column: str) -> bool:
    return column not in LOWER_IS_BETTER


def columns_of(group: str) -> tuple[str, ...]:
    if group in SAMPLE_GROUPS:
        return SAMPLE_GROUPS[group]
    if group in FEATURE_METRICS:
        return FEATURE_METRICS[group].columns
    return RUN_GROUPS[group]


__all__ = ["ALL_GROUPS", "DEFAULT_GROUPS", "FEATURE_METRICS", "FeatureMetric", "RUN_GROUPS", "SAMPLE_GROUPS",
           "Unavailable", "columns_of", "higher_is_better"]
