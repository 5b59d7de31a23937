"""`editkit demo --quick` end to end: every stage's artifacts exist, the loss fell, a re-run resumes."""

import csv
import json

import pytest
from typer.testing import CliRunner

from editkit.cli import app

pytestmark = pytest.mark.slow


def _losses(metrics_csv):
    with open(metrics_csv) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_stage_leaves_its_artifacts(demo_out):
    out, output = demo_out
    for split in ("train", "val", "test"):
        assert (out / "data" / f"{split}.jsonl").is_file()
    assert (out / "vae" / "final" / "vae" / "config.json").is_file()
    assert (out / "model" / "model_index.json").is_file()
    assert list((out / "cache").glob("index-r*.json"))
    assert (out / "editor" / "final" / "transformer" / "config.json").is_file()
    test_ids = [json.loads(line)["id"] for line in (out / "data" / "test.jsonl").read_text().splitlines() if line]
    assert test_ids
    for run in ("bridge-1-steps", "bridge-2-steps", "copy-source"):
        assert all((out / "infer" / run / f"{i}.png").is_file() for i in test_ids), run
    assert (out / "eval" / "per_sample.csv").is_file()
    assert (out / "report" / "report.html").is_file()
    headline = json.loads((out / "headline.json").read_text())
    assert headline["baseline_edit_mse"] > 0 and headline["edit_mse"] >= 0
    assert str(out / "report" / "report.html") in output.replace("\n", "")


def test_training_losses_fell(demo_out):
    out, _ = demo_out
    for run in ("vae", "editor"):
        losses = _losses(out / run / "metrics.csv")
        k = max(1, len(losses) // 5)
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k, run


def test_rerun_skips_every_stage(demo_out):
    out, _ = demo_out
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "timings.json").read_text())["stage_seconds"] == {}


def test_refuses_a_folder_of_another_preset(demo_out):
    out, _ = demo_out
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code != 0
    assert "quick" in str(result.exception) or "quick" in result.output
