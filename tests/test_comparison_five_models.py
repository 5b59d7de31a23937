"""The five-model comparison end to end through the CLI (tiny models, CPU): Qwen-Image-Edit base, the
Qwen LoRA ablation (a bundle trained for a few steps, run without its STE, pixel-mask fusion, CFG 4),
Flux Fill, ACE++ with a LoRA in its file layout, and InstructPix2Pix as MagicBrush, each run by
`editkit infer` on the synthetic test split (with masks), scored by one `editkit eval` (pixel metrics
and a tiny DINO for a feature metric) and compared by `editkit compare` against the Qwen base."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from types import SimpleNamespace

import pytest
import torch

from editkit.eval.compare import cfg_sweep
from editkit.eval.runner import INFO_COLUMNS
from tests.cli_run import run_cli

pytestmark = pytest.mark.slow

BASELINE = "qwen-base"
CPU = ("--dtype", "fp32", "--device", "cpu")
PIXEL = [f"{m}{region}" for region in ("", "_in", "_out") for m in ("mse", "mae", "psnr", "ssim")]


def _lora_config(path, cache, out):
    """A 2-step LoRA with the STE as an extra module: its bundle is what the ablation runs without."""
    path.write_text(f"""model: tiny
output_dir: {out}
seed: 0
data: {{cache: [{cache}], batch_size: 2, area: 4096, multiple: 16}}
train: {{mode: lora, lora: {{rank: 4}}, extra_modules: [ste]}}
optim: {{lr: 5.0e-2, schedule: constant}}
loop: {{max_steps: 2, checkpoint_every: 1000, tensorboard: false, mixed_precision: "no"}}
""")
    return path


def _ace_lora(path, width: int = 32, rank: int = 4):
    """A tiny ACE++ LoRA: kohya-prefixed BFL module names with an alpha each, as ACE++ ships them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, fan_out in (("double_blocks_0_img_attn_qkv", 3 * width), ("single_blocks_0_linear1", 7 * width)):
        tensors[f"lora_unet_{name}.lora_down.weight"] = 0.2 * torch.randn(rank, width, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = 0.2 * torch.randn(fan_out, rank, generator=g)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def _tiny_dino(folder):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


class _Capture:
    """What `run_cli` needs of pytest's capsys, for a module-scoped fixture (capsys is per test)."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self):
        captured = SimpleNamespace(out=self.out.getvalue(), err=self.err.getvalue())
        self.out, self.err = io.StringIO(), io.StringIO()
        return captured


def _cli(capture: _Capture, *args) -> str:
    """`editkit ARGS` in this process; its stdout (a failure shows its stderr)."""
    with contextlib.redirect_stdout(capture.out), contextlib.redirect_stderr(capture.err):
        code, out, err = run_cli(capture, *args)
    assert code == 0, f"editkit {' '.join(map(str, args[:2]))}: {err}"
    return out


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The whole comparison, run once: (root, test records, run name -> prediction folder)."""
    from editkit.data import read_manifest

    root = tmp_path_factory.mktemp("five")
    capture = _Capture()

    def cli(*args):
        return _cli(capture, *args)

    data = root / "data"
    cli("data", "synth", "--out", data, "--n", "8", "--size", "64", "--val-fraction", "0", "--test-fraction", "0.5",
        "--workers", "1")
    cli("cache", "--model", "tiny", "--data", data / "train.jsonl", "--out", root / "cache", "--area", "4096",
        "--multiple", "16", *CPU)
    cli("train", _lora_config(root / "lora.yaml", root / "cache", root / "run"))
    test = data / "test.jsonl"
    common = ("--data", test, "--steps", "2", *CPU)
    preds = root / "preds"
    cli("infer", "--model", "tiny:qwen-image-edit-2511", "--out", preds / "qwen-base", "--cfg", "4", *common)
    cli("infer", "--model", "tiny:qwen-image-edit-2511", "--out", preds / "qwen-lora", "--adapter",
        root / "run" / "final" / "adapter.safetensors", "--without", "ste", "--fusion", "pixel-mask", "--cfg", "4",
        *common)
    cli("infer", "--model", "tiny:flux-fill", "--out", preds / "flux-fill", "--cfg", "30", *common)
    cli("infer", "--model", "tiny:ace-plus", "--out", preds / "ace-plus", "--lora", _ace_lora(root / "ace.safetensors"),
        *common)
    cli("infer", "--model", "tiny:instruct-pix2pix", "--out", preds / "magicbrush", "--cfg", "7.5",
        "--image-cfg", "1.5", *common)
    runs = {"qwen-base": preds / "qwen-base" / "cfg-4.0", "qwen-lora": preds / "qwen-lora" / "cfg-4.0",
            "flux-fill": preds / "flux-fill" / "cfg-30.0", "ace-plus": preds / "ace-plus" / "cfg-50.0",
            "magicbrush": preds / "magicbrush" / "cfg-7.5"}
    cli("eval", *[a for name, d in runs.items() for a in ("--pred", f"{name}={d}")], "--data", test,
        "--out", root / "eval", "--metrics", "pixel,dino", "--weights", f"dino={_tiny_dino(root / 'dino')}",
        "--device", "cpu")
    cli("compare", root / "eval", "--baseline", BASELINE, "--out", root / "cmp", "--n-boot", "200")
    return root, read_manifest(test), runs


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_model_edited_every_sample_with_its_familys_settings(comparison):
    from PIL import Image

    root, records, runs = comparison
    assert len(records) == 4 and all(r.mask is not None for r in records)  # Flux Fill and ACE++ need the masks
    for name, folder in runs.items():
        assert sorted(p.stem for p in folder.glob("*.png")) == sorted(r.id for r in records), name
    configs = {name: _strict_json(folder / "run.json")["config"] for name, folder in runs.items()}
    assert {n: c["family"] for n, c in configs.items()} == {
        "qwen-base": "qwen-image-edit-2511", "qwen-lora": "qwen-image-edit-2511", "flux-fill": "flux-fill",
        "ace-plus": "ace-plus", "magicbrush": "instruct-pix2pix"}
    assert configs["qwen-lora"]["adapter"]["without"] == ["ste"] and configs["qwen-lora"]["fusion"] == "pixel-mask"
    assert configs["ace-plus"]["true_cfg_scale"] == 50.0 and len(configs["ace-plus"]["lora"]) == 1
    assert configs["magicbrush"]["image_cfg"] == 1.5
    with Image.open(next(runs["ace-plus"].glob("*.png"))) as img:
        assert img.size == (64, 64)  # one 64 px image without a reference: the canvas is the image


def test_compare_gives_every_metric_with_cis_and_paired_differences(comparison):
    root, records, runs = comparison
    result = json.loads((root / "cmp" / "compare.json").read_text())
    assert result["runs"] == list(runs) and result["baseline"] == BASELINE
    assert set(PIXEL) | {"dino"} <= set(result["metrics"])
    categories = sorted({r.task for r in records})
    assert result["categories"] == categories
    for run in runs:
        for metric in [*PIXEL, "dino"]:
            entry = result["results"][run]["metrics"][metric]["all"]
            assert entry["n"] == 4 and entry["low"] - 1e-9 <= entry["mean"] <= entry["high"] + 1e-9, (run, metric)
            assert ("diff_n" in entry) == (run != BASELINE)
            if run != BASELINE:
                assert entry["diff_n"] == 4
            per_category = result["results"][run]["metrics"][metric]
            assert sum(per_category[c]["n"] for c in categories) == 4
    psnr_out = {run: result["results"][run]["metrics"]["psnr_out"]["all"] for run in runs}
    # pixel-mask fusion pastes the source back outside the mask, where the synthetic target is the source
    assert psnr_out["qwen-lora"]["diff_low"] > 0 and psnr_out["qwen-lora"]["mean"] > psnr_out["flux-fill"]["mean"]
    with (root / "cmp" / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["run"], r["category"]) for r in rows if r["metric"] == "ssim_in"} == {
        (run, c) for run in runs for c in ["all", *categories]}
    # the CFG values of five models are not one axis: no metric-vs-CFG plot, the per-category bars are there
    assert not list((root / "cmp" / "plots").glob("*_vs_cfg.png"))
    assert (root / "cmp" / "plots" / "psnr_per_category.png").is_file()


