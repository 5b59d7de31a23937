"""`editkit eval --task layers`: score layer decompositions against a prepared layered set with the
LayerD metric (`editkit.eval.layerd`).

Predictions: one folder per run, in it one folder per sample id holding `layer_00.png`,
`layer_01.png`, ... (RGBA, back to front: layer_00 is the background; any number of digits; other
files are ignored). The ground truth: a folder written by `editkit layers prep` (or its
metadata/manifest.json): each sample's components, bottom first, at the prepared size. Predicted
layers of another size are resized to it (PIL bicubic, which resamples RGBA premultiplied).

Like the edit evaluation: results are cached per (run, sample) under `<out>/cache/<run>/` with a
stamp of the layer files they were computed from and the protocol, so a re-run computes only what
changed; the out folder's fingerprint holds the protocol (another one is refused unless
`overwrite`); samples are sharded across torchrun ranks and rank 0 writes `per_sample.csv`,
`summary.json` (per merge count: the mean with a 95% bootstrap interval), `missing.txt` and
`run.json`. `composites/<run>/<id>.png` is the over-composition of each prediction's layers (the
"output" image `editkit compare` shows beside the ground-truth composite).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from editkit.errors import UserError
from editkit.eval.cache import Entry, entry_path
from editkit.eval.layerd import MAX_MERGES, column_names, layerd_scores, sample_columns
from editkit.eval.ranks import gather, rank_group
from editkit.eval.runner import INFO_COLUMNS, Run, check_run_name
from editkit.eval.stats import bootstrap_mean
from editkit.layers.decompose import layer_files
from editkit.layers.records import MANIFEST, PreparedSample, read_prepared
from editkit.utils import dist
from editkit.utils.atomic import atomic_path, write_json, write_text
from editkit.utils.fingerprint import claim_folder, digest, file_stamp
from editkit.utils.progress import make_progress
from editkit.utils.runinfo import write_run_manifest

JOB = "eval-layers"
RESIZE_POLICY = ("predicted layers resized to the ground truth's prepared size (PIL bicubic, premultiplied RGBA); "
                 "values in [0, 1]")
PROTOCOL = {"metric": "LayerD (layerd.evaluation.LayersEditDist)", "max_merges": MAX_MERGES, "grouping": True,
            "merge_sides": "prediction and ground truth", "resize_policy": RESIZE_POLICY, "version": 1}
# Paper Table 1 (Crello test set), RGB L1 / alpha soft IoU by merge count: what editkit's metric reproduces.
PUBLISHED = {
    "source": "Qwen-Image-Layered paper, Table 1 (Crello); merge counts between 0 and 5 are in the paper",
    "qwen-image-layered": {"0": {"rgb_l1": 0.0594, "alpha_iou": 0.8705}, "5": {"rgb_l1": 0.0363, "alpha_iou": 0.9160}},
    "layerd": {"0": {"rgb_l1": 0.0709, "alpha_iou": 0.7520}, "5": {"rgb_l1": 0.0396, "alpha_iou": 0.8650}},
}
LAYOUT_HINT = "pass folders of <sample id>/layer_00.png, layer_01.png, ... (back to front; docs/eval.md)"


@dataclass
class GroundTruth:
    root: Path
    samples: list[PreparedSample]

    def layer_paths(self, sample: PreparedSample) -> list[Path]:
        return [self.root / rel for rel in sample.layers]


def read_ground_truth(data: Path) -> GroundTruth:
    """A `layers prep` folder, or its metadata/manifest.json."""
    data = Path(data)
    root = data.parent.parent if data.is_file() and data.name == MANIFEST.name else data
    samples = read_prepared(root)
    if not samples:
        raise UserError(f"{root / MANIFEST}: no samples to evaluate")
    return GroundTruth(root, samples)


def check_runs(runs: list[Run]) -> list[Run]:
    names: dict[str, Path] = {}
    for run in runs:
        if not Path(run.pred_dir).is_dir():
            raise UserError(f"--pred {run.pred_dir}: not a folder; {LAYOUT_HINT}")
        check_run_name(run.name, f"--pred {run.pred_dir}")
        if run.name in names:
            raise UserError(f"--pred {run.pred_dir}: run name '{run.name}' is also {names[run.name]}; name the runs "
                            "apart with --pred NAME=DIR")
        names[run.name] = Path(run.pred_dir)
    if not runs:
        raise UserError("--pred: no prediction folders given (a glob that matched nothing?)")
    return runs


def _stamp(pred: list[Path], gt: list[Path]) -> str:
    return digest({"protocol": PROTOCOL, "pred": [[str(p), file_stamp(p)] for p in pred],
                   "gt": [[str(p), file_stamp(p)] for p in gt]})


def _load_entry(path: Path, stamp: str) -> Entry | None:
    """The cached result when it was computed from these files under this protocol, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("stamp") != stamp or not isinstance(data.get("values"), dict):
        return None
    entry = Entry(stamp, data["values"])
    return entry if entry.has(column_names()) else None


