"""`editkit eval`: score prediction folders against a manifest.

Predictions are matched to records by id (`<pred_dir>/<id>.png`, or .jpg/.jpeg/.webp). Each
(run, record) result is cached under `<out>/cache/<run>/` with a stamp of the files and texts it
was computed from (editkit.eval.cache); a re-run computes only what is missing (new predictions,
new metrics, changed predictions, ground truths, sources, masks or instructions). What holds for
the whole folder — the resize policy, each metric's weights and the settings of metrics with options
(the judge's protocol) — is its fingerprint (`claim_out_folder`): other values are refused unless
`overwrite`, which recomputes everything.
Records are sharded across processes by rank (torchrun / accelerate); each rank writes its cache
entries, the ranks gather their unavailable-metric reasons through torch.distributed
(editkit.eval.ranks), and rank 0 merges everything into `per_sample.csv`, `per_sample_texts.jsonl`
(texts a metric keeps per sample, e.g. the VLM judge's answers) and `summary.json` and writes the
run manifest `run.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.eval.cache import Entry, entry_path, load_entry
from editkit.eval.ranks import gather, rank_group
from editkit.eval.sample import RESIZE_POLICY, Sample, add_rgba, load_sample, to_array
from editkit.utils import dist
from editkit.utils.atomic import write_json, write_text
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT_FILE
from editkit.utils.fingerprint import claim_folder, file_stamp, folder_stamp
from editkit.utils.progress import make_progress
from editkit.utils.runinfo import write_run_manifest

PRED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
INFO_COLUMNS = ("run", "id", "task", "edit_type", "instruction", "pred", "target", "sources", "mask")
CLIP_T_TEXT = "metadata target_caption / output_caption / caption when present, else the instruction"
TEXTS_FILE = "per_sample_texts.jsonl"


@dataclass
class Run:
    name: str
    pred_dir: Path


@dataclass
class Work:
    run: Run
    record: EditRecord
    pred_path: Path
    entry: Entry
    groups: list[str] = field(default_factory=list)


def check_run_name(name: str, option: str) -> None:
    """A run name is a folder name under <out>/cache/ and a column value: no path separators."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"{option}: run name {name!r} cannot name a folder; use letters, digits, '.', '-' or '_'")


def runs_from_dirs(pred_dirs: list[Path | Run]) -> list[Run]:
    """One run per folder, named by the folder unless given as a Run (`--pred NAME=DIR`); two runs
    with one name are refused."""
    runs: dict[str, Run] = {}
    for item in pred_dirs:
        run = item if isinstance(item, Run) else Run(Path(item).name, Path(item))
        d = Path(run.pred_dir)
        if not d.is_dir():
            raise UserError(f"--pred {d}: not a folder; pass folders of <id>.png predictions")
        check_run_name(run.name, f"--pred {d}")
        if run.name in runs:
            raise UserError(f"--pred {d}: run name '{run.name}' is also {runs[run.name].pred_dir}; name the runs "
                            "apart with --pred NAME=DIR")
        runs[run.name] = Run(run.name, d)
    if not runs:
        raise UserError("--pred: no prediction folders given (a glob that matched nothing?)")
    return list(runs.values())


def find_prediction(pred_dir: Path, record_id: str) -> Path | None:
    for ext in PRED_EXTENSIONS:
        path = pred_dir / f"{record_id}{ext}"
        if path.is_file():
            return path
    return None


def resolve_groups(groups: list[str] | None, weights: dict[str, Path]) -> list[str]:
    """Requested metric groups (default + any with weights), checked; `fid` brings in `effnet`."""
    from editkit.eval.metrics import ALL_GROUPS, DEFAULT_GROUPS, FEATURE_METRICS

    for name in weights:
        if name not in FEATURE_METRICS or not FEATURE_METRICS[name].needs_weights:
            known = ", ".join(n for n, c in FEATURE_METRICS.items() if c.needs_weights)
            raise UserError(f"--weights {name}=...: unknown metric '{name}'; one of: {known}")
    chosen = list(groups) if groups else [*DEFAULT_GROUPS, *weights]
    for name in chosen:
        if name not in ALL_GROUPS:
            raise UserError(f"--metrics: unknown metric '{name}'; choose from {', '.join(ALL_GROUPS)}")
    if "fid" in chosen and "effnet" not in chosen:
        chosen.append("effnet")
    return list(dict.fromkeys(chosen))


def _needs(entry: Entry, group: str) -> bool:
    from editkit.eval.metrics import columns_of

    if group == "fid":
        return False  # run-level, from the effnet features
    return not entry.has(columns_of(group))