def test_a_summary_per_model_and_one_full_report(comparison):
    root, records, runs = comparison
    for run in runs:
        summary = _strict_json(root / "cmp" / "runs" / run / "summary.json")
        assert summary["run"] == run and summary["is_baseline"] == (run == BASELINE)
        assert (summary["n_records"], summary["n_evaluated"], summary["n_missing"]) == (4, 4, 0)
        assert set(PIXEL) | {"dino"} <= set(summary["metrics"])
        psnr = summary["metrics"]["psnr"]
        assert psnr["low"] - 1e-9 <= psnr["mean"] <= psnr["high"] + 1e-9 and psnr["n"] == 4
        assert ("diff_mean" in psnr) == (run != BASELINE)
        assert set(summary["categories"]) == {r.task for r in records}
    with (root / "cmp" / "full_report.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header[:len(INFO_COLUMNS)] == list(INFO_COLUMNS) and set(PIXEL) | {"dino"} <= set(header)
    assert sorted((r["run"], r["id"]) for r in rows) == sorted((run, rec.id) for run in runs for rec in records)
    assert all(r["psnr"] and r["dino"] and r["psnr_in"] for r in rows)


def test_a_new_compare_into_the_folder_keeps_no_summary_of_an_earlier_run(comparison, tmp_path):
    from editkit.eval.compare import compare_runs

    root, records, runs = comparison
    stale = tmp_path / "cmp" / "runs" / "cfg-9.0" / "summary.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    compare_runs([root / "eval"], tmp_path / "cmp", baseline="flux-fill", n_boot=100)
    assert sorted(p.name for p in (tmp_path / "cmp" / "runs").iterdir()) == sorted(runs)
    assert _strict_json(tmp_path / "cmp" / "runs" / "flux-fill" / "summary.json")["is_baseline"]


def test_report_table_and_gallery_show_every_model_and_sample(comparison):
    root, records, runs = comparison
    page = (root / "cmp" / "report.html").read_text()
    summary = page[page.index('<table id="summary"'):]
    summary = summary[:summary.index("</table>")]
    assert [re.sub(r" \(baseline\)$", "", r) for r in re.findall(r"<tr><td>([^<]+)</td>", summary)] == list(runs)
    all_metrics = page[page.index('<table id="table-0"'):]
    all_metrics = all_metrics[:all_metrics.index("</table>")]
    assert re.findall(r'<th data-col="\d+">([^<]+)</th>', all_metrics) == [
        "metric", *runs, *[f"Δ{run}" for run in runs if run != BASELINE]]
    assert {"psnr_in ↑", "mse_out ↓", "dino ↑"} <= set(re.findall(r"<tr><td>([^<]+)</td>", all_metrics))
    gallery = page[page.index('<table id="gallery"'):]
    gallery = gallery[:gallery.index("</table>")]
    assert re.findall(r'<th class="run">([^<]+)</th>', gallery) == list(runs)
    rows = gallery.split('<tr><td class="id">')[1:]
    assert sorted(re.match(r"<b>([^<]+)</b>", row).group(1) for row in rows) == sorted(r.id for r in records)
    for row in rows:
        cells = row.split("<td>")[3:]  # after the id, sources and ground-truth cells: one per run
        assert len(cells) == len(runs) and all('<img src="data:image/jpeg;base64,' in c for c in cells)
        assert "missing" not in row


def test_cfg_sweep_plots_one_models_runs_only():
    def result(models):
        return {"runs": list(models), "results": {run: {"cfg": cfg, "model": model}
                                                    for run, (model, cfg) in models.items()}}

    five = result({"qwen": ("q", 4.0), "lora": ("l", 4.0), "flux": ("f", 30.0), "ace": ("a", 50.0),
                   "ip2p": ("i", 7.5)})
    assert cfg_sweep(five) == []
    sweep = result({"q2": ("q", 2.0), "q4": ("q", 4.0), "flux": ("f", 30.0), "q6": ("q", 6.0), "ip2p": ("i", 7.5)})
    assert cfg_sweep(sweep) == ["q2", "q4", "q6"]
    by_name = result({"cfg-2.0": (None, 2.0), "cfg-4.0": (None, 4.0)})  # no run.json: a sweep by the names
    assert cfg_sweep(by_name) == ["cfg-2.0", "cfg-4.0"]