def _read_rgba(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from editkit.data.images import load_image

    img = load_image(path, "RGBA")
    if img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _composite_path(out_dir: Path, run: str, sample_id: str) -> Path:
    return entry_path(out_dir / "composites", run, sample_id).with_suffix(".png")


@dataclass
class _Work:
    run: Run
    sample: PreparedSample
    pred: list[Path]
    stamp: str


def score_sample(pred: list[Path], gt: list[Path], size: tuple[int, int]) -> tuple[dict, np.ndarray]:
    """One sample's row (see `layerd.sample_columns`, plus the layer counts given) and the composite of
    its predicted layers."""
    from editkit.layers.compose import composite

    pred_layers = [_read_rgba(p, size) for p in pred]
    gt_layers = [_read_rgba(p, size) for p in gt]
    row = sample_columns(layerd_scores(pred_layers, gt_layers))
    row.update(pred_layers=float(len(pred)), gt_layers=float(len(gt)))
    flat = composite(pred_layers) if pred_layers else np.zeros((size[1], size[0], 4), np.float32)
    return row, flat


def _plan(runs: list[Run], truth: GroundTruth, out_dir: Path) -> list[_Work]:
    """This rank's samples that have a prediction folder and no valid cached result."""
    work = []
    for run in runs:
        for sample in dist.shard(truth.samples):
            folder = Path(run.pred_dir) / sample.id
            if not folder.is_dir():
                continue
            pred = layer_files(folder)
            stamp = _stamp(pred, truth.layer_paths(sample))
            cached = _load_entry(entry_path(out_dir / "cache", run.name, sample.id), stamp)
            if cached is None or not _composite_path(out_dir, run.name, sample.id).is_file():
                work.append(_Work(run, sample, pred, stamp))
    return work


def _compute(item: _Work, truth: GroundTruth, out_dir: Path) -> None:
    from PIL import Image

    from editkit.layers.compose import to_uint8

    row, flat = score_sample(item.pred, truth.layer_paths(item.sample), tuple(item.sample.size))
    with atomic_path(_composite_path(out_dir, item.run.name, item.sample.id)) as tmp:
        Image.fromarray(to_uint8(flat), "RGBA").save(tmp, format="PNG")
    entry = Entry(item.stamp)
    entry.update(row)
    entry.save(entry_path(out_dir / "cache", item.run.name, item.sample.id))


def _clear(out_dir: Path, runs: list[Run], truth: GroundTruth) -> None:
    """Remove earlier results (`overwrite`): each rank its own samples', rank 0 also the tables."""
    for run in runs:
        for sample in dist.shard(truth.samples):
            entry_path(out_dir / "cache", run.name, sample.id).unlink(missing_ok=True)
            _composite_path(out_dir, run.name, sample.id).unlink(missing_ok=True)
    if dist.rank() == 0:
        for name in ("per_sample.csv", "summary.json", "missing.txt"):
            (out_dir / name).unlink(missing_ok=True)


def evaluate_layers(pred_dirs: list[Run | Path], data: Path, out_dir: Path, overwrite: bool = False,
                    show_progress: bool = True, n_boot: int = 2000) -> dict | None:
    """Score each run's decompositions of the samples of `data` (see the module docstring); the summary
    on rank 0, None on the others."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; eval writes a folder (per_sample.csv, summary.json, cache/)")
    runs = check_runs([r if isinstance(r, Run) else Run(Path(r).name, Path(r)) for r in pred_dirs])
    truth = read_ground_truth(data)
    with rank_group() as group:
        claim_folder(out_dir, JOB, {"protocol": PROTOCOL}, overwrite=overwrite, write=dist.rank() == 0)
        if overwrite:
            _clear(out_dir, runs, truth)
        work = _plan(runs, truth, out_dir)
        with make_progress("sample", disable=not show_progress) as progress:
            task = progress.add_task(f"eval layers rank {dist.rank()}", total=len(work), status="")
            for item in work:
                _compute(item, truth, out_dir)
                progress.advance(task)
        computed = sum(gather(len(work), group))  # every rank has saved its entries once this returns
    if dist.rank() != 0:
        return None
    summary = _merge(runs, truth, out_dir, data, n_boot)
    summary["computed"] = computed
    write_json(out_dir / "summary.json", summary)
    write_run_manifest(out_dir, "eval", {"task": "layers", "runs": {r.name: str(r.pred_dir) for r in runs},
                                         "data": str(data), "protocol": PROTOCOL, "world_size": dist.world_size(),
                                         "overwrite": overwrite})
    return summary


def _abs(path) -> str:
    return os.path.abspath(path)


def _mean(values: list[float]) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def merge_table(rows: list[dict], n_boot: int = 2000) -> list[dict]:
    """Per merge count k = 0..MAX_MERGES: the mean of rgb_l1 and alpha_iou over the samples (each carried
    forward) with 95% bootstrap intervals, `avg_merges` (mean of min(merges taken, k)) and `count` (the
    samples that could take k merges) — LayerD's `LayersEditDist.aggregate` with intervals added."""
    table = []
    merges = np.array([r["merges"] for r in rows], dtype=np.float64)
    for k in range(MAX_MERGES + 1):
        entry: dict = {"merges": k}
        for name in ("rgb_l1", "alpha_iou"):
            entry[name] = bootstrap_mean([r[f"{name}_m{k}"] for r in rows], n_boot).as_dict()
        entry["avg_merges"] = float(np.minimum(merges, k).mean()) if rows else math.nan
        entry["count"] = int((merges >= k).sum())
        table.append(entry)
    return table


def _merge(runs: list[Run], truth: GroundTruth, out_dir: Path, data: Path, n_boot: int) -> dict:
    columns = [*column_names(), "pred_layers", "gt_layers"]
    rows, run_summaries = [], {}
    for run in runs:
        missing, run_rows = [], []
        for sample in truth.samples:
            folder = Path(run.pred_dir) / sample.id
            if not folder.is_dir():
                missing.append(sample.id)
                continue
            stamp = _stamp(layer_files(folder), truth.layer_paths(sample))
            entry = _load_entry(entry_path(out_dir / "cache", run.name, sample.id), stamp)
            if entry is None:  # changed after this rank's pass (a prediction rewritten meanwhile)
                raise UserError(f"{folder}: changed while it was evaluated; run `editkit eval --task layers` again")
            values = {c: entry.value(c) for c in columns}
            run_rows.append(values)
            rows.append({"run": run.name, "id": sample.id, "task": "", "edit_type": "", "instruction": "",
                         "pred": _abs(_composite_path(out_dir, run.name, sample.id)),
                         "target": _abs(truth.root / sample.composite), "sources": "[]", "mask": "", **values})
        means = {c: _mean([r[c] for r in run_rows]) for c in columns}
        run_summaries[run.name] = {"pred_dir": str(run.pred_dir), "n_records": len(truth.samples),
                                   "n_evaluated": len(run_rows), "n_missing": len(missing), "missing": missing,
                                   "means": means, "by_merges": merge_table(run_rows, n_boot)}
    header = [*INFO_COLUMNS, *columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, "")) for k in header})
    write_text(out_dir / "per_sample.csv", buf.getvalue())
    write_text(out_dir / "missing.txt", "".join(f"{name}\t{i}\n" for name, s in run_summaries.items()
                                                for i in s["missing"]))
    return {"task": "layers", "manifest": str(truth.root / MANIFEST), "protocol": PROTOCOL,
            "resize_policy": RESIZE_POLICY, "columns": columns, "published": PUBLISHED, "runs": run_summaries}