class FeatureModels:
    """Feature metrics, loaded on first use; unavailable ones remember their one-line reason."""

    def __init__(self, weights: dict[str, Path], device, options: dict[str, dict] | None = None):
        self.weights, self.device, self.options = weights, device, options or {}
        self.loaded: dict = {}
        self.unavailable: dict[str, str] = {}

    def get(self, name: str):
        from editkit.eval.metrics import FEATURE_METRICS, Unavailable

        if name in self.unavailable:
            return None
        if name not in self.loaded:
            metric = FEATURE_METRICS[name](**self.options.get(name, {}))
            try:
                metric.load(self.weights.get(name), self.device)
            except Unavailable as why:
                self.unavailable[name] = str(why)
                return None
            self.loaded[name] = metric
        return self.loaded[name]

    def check(self, names: list[str]) -> None:
        """Record why the metrics `names` (those asked for) that need weights have none, without loading."""
        from editkit.eval.metrics import FEATURE_METRICS

        for name in names:
            reason = FEATURE_METRICS[name].unavailable_reason(self.weights.get(name)) \
                if name in FEATURE_METRICS else None
            if reason:
                self.unavailable[name] = reason


def _sample_metrics(sample: Sample, groups: list[str]) -> dict:
    from editkit.eval.metrics.pixel import COLUMNS as PIXEL_COLUMNS
    from editkit.eval.metrics.pixel import pixel_metrics
    from editkit.eval.metrics.rgba import COLUMNS as RGBA_COLUMNS
    from editkit.eval.metrics.rgba import rgba_metrics
    from editkit.eval.metrics.seams import seam_metrics

    out: dict = {}
    pred = to_array(sample.pred)
    target = to_array(sample.target) if sample.target is not None else None
    if "pixel" in groups:
        out.update(pixel_metrics(pred, target, sample.mask) if target is not None
                   else dict.fromkeys(PIXEL_COLUMNS, math.nan))
    if "seam" in groups:
        source = to_array(sample.sources[0]) if sample.sources else None
        out.update(seam_metrics(pred, sample.mask, source, target))
    if "rgba" in groups:
        out.update(rgba_metrics(sample.pred_rgba, sample.target_rgba) if sample.target_rgba is not None
                   else dict.fromkeys(RGBA_COLUMNS, math.nan))
    return out


def compute_batch(batch: list[Work], cache_dir: Path, models: FeatureModels) -> None:
    """Compute what each work item lacks and save its cache entry."""
    from editkit.eval.metrics import FEATURE_METRICS, SAMPLE_GROUPS

    samples = [load_sample(w.record, w.pred_path) for w in batch]
    samples = [add_rgba(s, w.record, w.pred_path) if "rgba" in w.groups else s for w, s in zip(batch, samples)]
    for w, sample in zip(batch, samples):
        groups = [g for g in w.groups if g in SAMPLE_GROUPS]
        if groups:
            w.entry.update(_sample_metrics(sample, groups))
    for name in FEATURE_METRICS:
        idx = [i for i, w in enumerate(batch) if name in w.groups]
        if not idx:
            continue
        metric = models.get(name)
        if metric is None:
            continue
        for i, row in zip(idx, metric.compute([samples[i] for i in idx])):
            batch[i].entry.update(row)
    for w in batch:
        w.entry.save(entry_path(cache_dir, w.run.name, w.record.id))


def plan(runs: list[Run], records: list[EditRecord], groups: list[str], cache_dir: Path,
         models: FeatureModels) -> list[Work]:
    """This rank's work: predictions that exist and lack some available metric."""
    work = []
    for run in runs:
        for record in dist.shard(records):
            pred = find_prediction(run.pred_dir, record.id)
            if pred is None:
                continue
            entry = load_entry(entry_path(cache_dir, run.name, record.id), record, pred)
            todo = [g for g in groups if g not in models.unavailable and _needs(entry, g)]
            if todo:
                work.append(Work(run, record, pred, entry, todo))
    return work


def weights_stamp(path: Path) -> list:
    """A weights folder (or file) as it enters the fingerprint: its path and its files' sizes and mtimes."""
    return [str(path), folder_stamp(path) if Path(path).is_dir() else file_stamp(path)]


