"""`editkit compare`: per-metric means with 95% bootstrap CIs, paired differences to a baseline,
per-category breakdowns, plots and the HTML report, from `editkit eval` output folders."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from editkit.errors import UserError
from editkit.eval.report import GalleryItem, build_report
from editkit.eval.runner import INFO_COLUMNS
from editkit.eval.stats import bootstrap_mean, paired_difference
from editkit.utils.atomic import atomic_dir, write_json, write_text

KEY_METRICS = ("psnr", "ssim", "mae", "psnr_out", "ssim_out", "effnet_sim", "clip_i", "clip_t", "dino",
               "dinov3", "siglip2", "seam", "ghost")
_CFG = re.compile(r"cfg[-_=]?(\d+(?:\.\d+)?)", re.IGNORECASE)
_MODEL_KEYS = ("model", "transformer", "family", "lora", "adapter", "rope_frames")
ALL = "all"
SUMMARY_FILE = "summary.json"
"""Each run's statistics: <out>/runs/<run>/summary.json."""
FULL_REPORT_FILE = "full_report.csv"
"""Every run's per-sample rows in one table: <out>/full_report.csv."""


def _float(text: str) -> float:
    try:
        return float(text) if text != "" else math.nan
    except ValueError:
        return math.nan


_REWRITE = "run `editkit eval` again with the same --out to rewrite it"


def read_table(folder: Path) -> tuple[list[dict], list[str]]:
    """per_sample.csv of an eval folder: rows (metric values as floats) and its metric columns."""
    path = folder / "per_sample.csv"
    if not path.is_file():
        raise UserError(f"{folder}: no per_sample.csv; pass folders written by `editkit eval --out`")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            lacking = [c for c in ("run", "id") if c not in header]
            if lacking:
                raise UserError(f"{path}: no {' or '.join(lacking)} column; not a table `editkit eval` wrote "
                                f"({_REWRITE})")
            cols = [c for c in header if c not in INFO_COLUMNS]
            rows = []
            for row in reader:
                if None in row or any(row.get(c) is None for c in header):  # a row of another length
                    raise UserError(f"{path}:{reader.line_num}: the row does not match the header ({_REWRITE})")
                rows.append({**row, **{c: _float(row[c]) for c in cols}})
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not a readable CSV ({err.__class__.__name__}); {_REWRITE}") from None
    return rows, cols


def read_summaries(folder: Path) -> dict[str, dict]:
    """The per-run summaries of an eval folder's summary.json ({} when it has none)."""
    path = folder / "summary.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not valid JSON ({err.__class__.__name__}); {_REWRITE}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not all(isinstance(v, dict) and isinstance(v.get("means", {}), dict)
                                             for v in runs.values()):
        raise UserError(f"{path}: no 'runs' table of per-run summaries; {_REWRITE}")
    return runs


def load_eval_dirs(dirs: list) -> tuple[list[dict], list[str], dict[str, dict]]:
    """Rows (metric values as floats), metric columns in order, and per-run summaries.

    `dirs`: eval output folders, or (name, folder) pairs that rename a folder's one run."""
    from editkit.eval.runner import check_run_name

    rows, metrics, summaries, origin = [], [], {}, {}
    for item in dirs:
        name, d = item if isinstance(item, tuple) else (None, item)
        d = Path(d)
        table, cols = read_table(d)
        metrics += [c for c in cols if c not in metrics]
        here = read_summaries(d)
        dir_runs = list(dict.fromkeys(r["run"] for r in table))
        if name is not None:
            if len(dir_runs) != 1:
                raise UserError(f"{name}={d}: NAME=DIR renames the one run of an eval folder, but it holds "
                                f"{len(dir_runs)} ({', '.join(dir_runs)}); give the folder without a name")
            check_run_name(name, f"{name}={d}")
            here = {name: here[dir_runs[0]]} if dir_runs[0] in here else {}
            table = [{**r, "run": name} for r in table]
            dir_runs = [name]
        for run in dir_runs:
            check_run_name(run, f"{d / 'per_sample.csv'}")
            if run in origin:
                raise UserError(f"{d}: run '{run}' is also in {origin[run]}; compare each run once, or name them "
                                "apart with NAME=DIR")
            origin[run] = d
        rows += table
        summaries.update({run: summary for run, summary in here.items() if run in dir_runs})
    if not rows:
        raise UserError(f"{', '.join(map(str, dirs))}: no evaluated samples to compare")
    return rows, metrics, summaries


