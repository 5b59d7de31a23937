"""CLI commands of this area: `editkit eval` and `editkit compare`."""

from __future__ import annotations

import glob
from pathlib import Path

import typer

from editkit.errors import UserError


def split_name(item: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a plain path (also one with '=' in it that exists) -> (None, item)."""
    name, sep, path = item.partition("=")
    if sep and name and path and "/" not in name and not glob.has_magic(name) and not Path(item).exists():
        return name, path
    return None, item


def _matches(pattern: str, option: str) -> list[Path]:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
        raise UserError(f"{option} {pattern}: the pattern matches nothing")
    return [Path(m) for m in matches if Path(m).is_dir() or not glob.has_magic(pattern)]


def expand_preds(items: list[str]):
    """`--pred` values as runs, in order: DIR or a glob (one run per folder, named by the folder) or
    NAME=DIR (one folder, named NAME); a folder given twice counts once."""
    from editkit.eval.runner import Run

    runs: dict[Path, Run] = {}
    for item in items:
        name, pattern = split_name(item)
        folders = _matches(pattern, "--pred")
        if name is not None and len(folders) != 1:
            raise UserError(f"--pred {item}: NAME=DIR names one folder, but {pattern} matches {len(folders)}")
        for folder in folders:
            runs.setdefault(folder, Run(name or folder.name, folder))
    return list(runs.values())


def parse_metric_weights(items: list[str]) -> dict[str, Path]:
    """`--weights NAME=PATH` values (a feature metric's weights folder) as {metric: path}."""
    weights = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--weights {item}: expected NAME=PATH, e.g. --weights clip=/models/clip-vit-base-patch32")
        weights[name.strip()] = Path(path).expanduser()
    return weights


def parse_metrics(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def eval_command(
    pred: list[str] = typer.Option(..., "--pred", help="Prediction folder(s) of <id>.png; repeat or use a glob "
                                                        "(one run per folder, named by the folder), or NAME=DIR "
                                                        "to name the run."),
    data: Path = typer.Option(..., "--data", help="Manifest of the evaluated records (ground truth, masks, sources)."),
    out: Path = typer.Option(..., "--out", help="Output folder (per_sample.csv, summary.json, cache/)."),
    metrics: list[str] = typer.Option(None, "--metrics", help="Metric groups, comma-separated: pixel, seam, effnet, "
                                                              "fid, clip, dino, dinov3, siglip2, dreamsim, lpips, judge "
                                                              "(VLM judge), rgba (RGBA reconstructions). "
                                                              "Default: pixel,seam,effnet,fid + those with --weights."),
    weights: list[str] = typer.Option([], "--weights", help="NAME=PATH: a weights folder for a feature metric "
                                                            "(HF format), e.g. clip=/models/clip-vit-base-patch32."),
    format: str = typer.Option(None, "--format", help="Manifest format (default: detected)."),
    field: list[str] = typer.Option(None, "--field", help="NAME=COLUMN: read a manifest field from another column, "
                                                          "e.g. --field prompt=caption (repeat)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples per feature-model batch."),
    device: str = typer.Option(None, "--device", help="Torch device (default: this rank's GPU, else CPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute everything in --out (needed when its "
                                                              "results were made with other metric weights)."),
    judge_prompts: str = typer.Option(None, "--judge-prompts", help="The VLM judge's protocol: viescore (default, "
                                                                    "GEdit-Bench), editscore, or a JSON/YAML file "
                                                                    "of prompt templates (docs/eval.md)."),
    lpips_net: str = typer.Option(None, "--lpips-net", help="The LPIPS backbone when the --weights lpips folder "
                                                            "holds several: alex, vgg or squeeze (PIE-Bench's). "
                                                            "Default: the first found, in that order."),
    task: str = typer.Option("edit", "--task", help="edit: images (<id>.png) against a manifest; layers: layer "
                                                    "decompositions (<id>/layer_00.png ..., back to front) against a "
                                                    "`layers prep` folder, with the LayerD metric."),
) -> None:
    """Score prediction folders against a manifest (resumable; shard with torchrun)."""
    import json

    if task != "edit":
        from editkit.eval.layers_run import run_from_cli

        return run_from_cli(task, expand_preds(pred), data, out, overwrite,
                            unused={"--metrics": metrics, "--weights": weights, "--format": format, "--field": field,
                                    "--lpips-net": lpips_net})

    from editkit.data import parse_field_overrides, read_manifest
    from editkit.eval.metrics import FEATURE_METRICS
    from editkit.eval.metrics.judge_protocol import load_protocol
    from editkit.eval.metrics.lpips_net import trunk_named
    from editkit.eval.runner import evaluate

    fields = parse_field_overrides(field)
    records = read_manifest(data, format=format, fields=fields)
    weight_map = parse_metric_weights(weights)
    options = {"judge": {"protocol": load_protocol(judge_prompts).identity()}} if judge_prompts else {}
    if lpips_net:
        options["lpips"] = {"net": trunk_named(lpips_net, "--lpips-net").name}
    summary = evaluate(expand_preds(pred), records, out, parse_metrics(metrics), weight_map, batch_size,
                       device=device, manifest=data, overwrite=overwrite,
                       run_config={"pred": pred, "fields": fields, "judge_prompts": judge_prompts,
                                   "lpips_net": lpips_net},
                       metric_options=options)
    if summary is None:
        return
    typer.echo(f"resize policy: {summary['resize_policy']}")
    for reason in summary["unavailable"].values():
        typer.echo(f"unavailable: {reason}")
    if not metrics and not weight_map:
        more = ", ".join(n for n, m in FEATURE_METRICS.items() if m.needs_weights)
        typer.echo(f"more metrics with --weights NAME=PATH: {more} (docs/eval.md)")
    for name, run in summary["runs"].items():
        shown = {k: round(v, 4) for k, v in run["means"].items() if v is not None and k in
                 ("psnr", "ssim", "mae", "psnr_out", "ssim_out", "effnet_sim", "clip_i", "dino", "fid_effnet",
                    "judge_overall")}
        typer.echo(f"{name}: {run['n_evaluated']}/{run['n_records']} evaluated, {run['n_missing']} missing "
                   f"{json.dumps(shown)}")
    typer.echo(f"computed {summary['computed']} new sample(s); wrote {out}/per_sample.csv and {out}/summary.json")


def compare_command(
    runs: list[str] = typer.Argument(..., help="Eval output folders (each with per_sample.csv) to compare; NAME=DIR "
                                               "renames the one run of a folder."),
    baseline: str = typer.Option(None, "--baseline", help="Run name to take paired differences against "
                                                          "(default: the first run)."),
    out: Path = typer.Option(..., "--out", help="Output folder (compare.csv/json, plots, report.html)."),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    title: str = typer.Option("editkit comparison", "--title", help="Report title."),
) -> None:
    """Compare evaluated runs: bootstrap CIs, paired differences, per-category breakdowns, plots, HTML report."""
    from editkit.eval.compare import compare_runs

    inputs = [(name, Path(d)) if name else Path(d) for name, d in map(split_name, runs)]
    result = compare_runs(inputs, out, baseline=baseline, n_boot=n_boot, seed=seed, title=title)
    typer.echo(f"baseline: {result['baseline']}; runs: {', '.join(result['runs'])}")
    typer.echo(f"wrote {out}/compare.csv, {out}/compare.json, {out}/report.html")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
