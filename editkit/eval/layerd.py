"""The LayerD layer-decomposition metric (Suzuki et al., "LayerD", ICCV 2025), as its evaluation code
(CyberAgentAILab/LayerD, `layerd.evaluation`) defines it; Qwen-Image-Layered reports it on Crello.

Layers are straight-alpha RGBA arrays (H, W, 4) in [0, 1] (uint8 is divided by 255), back to front
(index 0 = the background), prediction and ground truth of one size.

1. Grouping (both sides): layers whose visible pixels (alpha > 0) overlap no layer above them form
   the top group; it is removed and the rule repeats on the rest. Each group is composited into one
   layer, and the groups are ordered back to front. Non-overlapping layers (a row of icons) become
   one layer, so how a decomposer splits them does not matter.
2. Pair scores of a predicted layer P and a ground-truth layer G:
   `rgb_l1` = mean over the pixels where a_G > 0 of mean_c |rgb_P − rgb_G| (0 when G is empty);
   `alpha_iou` = Σ min(a_P, a_G) / Σ max(a_P, a_G) (0 when both are empty);
   `cost` = (rgb_l1 + 1 − alpha_iou) / 2.
3. Matching: dynamic time warping over the cost matrix (steps down, right, diagonal), so the
   matching keeps the order of both sequences; the path is traced back from the last pair
   preferring the diagonal, then a step back in the prediction, then in the ground truth. A
   sample's scores are the means of rgb_l1, alpha_iou and cost over the pairs of the path.
4. Merges: up to `max_merges` times, two adjacent layers of one side (a side with more than two
   layers) are composited into one, by the greedy rule of `_best_merge`, and the matching is
   recomputed; the loop stops when no merge gains. Results are reported after 0, 1, ..., max_merges
   merges; a sample that stopped earlier keeps its last result for the higher counts (carry forward).

Compositing is the over operator of `editkit.layers.compose` in float; where the upper layer is
fully transparent the lower one is kept as it is, colour included (as PIL's `alpha_composite`,
which the reference uses on 8-bit images, does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from editkit.layers.compose import as_float_rgba, composite

MAX_MERGES = 5
MIN_MERGE_LAYERS = 3  # a side is merged only while it has more than two layers (the reference's rule)
SCORE_NAMES = ("cost", "rgb_l1", "alpha_iou")
LOWER_IS_BETTER_COLUMNS = tuple(f"rgb_l1_m{k}" for k in range(MAX_MERGES + 1))  # for reports' "better" direction


def over(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """`src` composited over `dst` (float RGBA); pixels where src is fully transparent keep dst's values."""
    out = composite([dst, src])
    hidden = src[..., 3] == 0
    out[hidden] = dst[hidden]
    return out