def _infer_config(summary: dict | None) -> dict:
    """The `config` of the run.json that `editkit infer` wrote beside a run's predictions ({} without one)."""
    pred_dir = (summary or {}).get("pred_dir")
    if not pred_dir or not (Path(pred_dir) / "run.json").is_file():
        return {}
    try:
        config = json.loads((Path(pred_dir) / "run.json").read_text()).get("config", {})
    except (ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def cfg_of(run: str, summary: dict | None) -> float | None:
    """The CFG scale of a run: from its name (cfg-4.0, cfg4) or the run.json beside its predictions."""
    match = _CFG.search(run)
    if match:
        return float(match.group(1))
    config = _infer_config(summary)
    for key in ("true_cfg_scale", "cfg", "cfg_scale", "guidance_scale"):
        if isinstance(config.get(key), (int, float)):
            return float(config[key])
    return None


def model_of(summary: dict | None) -> str | None:
    """What made a run's predictions apart from its CFG (model, family, LoRAs, adapter; from its run.json),
    or None without one: runs of one model at several CFG values are a sweep; the CFG values of
    different models (Qwen's true CFG 4, Flux Fill's embedded guidance 30) are not one axis."""
    config = _infer_config(summary)
    if not config:
        return None
    return json.dumps({k: config.get(k) for k in _MODEL_KEYS}, sort_keys=True, default=str)


def category_of(row: dict) -> str:
    return row.get("edit_type") or row.get("task") or ""


def compare_runs(dirs: list, out_dir: Path, baseline: str | None = None, n_boot: int = 2000, seed: int = 0,
                 title: str = "editkit comparison", gallery_size: int = 40, extra_sections=(), extra_images=()) -> dict:
    """Compare evaluated runs of eval folders (or (name, folder) pairs, see `load_eval_dirs`);
    `extra_sections` / `extra_images` go to the report first (see build_report)."""
    from editkit.eval.metrics import higher_is_better

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; compare writes a folder (compare.csv, plots/, report.html)")
    rows, metrics, summaries = load_eval_dirs(dirs)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    baseline = baseline or runs[0]
    if baseline not in runs:
        raise UserError(f"--baseline {baseline}: no such run; runs are: {', '.join(runs)}")
    rng = np.random.default_rng(seed)
    by_run = {run: {r["id"]: r for r in rows if r["run"] == run} for run in runs}
    categories = sorted({category_of(r) for r in rows} - {""})
    table, result_runs = [], {}
    for run in runs:
        run_result = {"cfg": cfg_of(run, summaries.get(run)), "model": model_of(summaries.get(run)),
                      "n_missing": summaries.get(run, {}).get("n_missing"), "metrics": {}, "run_level": {}}
        for metric in metrics:
            per_category = {}
            for category in [ALL, *categories]:
                samples = [r for r in by_run[run].values() if category == ALL or category_of(r) == category]
                interval = bootstrap_mean([r[metric] for r in samples], n_boot, rng=rng)
                entry = {"category": category, **interval.as_dict()}
                if run != baseline:
                    ids = [r["id"] for r in samples if r["id"] in by_run[baseline]]
                    diff = paired_difference([by_run[run][i][metric] for i in ids],
                                             [by_run[baseline][i][metric] for i in ids], n_boot, rng=rng)
                    entry.update(diff.as_dict("diff_"))
                per_category[category] = entry
                table.append({"run": run, "metric": metric, **entry})
            run_result["metrics"][metric] = per_category
        for key, value in (summaries.get(run, {}).get("means") or {}).items():
            if key.startswith(("fid_", "kid_")):
                run_result["run_level"][key] = value
        result_runs[run] = run_result
    result = {"baseline": baseline, "runs": runs, "metrics": metrics, "categories": categories,
              "n_boot": n_boot, "seed": seed, "confidence": 0.95, "results": result_runs}
    columns = ["run", "metric", "category", "mean", "low", "high", "n",
               "diff_mean", "diff_low", "diff_high", "diff_n"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k, ""))
                         for k in columns})
    write_text(out_dir / "compare.csv", buf.getvalue())
    write_json(out_dir / "compare.json", result)
    with atomic_dir(out_dir / "runs") as folder:  # replaced whole: no summary of a run compared before
        for run in runs:
            write_json(folder / run / SUMMARY_FILE, run_summary(run, result, summaries.get(run, {})))
    write_full_report(out_dir / FULL_REPORT_FILE, rows, metrics)
    plots = make_plots(out_dir / "plots", result)
    write_compare_report(out_dir / "report.html", title, result, rows, by_run, plots, gallery_size,
                         higher_is_better, extra_sections, extra_images)
    return result


