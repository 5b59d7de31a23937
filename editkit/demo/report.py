"""The demo's own report sections: the headline against the bars, and the training loss curves."""

from __future__ import annotations

import csv
import html
from pathlib import Path

EDIT_MSE_BAR = 0.5  # edit-region MSE at most half of the copy-the-source baseline's
BACKGROUND_PSNR_BAR = 25.0  # dB outside the mask


def read_curve(metrics_csv: Path, column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one column of a trainer's metrics.csv, skipping empty cells."""
    steps, values = [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(column):
                steps.append(int(row["step"]))
                values.append(float(row[column]))
    return steps, values


def loss_curves(runs: dict[str, Path], path: Path) -> Path:
    """One panel per training run (train loss, and validation loss where logged), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from editkit.utils.atomic import atomic_path

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4))
    for ax, (name, metrics_csv) in zip(list(getattr(axes, "flat", [axes])), runs.items()):
        for column, style in (("loss", "-"), ("val_loss", "o-")):
            steps, values = read_curve(metrics_csv, column)
            if values:
                ax.plot(steps, values, style, label=column, lw=1, ms=3)
        ax.set(title=name, xlabel="step", yscale="log")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def headline_html(headline: dict, objective: str) -> str:
    """The two bar metrics, whether each is met, and the numbers per CFG value."""
    ratio_ok = headline["edit_mse_ratio"] <= EDIT_MSE_BAR
    psnr_ok = headline["background_psnr"] >= BACKGROUND_PSNR_BAR
    mark = {True: "met", False: "NOT met"}
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{v['edit_mse']:.4f}</td><td>{v['background_psnr']:.2f}</td></tr>"
                   for c, v in headline["per_run"].items())
    return (f"<p>Editor trained with <b>{html.escape(objective)}</b>; no mask fusion; best setting "
            f"{html.escape(headline['best_run'])}.</p><ul>"
            f"<li>Edit-region MSE {headline['edit_mse']:.4f} vs copy-the-source {headline['baseline_edit_mse']:.4f}: "
            f"ratio <b>{headline['edit_mse_ratio']:.2f}</b> (bar &le; {EDIT_MSE_BAR}: {mark[ratio_ok]})</li>"
            f"<li>Background PSNR outside the mask <b>{headline['background_psnr']:.2f} dB</b> "
            f"(bar &ge; {BACKGROUND_PSNR_BAR:g} dB: {mark[psnr_ok]})</li></ul>"
            f"<table><tr><th>run</th><th>edit-region MSE</th><th>background PSNR (dB)</th></tr>{rows}</table>")
