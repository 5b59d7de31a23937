"""`editkit compare`: statistics, plots, the HTML report (also opened in headless Chromium)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from PIL import Image

from editkit.errors import UserError
from editkit.eval.compare import cfg_of, compare_runs
from editkit.eval.report import build_report
from editkit.eval.runner import evaluate
from tests.eval_fixtures import make_dataset, make_predictions

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    manifest, records = make_dataset(root / "data", n=8)
    runs = root / "runs"
    make_predictions(runs / "cfg-2.0", records, noise=0.10, skip=("s5",))
    make_predictions(runs / "cfg-4.0", records, noise=0.03, seed=2)
    make_predictions(runs / "cfg-6.0", records, noise=0.05, seed=3)
    first = root / "eval-a"
    second = root / "eval-b"
    evaluate([runs / "cfg-2.0", runs / "cfg-4.0"], records, first, ["pixel", "seam"], show_progress=False)
    evaluate([runs / "cfg-6.0"], records, second, ["pixel", "seam"], show_progress=False)
    out = root / "cmp"
    result = compare_runs([first, second], out, baseline="cfg-2.0", n_boot=500)
    return root, first, second, out, result


def test_statistics_tables(evaluated):
    root, first, second, out, result = evaluated
    assert result["runs"] == ["cfg-2.0", "cfg-4.0", "cfg-6.0"]
    assert result["categories"] == ["color", "object"]
    psnr = result["results"]["cfg-4.0"]["metrics"]["psnr"]["all"]
    assert psnr["low"] <= psnr["mean"] <= psnr["high"] and psnr["n"] == 8
    assert psnr["diff_low"] > 0  # clearly better than the baseline, on the 7 shared samples
    assert psnr["diff_n"] == 7
    assert "diff_mean" not in result["results"]["cfg-2.0"]["metrics"]["psnr"]["all"]
    assert result["results"]["cfg-4.0"]["metrics"]["psnr"]["color"]["n"] == 4
    assert result["results"]["cfg-2.0"]["n_missing"] == 1
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["run"], r["category"]) for r in rows if r["metric"] == "ssim_out"} == {
        (run, cat) for run in result["runs"] for cat in ("all", "color", "object")}
    assert json.loads((out / "compare.json").read_text())["baseline"] == "cfg-2.0"


def test_plots_are_written(evaluated):
    root, first, second, out, result = evaluated
    for name in ("psnr_vs_cfg.png", "psnr_per_category.png", "ssim_vs_cfg.png"):
        with Image.open(out / "plots" / name) as img:
            assert img.size[0] > 200


def test_no_cfg_plot_when_runs_share_one_cfg(tmp_path):
    manifest, records = make_dataset(tmp_path / "data", n=4)
    for name, seed in (("steps-1-cfg-1", 1), ("steps-2-cfg-1", 2)):
        make_predictions(tmp_path / "runs" / name, records, noise=0.05, seed=seed)
    evaluate(sorted((tmp_path / "runs").iterdir()), records, tmp_path / "eval", ["pixel"], show_progress=False)
    compare_runs([tmp_path / "eval"], tmp_path / "cmp", n_boot=100)
    assert not list((tmp_path / "cmp").rglob("*_vs_cfg.png"))


def test_report_is_one_file_with_every_run(evaluated):
    root, first, second, out, result = evaluated
    page = (out / "report.html").read_text()
    assert "src=\"data:image/jpeg;base64," in page and "src=\"data:image/png;base64," in page
    assert "file://" not in page and "http" not in page.replace("http-equiv", "")
    for run in result["runs"]:
        assert f'<th class="run">{run}</th>' in page


def test_cfg_from_name_or_run_json(tmp_path):
    assert cfg_of("cfg-4.0", None) == 4.0 and cfg_of("model_cfg7", None) == 7.0
    (tmp_path / "run.json").write_text(json.dumps({"config": {"true_cfg_scale": 3.5}}))
    assert cfg_of("ckpt-a", {"pred_dir": str(tmp_path)}) == 3.5
    assert cfg_of("ckpt-b", None) is None


def test_bad_compare_inputs(evaluated, tmp_path):
    root, first, second, out, result = evaluated
    with pytest.raises(UserError, match="--baseline nope: no such run"):
        compare_runs([first], tmp_path / "x", baseline="nope")
    with pytest.raises(UserError, match="no per_sample.csv"):
        compare_runs([tmp_path], tmp_path / "x")
    with pytest.raises(UserError, match="also in"):
        compare_runs([first, first], tmp_path / "x")


def test_compare_report_takes_extra_sections_and_images(evaluated, tmp_path):
    root, first, second, out, result = evaluated
    Image.new("RGB", (120, 80), "white").save(tmp_path / "loss.png")
    compare_runs([first], tmp_path / "cmp", n_boot=200, extra_sections=[("Headline", "<p>best cfg 4.0</p>")],
                 extra_images=[("Training loss", tmp_path / "loss.png")])
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.index("<h2>Headline</h2>") < page.index("<h2>Summary</h2>")
    assert "<figcaption>Training loss</figcaption>" in page


def test_build_report_for_other_jobs(tmp_path):
    """The demo's use: headline numbers and a loss curve, nothing else."""
    Image.new("RGB", (120, 80), "white").save(tmp_path / "loss.png")
    path = build_report(tmp_path / "r.html", "Demo", extra_sections=[("Headline", "<p>PSNR <b>31.2</b> dB</p>")],
                        extra_images=[("Loss curve", tmp_path / "loss.png")])
    page = path.read_text()
    assert "<h2>Headline</h2><p>PSNR <b>31.2</b> dB</p>" in page and "Loss curve" in page


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed at /usr/bin/chromium")
def test_report_opens_in_headless_chromium_and_sorts(evaluated, tmp_path):
    from playwright.sync_api import sync_playwright

    root, first, second, out, result = evaluated
    page_path = tmp_path / "report.html"
    shutil.copy(out / "report.html", page_path)  # one file: it must work away from its folder
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            headers = page.locator("#gallery th.run").all_inner_texts()
            assert headers == result["runs"]
            assert page.locator("#gallery tbody tr").count() == 8
            images = page.locator("#gallery img")
            assert images.count() > 0
            assert all(images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
                       for i in range(images.count()))
            summary_runs = page.locator("#summary tbody tr td:first-child").all_inner_texts()
            assert [r.replace(" (baseline)", "") for r in summary_runs] == result["runs"]
            # worst first: the per-sample table starts with the lowest PSNR
            psnr_col = page.locator("#samples th").all_inner_texts().index("psnr")
            values = [float(v) for v in page.locator(f"#samples tbody td:nth-child({psnr_col + 1})").all_inner_texts()]
            assert values == sorted(values)
            mse_col = page.locator("#samples th").all_inner_texts().index("mse")
            header = page.locator("#samples th").nth(mse_col)
            header.click()
            header.click()  # second click: descending
            cells = page.locator(f"#samples tbody td:nth-child({mse_col + 1})").all_inner_texts()
            mse = [float(v) for v in cells]
            assert mse == sorted(mse, reverse=True)
        finally:
            browser.close()
    assert errors == []