def rgb_l1(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean RGB L1 over the pixels the ground truth shows (a_G > 0); 0 when it shows none."""
    shown = gt[..., 3] > 0
    count = int(shown.sum())
    if count == 0:
        return 0.0
    diff = np.abs(pred[..., :3] - gt[..., :3]).sum(axis=-1, dtype=np.float64)
    return float(diff[shown].sum() / (3 * count))


def alpha_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Soft IoU of the alpha mattes; 0 when both are empty (the reference's value)."""
    a, b = pred[..., 3], gt[..., 3]
    union = float(np.maximum(a, b).sum(dtype=np.float64))
    return float(np.minimum(a, b).sum(dtype=np.float64)) / union if union > 0 else 0.0


def pair_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(cost, rgb_l1, alpha_iou) of one predicted layer against one ground-truth layer."""
    l1, iou = rgb_l1(pred, gt), alpha_iou(pred, gt)
    return (l1 + 1.0 - iou) / 2.0, l1, iou


def group_layers(alphas: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the layers in each group (see the module docstring, step 1), back to front."""
    n = len(alphas)
    shown = np.stack([np.asarray(a).reshape(-1) > 0 for a in alphas]).astype(np.float32)
    overlaps = (shown @ shown.T) > 0  # any pixel both layers show (a positive count stays positive)
    remaining, groups = list(range(n)), []
    while remaining:
        top = [k for pos, k in enumerate(remaining) if not any(overlaps[k, o] for o in remaining[pos + 1:])]
        groups.append(top)
        remaining = [k for k in remaining if k not in top]
    return groups[::-1]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The order-keeping matching of rows (predicted layers) to columns (ground-truth layers) of least
    total cost, as (row, column) pairs from (0, 0) to the last pair."""
    n, m = cost.shape
    total = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            before = [total[a, b] for a, b in ((i - 1, j), (i, j - 1), (i - 1, j - 1)) if a >= 0 and b >= 0]
            total[i, j] = cost[i, j] + (min(before) if before else 0.0)
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:  # the least accumulated cost; ties: diagonal, then up (prediction), then left
            steps = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
            i, j = min(steps, key=lambda s: total[s])
        path.append((i, j))
    return path[::-1]


class _Layers:
    """Every layer a sample's evaluation looks at, by key, with its pair scores memoized.

    Keys: ("pred", i) and ("gt", j) for the grouped input layers, ("over", lower, upper) for a merge.
    A merge's pixels are recomputed when a score needs them and kept only once the merge is applied,
    so the memory stays that of the inputs plus the applied merges."""

    def __init__(self, pred: list[np.ndarray], gt: list[np.ndarray]):
        self.kept = {("pred", i): a for i, a in enumerate(pred)} | {("gt", j): a for j, a in enumerate(gt)}
        self._scores: dict[tuple, tuple[float, float, float]] = {}
        self._recent: dict[tuple, np.ndarray] = {}

    def image(self, key: tuple) -> np.ndarray:
        if key in self.kept:
            return self.kept[key]
        if key not in self._recent:
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = over(self.image(key[1]), self.image(key[2]))
        return self._recent[key]

    def keep(self, key: tuple) -> None:
        self.kept[key] = self.image(key)

    def scores(self, pred_key: tuple, gt_key: tuple) -> tuple[float, float, float]:
        """pair_scores with the layer `pred_key` in the prediction's role."""
        pair = (pred_key, gt_key)
        if pair not in self._scores:
            self._scores[pair] = pair_scores(self.image(pred_key), self.image(gt_key))
        return self._scores[pair]

    def similarity(self, key: tuple, partners: list[tuple]) -> float:
        return sum(1.0 - self.scores(key, other)[0] for other in partners)


def _match(layers: _Layers, pred: list[tuple], gt: list[tuple]) -> tuple[list[tuple[int, int]], dict[str, float]]:
    cost = np.array([[layers.scores(p, g)[0] for g in gt] for p in pred])
    path = dtw_path(cost)
    values = np.array([layers.scores(pred[i], gt[j]) for i, j in path])
    return path, dict(zip(SCORE_NAMES, (float(v) for v in values.mean(axis=0))))


def _best_merge(layers: _Layers, side: list[tuple], other: list[tuple],
                pairs: list[tuple[int, int]]) -> tuple[float, int] | None:
    """(gain, i) of the best merge of side[i] and side[i + 1], or None when no merge gains.

    With similarity = 1 − cost, the layer in `side` in the prediction's role, and M0 (M1) the layers
    of `other` matched to side[i] (side[i + 1]): the merge is worth Σ_M0 sim(merged) plus the best of
    Σ_M1 sim(merged), Σ_M0 sim(side[i + 2]) and Σ_M1 sim(side[i + 2]) (the last two only when
    side[i + 2] exists); its gain is that minus Σ_M0 sim(side[i]) + Σ_M1 sim(side[i + 1]). The reference's
    rule, kept as it is so that the figures are comparable; ties go to the lowest i."""
    if len(side) < MIN_MERGE_LAYERS:
        return None
    matched = [[other[o] for s, o in pairs if s == k] for k in range(len(side))]
    best = None
    for i in range(len(side) - 1):
        merged = ("over", side[i], side[i + 1])
        m0, m1 = matched[i], matched[i + 1]
        current = layers.similarity(side[i], m0) + layers.similarity(side[i + 1], m1)
        first = layers.similarity(merged, m0)
        options = [layers.similarity(merged, m1)]
        if i + 2 < len(side):
            options += [layers.similarity(side[i + 2], m0), layers.similarity(side[i + 2], m1)]
        gain = first + max(options) - current
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, i)
    return best