def _recorded(out_dir: Path) -> dict:
    """The inputs of the eval fingerprint already in `out_dir` ({} when none or not an eval's)."""
    try:
        data = json.loads((out_dir / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    inputs = data.get("inputs") if isinstance(data, dict) and data.get("job") == "eval" else None
    return inputs if isinstance(inputs, dict) and isinstance(inputs.get("weights"), dict) else {}


def metric_settings(weights: dict[str, Path], options: dict[str, dict]) -> dict[str, dict]:
    """The settings (`FeatureMetric.settings`) of each metric given weights, where it has any."""
    from editkit.eval.metrics import FEATURE_METRICS

    found = {name: FEATURE_METRICS[name].settings(**options.get(name, {})) for name in sorted(weights)}
    return {name: json.loads(json.dumps(value)) for name, value in found.items() if value is not None}


def claim_out_folder(out_dir: Path, weights: dict[str, Path], overwrite: bool,
                     settings: dict[str, dict] | None = None) -> None:
    """Refuse an out folder whose results were computed with another resize policy, other weights or
    other settings (`metric_settings`) for a metric, unless `overwrite`. Weights for a metric the folder
    has not seen extend its fingerprint (a new metric is computed beside the cached ones)."""
    given = {name: weights_stamp(path) for name, path in sorted(weights.items())}
    settings = settings or {}
    old = _recorded(out_dir)
    old_settings = old.get("metric_settings", {}) if isinstance(old.get("metric_settings"), dict) else {}
    compatible = bool(old) and old.get("resize_policy") == RESIZE_POLICY and all(
        old["weights"].get(name, stamp) == stamp for name, stamp in given.items()) and all(
        old_settings.get(name, value) == value for name, value in settings.items())
    merged = given if overwrite else {**old.get("weights", {}), **given}
    merged_settings = settings if overwrite else {**old_settings, **settings}
    inputs = {"resize_policy": RESIZE_POLICY, "weights": merged}
    if merged_settings:
        inputs["metric_settings"] = merged_settings
    claim_folder(out_dir, "eval", inputs, overwrite=overwrite or compatible, write=dist.rank() == 0)


def clear_results(out_dir: Path, runs: list[Run], records: list[EditRecord]) -> None:
    """Delete earlier results before recomputing (`overwrite`): each rank its own records' entries, rank 0
    also every other entry and the merged tables, so ranks need not wait for each other."""
    cache_dir = out_dir / "cache"
    for run in runs:
        for record in dist.shard(records):
            entry_path(cache_dir, run.name, record.id).unlink(missing_ok=True)
    if dist.rank() != 0:
        return
    current = {entry_path(cache_dir, run.name, r.id) for run in runs for r in records}
    for path in cache_dir.rglob("*.json") if cache_dir.is_dir() else ():
        if path not in current and not path.name.startswith(".tmp-"):
            path.unlink(missing_ok=True)
    for name in ("per_sample.csv", TEXTS_FILE, "summary.json", "missing.txt"):
        (out_dir / name).unlink(missing_ok=True)


def evaluate(pred_dirs: list[Path | Run], records: list[EditRecord], out_dir: Path, groups: list[str] | None = None,
             weights: dict[str, Path] | None = None, batch_size: int = 8, device=None,
             manifest: Path | None = None, show_progress: bool = True, overwrite: bool = False,
             run_config: dict | None = None, metric_options: dict[str, dict] | None = None) -> dict | None:
    """Score every prediction folder (a Path: the run is named by the folder; a Run: by its name);
    returns the summary on rank 0 (None on other ranks), which also writes `run.json` (what ran;
    `run_config` adds entries to its config, e.g. the CLI's arguments). `metric_options` gives feature
    metrics their options by name, e.g. {"judge": {"protocol": "editscore"}}."""
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; eval writes a folder (per_sample.csv, summary.json, cache/)")
    weights = {k: Path(v) for k, v in (weights or {}).items()}
    groups = resolve_groups(groups, weights)
    runs = runs_from_dirs(pred_dirs)
    if not records:
        raise UserError(f"{manifest or 'manifest'}: no records to evaluate")
    metric_options = metric_options or {}
    settings = metric_settings(weights, metric_options)
    models = FeatureModels(weights, torch.device(dist.resolve_device(None if device is None else str(device))),
                           metric_options)
    with rank_group() as group:
        claim_out_folder(out_dir, weights, overwrite, settings)
        if overwrite:
            clear_results(out_dir, runs, records)
        cache_dir = out_dir / "cache"
        models.check(groups)  # a metric asked for that lacks weights gets its "how to enable" line
        work = plan(runs, records, groups, cache_dir, models)
        with make_progress("sample", disable=not show_progress) as progress:
            task = progress.add_task(f"eval rank {dist.rank()}", total=len(work), status="")
            for i in range(0, len(work), batch_size):
                batch = work[i:i + batch_size]
                compute_batch(batch, cache_dir, models)
                progress.advance(task, len(batch))
        # each rank has saved its cache entries before it joins: once the gather returns, all are on disk
        for reasons in gather(models.unavailable, group):
            models.unavailable.update(reasons)
    if dist.rank() != 0:
        return None
    summary = merge(runs, records, groups, out_dir, models.unavailable, manifest, models.device)
    summary["computed"] = len(work)
    write_json(out_dir / "summary.json", summary)
    write_run_manifest(out_dir, "eval", {
        "runs": {run.name: str(run.pred_dir) for run in runs}, "data": str(manifest) if manifest else None,
        "metrics": groups, "weights": {k: str(v) for k, v in weights.items()}, "metric_settings": settings,
        "batch_size": batch_size,
        "device": str(models.device), "world_size": dist.world_size(), "overwrite": overwrite,
        **(run_config or {})})
    return summary


def _category(record: EditRecord) -> str:
    meta = record.metadata or {}
    return str(meta.get("edit_type") or meta.get("category") or "")


def _abs(path) -> str:
    """Absolute paths in the table, so that `editkit compare` finds the images from any folder."""
    return os.path.abspath(path) if path else ""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def merge(runs: list[Run], records: list[EditRecord], groups: list[str], out_dir: Path,
          unavailable: dict[str, str], manifest: Path | None, device=None) -> dict:
    """Combine all cache entries into per_sample.csv and the summary (rank 0)."""
    from editkit.eval.metrics import FEATURE_METRICS, RUN_GROUPS, columns_of
    from editkit.eval.metrics.distribution import fid_kid_from_features

    cache_dir = out_dir / "cache"
    metric_columns = [c for g in groups if g not in RUN_GROUPS and g not in unavailable for c in columns_of(g)]
    text_columns = [c for g in groups if g in FEATURE_METRICS and g not in unavailable
                    for c in FEATURE_METRICS[g].text_columns]
    rows, texts, run_summaries = [], [], {}
    for run in runs:
        missing, evaluated, real, fake = [], 0, [], []
        values: dict[str, list[float]] = {c: [] for c in metric_columns}
        for record in records:
            pred = find_prediction(run.pred_dir, record.id)
            if pred is None:
                missing.append(record.id)
                continue
            entry = load_entry(entry_path(cache_dir, run.name, record.id), record, pred)
            evaluated += 1
            row = {"run": run.name, "id": record.id, "task": record.task or "", "edit_type": _category(record),
                   "instruction": record.instruction, "pred": _abs(pred), "target": _abs(record.target),
                   "sources": json.dumps([_abs(s) for s in record.sources]), "mask": _abs(record.mask)}
            for c in metric_columns:
                row[c] = entry.value(c)
                values[c].append(row[c])
            rows.append(row)
            if text_columns:
                texts.append({"run": run.name, "id": record.id, **{c: entry.texts.get(c) for c in text_columns}})
            f_pred, f_target = entry.feature("effnet_pred"), entry.feature("effnet_target")
            if f_pred is not None and f_target is not None:
                fake.append(f_pred)
                real.append(f_target)
        means = {c: _nanmean(v) for c, v in values.items()}
        summary = {"pred_dir": str(run.pred_dir), "n_records": len(records), "n_evaluated": evaluated,
                   "n_missing": len(missing), "missing": missing, "means": means}
        if "fid" in groups and "effnet" not in unavailable:
            summary["means"].update(fid_kid_from_features(np.stack(real) if real else np.zeros((0, 1280)),
                                                          np.stack(fake) if fake else np.zeros((0, 1280)),
                                                          device))
        run_summaries[run.name] = summary
    header = [*INFO_COLUMNS, *metric_columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in header})
    write_text(out_dir / "per_sample.csv", buf.getvalue())
    if text_columns:
        write_text(out_dir / TEXTS_FILE, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
    else:
        (out_dir / TEXTS_FILE).unlink(missing_ok=True)
    write_text(out_dir / "missing.txt", "".join(f"{name}\t{i}\n" for name, s in run_summaries.items()
                                                for i in s["missing"]))
    return {
        "manifest": str(manifest) if manifest else None,
        "resize_policy": RESIZE_POLICY,
        "clip_t_text": CLIP_T_TEXT,
        "metric_groups": groups,
        "columns": metric_columns,
        "unavailable": unavailable,
        "runs": run_summaries,
    }


def _nanmean(values: list[float]) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None
