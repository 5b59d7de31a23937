"""Matplotlib PNG plots for comparisons: metric vs CFG (with CI bars) and per-category bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_vs_cfg(path: Path, metric: str, points: list[tuple[float, float, float, float, str]]) -> Path:
    """points: (cfg, mean, low, high, run) — one line with 95% CI error bars, sorted by cfg."""
    plt = _pyplot()
    points = sorted(points)
    cfg = np.array([p[0] for p in points])
    mean = np.array([p[1] for p in points])
    err = np.array([[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]])
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.errorbar(cfg, mean, yerr=err, marker="o", capsize=4)
    ax.set_xlabel("CFG scale")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs CFG (95% bootstrap CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def category_bars(path: Path, metric: str, categories: list[str], runs: list[str],
                  means: dict[tuple[str, str], tuple[float, float, float]]) -> Path:
    """Grouped bars: one group per category, one bar per run; means[(run, category)] = (mean, low, high)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(categories) * max(1, len(runs)) / 2), 3.6), dpi=100)
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(categories))
    for i, run in enumerate(runs):
        vals = [means.get((run, c), (np.nan, np.nan, np.nan)) for c in categories]
        m = np.array([v[0] for v in vals])
        err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
        ax.bar(x + i * width - 0.4 + width / 2, m, width, yerr=np.nan_to_num(err), capsize=3, label=run)
    ax.set_xticks(x, categories, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per category")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
