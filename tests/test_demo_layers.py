"""`editkit demo --layers --quick` end to end: every stage's artifacts, the LayerD headline against
the untrained model, a re-run resumes, and mixing it with another demo or --train-vae is refused."""

import json

import pytest

from tests.cli_run import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from typer.testing import CliRunner

    from editkit.cli import app

    out = tmp_path_factory.mktemp("demo-layers") / "run"
    result = CliRunner().invoke(app, ["demo", "--layers", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_stage_leaves_its_artifacts(demo_out):
    from editkit.layers.decompose import layer_files
    from editkit.layers.records import read_prepared

    out, output = demo_out
    train = read_prepared(out / "data" / "train")
    test = read_prepared(out / "data" / "test")
    assert {e.split for e in train} == {"train", "val"} and {e.split for e in test} == {"val"}
    assert (out / "model" / "model_index.json").is_file()
    assert (out / "decomposer" / "final" / "transformer" / "config.json").is_file()
    assert list((out / "decomposer" / "previews").glob("*.png"))
    for run in ("decomposer", "untrained"):
        for entry in test:  # layer counts of the ground truth (`layers infer --layers auto`)
            assert len(layer_files(out / "infer" / run / entry.id)) == len(entry.layers), (run, entry.id)
    assert (out / "eval" / "per_sample.csv").is_file()
    assert (out / "report" / "report.html").is_file()
    headline = json.loads((out / "headline.json").read_text())
    assert headline["test_samples"] == len(test)
    for run in ("decomposer", "untrained"):
        assert 0 <= headline[run]["rgb_l1_m0"] <= 1 and 0 <= headline[run]["alpha_iou_m0"] <= 1
    assert headline["rgb_l1_m0_ratio"] == pytest.approx(
        headline["decomposer"]["rgb_l1_m0"] / headline["untrained"]["rgb_l1_m0"])
    assert "RGB L1 ratio decomposer / untrained" in output


def test_a_rerun_resumes_and_other_demos_are_refused(demo_out, capsys, tmp_path):
    out, _ = demo_out
    code, stdout, _ = run_cli(capsys, "demo", "--layers", "--quick", "--out", out)
    assert code == 0, stdout
    assert json.loads((out / "timings.json").read_text())["stage_seconds"] == {}  # every stage skipped
    code, _, err = run_cli(capsys, "demo", "--layers", "--out", out)  # the full preset into the quick folder
    assert code == 2 and "layers-quick" in err
    code, _, err = run_cli(capsys, "demo", "--layers", "--quick", "--train-vae", "--out", tmp_path / "new")
    assert code == 2 and "--train-vae" in err