def _as_layers(layers: Sequence[np.ndarray], shape: tuple[int, ...] | None, what: str) -> list[np.ndarray]:
    """float32 copies in [0, 1], all of `shape` (or of the first layer's)."""
    out = [np.ascontiguousarray(as_float_rgba(layer), dtype=np.float32) for layer in layers]
    shape = shape or (out[0].shape if out else None)
    for k, layer in enumerate(out):
        if layer.shape != shape:
            raise ValueError(f"{what} layer {k} is {layer.shape[1]}x{layer.shape[0]}, not {shape[1]}x{shape[0]}: "
                             "resize the layers to one size first")
    return out


def layerd_scores(pred_layers: Sequence[np.ndarray], gt_layers: Sequence[np.ndarray], max_merges: int = MAX_MERGES,
                  group: bool = True) -> list[dict]:
    """LayerD's scores of one sample after 0, 1, ... merges (at most max_merges + 1 entries; fewer when
    merging stopped early): {"merges", "cost", "rgb_l1", "alpha_iou", "pred_layers", "gt_layers"}, the
    layer counts being those compared (after grouping and merges).

    A side with no layers is scored as one fully transparent layer (the reference cannot score it);
    `group=False` skips step 1 (for tests and ablations: LayerD's protocol groups)."""
    gt = _as_layers(gt_layers, None, "ground-truth")
    pred = _as_layers(pred_layers, gt[0].shape if gt else None, "predicted")
    if not pred and not gt:
        raise ValueError("both the prediction and the ground truth have no layers")
    if not gt:
        gt = [np.zeros_like(pred[0])]
    if not pred:
        pred = [np.zeros_like(gt[0])]
    if group:
        pred, gt = ([_flatten(side, g) for g in group_layers([a[..., 3] for a in side])] for side in (pred, gt))
    layers = _Layers(pred, gt)
    pred_keys = [("pred", i) for i in range(len(pred))]
    gt_keys = [("gt", j) for j in range(len(gt))]
    results = []
    while True:
        path, scores = _match(layers, pred_keys, gt_keys)
        results.append({"merges": len(results), **scores, "pred_layers": len(pred_keys), "gt_layers": len(gt_keys)})
        if len(results) > max_merges:
            break
        on_pred = _best_merge(layers, pred_keys, gt_keys, path)
        on_gt = _best_merge(layers, gt_keys, pred_keys, [(j, i) for i, j in path])
        if on_pred is None and on_gt is None:
            break
        side = pred_keys if on_pred is not None and (on_gt is None or on_pred[0] > on_gt[0]) else gt_keys
        i = (on_pred if side is pred_keys else on_gt)[1]
        merged = ("over", side[i], side[i + 1])
        layers.keep(merged)
        side[i:i + 2] = [merged]
    return results


def _flatten(layers: list[np.ndarray], indices: list[int]) -> np.ndarray:
    out = layers[indices[0]]
    for k in indices[1:]:
        out = over(out, layers[k])
    return out


def at_merges(results: list[dict], k: int) -> dict:
    """A sample's result after k merges, carried forward from its last one when it stopped earlier."""
    return results[min(k, len(results) - 1)]


def sample_columns(results: list[dict], max_merges: int = MAX_MERGES) -> dict[str, float]:
    """One sample's row: alpha_iou_m{k} and rgb_l1_m{k} for k = 0..max_merges (carried forward) and
    `merges`, the merges it took."""
    row: dict[str, float] = {}
    for k in range(max_merges + 1):
        result = at_merges(results, k)
        row[f"alpha_iou_m{k}"] = result["alpha_iou"]
        row[f"rgb_l1_m{k}"] = result["rgb_l1"]
    row["merges"] = float(len(results) - 1)
    return row


def column_names(max_merges: int = MAX_MERGES) -> list[str]:
    return [*(f"{name}_m{k}" for k in range(max_merges + 1) for name in ("alpha_iou", "rgb_l1")), "merges"]