def _ci(entry: dict) -> str:
    if entry["mean"] is None or math.isnan(entry["mean"]):
        return "-"
    return f"{entry['mean']:.4f} [{entry['low']:.4f}, {entry['high']:.4f}]"


def summary_lines(summary: dict) -> list[str]:
    """The table per run and merge count that `editkit eval --task layers` prints."""
    lines = []
    for name, run in summary["runs"].items():
        lines.append(f"{name}: {run['n_evaluated']}/{run['n_records']} evaluated, {run['n_missing']} missing")
        lines.append(f"  {'merges':>6}  {'rgb_l1 (lower is better)':<28}  alpha_iou (higher is better)")
        for entry in run["by_merges"]:
            lines.append(f"  {entry['merges']:>6}  {_ci(entry['rgb_l1']):<28}  {_ci(entry['alpha_iou'])}")
    ref = summary["published"]
    lines.append("published (Crello, RGB L1 / soft IoU at 0 and 5 merges): Qwen-Image-Layered "
                 + " ... ".join(f"{ref['qwen-image-layered'][k]['rgb_l1']}/{ref['qwen-image-layered'][k]['alpha_iou']}"
                                for k in ("0", "5"))
                 + "; LayerD " + " ... ".join(f"{ref['layerd'][k]['rgb_l1']}/{ref['layerd'][k]['alpha_iou']}"
                                             for k in ("0", "5")))
    return lines


def run_from_cli(task: str, runs: list[Run], data: Path, out: Path, overwrite: bool, unused: dict[str, object]) -> None:
    """`editkit eval --task TASK` for a task other than "edit"; `unused`: the edit task's options as given."""
    import typer

    if task != "layers":
        raise UserError(f"--task {task}: unknown task; use edit (images, <id>.png) or layers (layer folders)")
    given = [option for option, value in unused.items() if value]
    if given:
        raise UserError(f"{', '.join(given)}: not used by --task layers (it always computes the LayerD metric)")
    summary = evaluate_layers(runs, data, out, overwrite=overwrite)
    if summary is None:
        return
    for line in summary_lines(summary):
        typer.echo(line)
    typer.echo(f"computed {summary['computed']} new sample(s); wrote {out}/per_sample.csv and {out}/summary.json")