def _finite(value):
    """NaN (no finite sample) as None, so that the per-run summaries are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def run_summary(run: str, result: dict, eval_summary: dict) -> dict:
    """One run's statistics (the content of <out>/runs/<run>/summary.json): each metric's mean, 95% CI
    and paired difference to the baseline over all samples (`metrics`) and per category (`categories`),
    FID/KID (`run_level`), and what `editkit eval` counted (records, evaluated, missing)."""
    r = result["results"][run]
    return {
        "run": run, "baseline": result["baseline"], "is_baseline": run == result["baseline"], "cfg": r["cfg"],
        **{k: eval_summary.get(k) for k in ("pred_dir", "n_records", "n_evaluated", "n_missing", "missing")},
        "confidence": result["confidence"], "n_boot": result["n_boot"], "seed": result["seed"],
        "metrics": {m: _finite(by_category[ALL]) for m, by_category in r["metrics"].items()},
        "categories": {c: {m: _finite(r["metrics"][m][c]) for m in result["metrics"]} for c in result["categories"]},
        "run_level": _finite(r["run_level"]),
    }


def write_full_report(path: Path, rows: list[dict], metrics: list[str]) -> Path:
    """Every compared run's per-sample rows (run names as compared) in one CSV: the eval columns, then
    every metric (empty where a run's eval folder has no such column or the value is not finite)."""
    columns = [*INFO_COLUMNS, *metrics]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = {m: row.get(m, math.nan) for m in metrics}
        writer.writerow({**{c: row.get(c, "") for c in INFO_COLUMNS},
                         **{m: f"{v:.6g}" if math.isfinite(v) else "" for m, v in values.items()}})
    write_text(path, buf.getvalue())
    return path


def _key_metrics(metrics: list[str]) -> list[str]:
    chosen = [m for m in KEY_METRICS if m in metrics]
    return chosen or metrics[:6]


def cfg_sweep(result: dict) -> list[str]:
    """The runs of the metric-vs-CFG plots: the runs of one model (`model_of`) at two or more CFG values
    (of several such models, the one with the most values; runs without a run.json count as one model),
    else none."""
    groups: dict[str | None, list[str]] = {}
    for run in result["runs"]:
        if result["results"][run]["cfg"] is not None:
            groups.setdefault(result["results"][run].get("model"), []).append(run)
    best = max(groups.values(), key=lambda runs: len({result["results"][r]["cfg"] for r in runs}), default=[])
    return best if len({result["results"][r]["cfg"] for r in best}) >= 2 else []


def make_plots(plot_dir: Path, result: dict) -> list[Path]:
    from editkit.eval import plots

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    key = _key_metrics(result["metrics"])[:4]
    with_cfg = cfg_sweep(result)
    if with_cfg:
        for metric in key:
            points = []
            for run in with_cfg:
                e = result["results"][run]["metrics"][metric][ALL]
                if not math.isnan(e["mean"]):
                    points.append((result["results"][run]["cfg"], e["mean"], e["low"], e["high"], run))
            if len(points) >= 2:
                paths.append(plots.metric_vs_cfg(plot_dir / f"{metric}_vs_cfg.png", metric, points))
    if result["categories"]:
        for metric in key:
            means = {(run, c): tuple(result["results"][run]["metrics"][metric][c][k] for k in ("mean", "low", "high"))
                     for run in result["runs"] for c in result["categories"]}
            paths.append(plots.category_bars(plot_dir / f"{metric}_per_category.png", metric,
                                             result["categories"], result["runs"], means))
    return paths


def _ci_text(entry: dict, prefix: str = "") -> str:
    mean, low, high = (entry.get(f"{prefix}{k}", math.nan) for k in ("mean", "low", "high"))
    if mean is None or math.isnan(mean):
        return ""
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def write_compare_report(path: Path, title: str, result: dict, rows: list[dict], by_run: dict, plots: list[Path],
                         gallery_size: int, higher_is_better, extra_sections=(), extra_images=()) -> Path:
    key = _key_metrics(result["metrics"])
    summary_rows = []
    for run in result["runs"]:
        r = result["results"][run]
        row = {"run": run + (" (baseline)" if run == result["baseline"] else ""),
               "cfg": r["cfg"] if r["cfg"] is not None else "", "missing": r["n_missing"] or 0}
        for metric in key:
            entry = r["metrics"][metric][ALL]
            row[metric] = entry["mean"]
            row[f"{metric} 95% CI"] = _ci_text(entry)
            row[f"Δ{metric} vs baseline"] = _ci_text(entry, "diff_")
        row.update(r["run_level"])
        summary_rows.append(row)
    run_level = list(dict.fromkeys(k for r in result["runs"] for k in result["results"][r]["run_level"]))
    summary_columns = ["run", "cfg", "missing", *[c for m in key for c in (m, f"{m} 95% CI", f"Δ{m} vs baseline")],
                       *run_level]
    primary = key[0]
    worse_first = 1.0 if higher_is_better(primary) else -1.0

    def badness(row: dict) -> float:
        v = row.get(primary, math.nan)
        return math.inf if math.isnan(v) else worse_first * v

    table_rows = sorted(rows, key=badness)
    table_columns = ["run", "id", "edit_type", "task", *result["metrics"]]
    ids = list(dict.fromkeys(r["id"] for r in rows))

    def sample_badness(i: str) -> float:
        vals = [by_run[run][i].get(primary, math.nan) for run in result["runs"] if i in by_run[run]]
        vals = [v for v in vals if not math.isnan(v)]
        return worse_first * float(np.mean(vals)) if vals else math.inf

    gallery = []
    for i in sorted(ids, key=sample_badness)[:gallery_size]:
        any_row = next(by_run[run][i] for run in result["runs"] if i in by_run[run])
        gallery.append(GalleryItem(
            id=i, caption=any_row.get("instruction", ""),
            sources=[Path(p) for p in json.loads(any_row.get("sources") or "[]")],
            target=Path(any_row["target"]) if any_row.get("target") else None,
            outputs={run: Path(by_run[run][i]["pred"]) if i in by_run[run] else None for run in result["runs"]},
            scores={run: f"{primary} {by_run[run][i][primary]:.4g}" for run in result["runs"]
                    if i in by_run[run] and not math.isnan(by_run[run][i].get(primary, math.nan))},
        ))
    arrow = {True: " ↑", False: " ↓"}
    all_metrics = [{"metric": m + arrow[bool(higher_is_better(m))],
                    **{run: _ci_text(result["results"][run]["metrics"][m][ALL]) for run in result["runs"]},
                    **{f"Δ{run}": _ci_text(result["results"][run]["metrics"][m][ALL], "diff_")
                       for run in result["runs"] if run != result["baseline"]}}
                   for m in result["metrics"]]
    all_columns = ["metric", *result["runs"], *[f"Δ{run}" for run in result["runs"] if run != result["baseline"]]]
    notes = [f"Baseline: {result['baseline']}. Means with 95% percentile-bootstrap intervals "
             f"({result['n_boot']} resamples, seed {result['seed']}); Δ = paired difference to the baseline on "
             f"the samples both runs have. Worst cases first by {primary}."]
    return build_report(path, title, notes=notes, summary_rows=summary_rows, summary_columns=summary_columns,
                        tables=[("All metrics (mean [95% CI], Δ vs baseline; ↑ higher / ↓ lower is better)",
                                 all_metrics, all_columns)],
                        table_rows=table_rows, table_columns=table_columns, gallery=gallery,
                        runs=result["runs"], plots=plots, extra_sections=extra_sections,
                        extra_images=extra_images)
