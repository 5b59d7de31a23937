"""`editkit eval` / `compare` trust only what they computed: per-sample stamps of every input, the out
folder's fingerprint, only the asked-for metrics reported, run names, and one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image

import editkit.eval.runner as runner
from editkit.data import write_manifest
from editkit.errors import UserError
from editkit.eval.compare import compare_runs
from editkit.eval.runner import evaluate
from tests.cli_run import run_cli
from tests.eval_fixtures import make_dataset, make_predictions

FAST = ["pixel", "seam"]


@pytest.fixture
def dataset(tmp_path):
    manifest, records = make_dataset(tmp_path / "data", n=6)
    runs = tmp_path / "runs"
    make_predictions(runs / "cfg-2.0", records, noise=0.08)
    make_predictions(runs / "cfg-4.0", records, noise=0.02, seed=2)
    return manifest, records, runs


def _rows(out) -> dict[str, dict]:
    with (out / "per_sample.csv").open() as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_a_changed_target_mask_source_or_instruction_is_computed_again(dataset, tmp_path, monkeypatch):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    evaluate([runs / "cfg-4.0"], records, out, FAST, show_progress=False)
    before = _rows(out)
    red = tmp_path / "red.png"
    Image.new("RGB", (48, 48), "red").save(red)
    changed = list(records)
    changed[0] = dataclasses.replace(records[0], target=red)  # the manifest points at another target
    changed[1] = dataclasses.replace(records[1], mask=records[2].mask)
    changed[2] = dataclasses.replace(records[2], instruction="another instruction")
    changed[3] = dataclasses.replace(records[3], sources=[records[4].sources[0]])
    Image.new("RGB", (48, 48), "blue").save(records[4].target)  # a target edited in place
    write_manifest(changed, manifest)
    seen = []
    original = runner.load_sample
    monkeypatch.setattr(runner, "load_sample", lambda record, pred: seen.append(record.id) or original(record, pred))
    summary = evaluate([runs / "cfg-4.0"], changed, out, FAST, show_progress=False)
    assert summary["computed"] == 5 and sorted(seen) == ["s0", "s1", "s2", "s3", "s4"]
    after = _rows(out)
    assert float(after["s0"]["mse"]) > 0.1 > float(before["s0"]["mse"])  # scored against the new target
    assert float(after["s4"]["mse"]) > 0.1 > float(before["s4"]["mse"])
    assert after["s5"]["mse"] == before["s5"]["mse"]
    assert evaluate([runs / "cfg-4.0"], changed, out, FAST, show_progress=False)["computed"] == 0


def test_other_weights_are_refused_new_ones_are_added_and_overwrite_recomputes(dataset, tmp_path, monkeypatch):
    from tests.test_eval_features import _dino

    manifest, records, runs = dataset
    first, second = tmp_path / "dino-a", tmp_path / "dino-b"
    _dino(first)
    _dino(second)
    out = tmp_path / "out"
    evaluate([runs / "cfg-4.0"], records, out, ["pixel"], show_progress=False)
    added = evaluate([runs / "cfg-4.0"], records, out, ["pixel", "dino"], weights={"dino": first}, show_progress=False)
    assert added["computed"] == 6 and added["runs"]["cfg-4.0"]["means"]["dino"] is not None  # a new metric: fine
    assert evaluate([runs / "cfg-4.0"], records, out, ["pixel"], show_progress=False)["computed"] == 0
    with pytest.raises(UserError, match="differs in: weights") as err:
        evaluate([runs / "cfg-4.0"], records, out, ["dino"], weights={"dino": second}, show_progress=False)
    assert "--overwrite" in str(err.value) and "\n" not in str(err.value)
    seen = []
    original = runner._sample_metrics
    monkeypatch.setattr(runner, "_sample_metrics", lambda s, groups: seen.append(s.id) or original(s, groups))
    redone = evaluate([runs / "cfg-4.0"], records, out, ["pixel", "dino"], weights={"dino": second},
                      show_progress=False, overwrite=True)
    assert redone["computed"] == 6 and len(seen) == 6  # everything again, pixel metrics too
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["weights"]["dino"][0] == str(second)
    monkeypatch.setattr(runner, "RESIZE_POLICY", "prediction cropped")
    with pytest.raises(UserError, match="differs in: resize_policy"):
        evaluate([runs / "cfg-4.0"], records, out, ["pixel"], show_progress=False)


def test_only_the_metrics_asked_for_are_reported_unavailable(dataset, tmp_path, capsys, monkeypatch):
    import editkit.eval.metrics as metrics

    manifest, records, runs = dataset
    assert evaluate([runs / "cfg-4.0"], records, tmp_path / "a", ["pixel"], show_progress=False)["unavailable"] == {}
    asked = evaluate([runs / "cfg-4.0"], records, tmp_path / "b", ["pixel", "dino"], show_progress=False)
    assert list(asked["unavailable"]) == ["dino"] and "--weights dino=PATH" in asked["unavailable"]["dino"]
    monkeypatch.setattr(metrics, "DEFAULT_GROUPS", ("pixel",))  # the default set, without EfficientNet's CPU time
    code, printed, _ = run_cli(capsys, "eval", "--pred", runs / "cfg-4.0", "--data", manifest, "--out", tmp_path / "c")
    assert code == 0 and "unavailable" not in printed
    assert [line for line in printed.splitlines() if "--weights" in line] == [
        "more metrics with --weights NAME=PATH: clip, dino, dinov3, siglip2, dreamsim, lpips, judge (docs/eval.md)"]


def test_runs_are_named_with_name_equals_dir(dataset, tmp_path, capsys, monkeypatch):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "eval", "--pred", f"best={runs / 'cfg-4.0'}", "--pred", runs / "cfg-2.0",
                                 "--data", manifest, "--out", out, "--metrics", "pixel")
    assert code == 0, err
    assert "best: 6/6 evaluated" in printed and "cfg-2.0: 6/6 evaluated" in printed
    assert {r["run"] for r in csv.DictReader((out / "per_sample.csv").open())} == {"best", "cfg-2.0"}
    code, _, err = run_cli(capsys, "eval", "--pred", f"a={runs / 'cfg-4.0'}", "--pred", f"a={runs / 'cfg-2.0'}",
                           "--data", manifest, "--out", tmp_path / "o2", "--metrics", "pixel")
    assert code == 2 and "run name 'a' is also" in err
    code, _, err = run_cli(capsys, "eval", "--pred", f"a={runs / 'cfg-*'}", "--data", manifest,
                           "--out", tmp_path / "o3", "--metrics", "pixel")
    assert code == 2 and "matches 2" in err
    # a folder whose name has '=' in it is still a folder
    make_predictions(runs / "cfg=3", records, noise=0.05, seed=4)
    monkeypatch.chdir(runs)
    code, printed, err = run_cli(capsys, "eval", "--pred", "cfg=3", "--data", manifest, "--out", tmp_path / "o4",
                                 "--metrics", "pixel")
    assert code == 0 and "cfg=3: 6/6 evaluated" in printed, err


def test_compare_names_one_run_folders_apart(dataset, tmp_path, capsys):
    manifest, records, runs = dataset
    for name, run in (("ea", "cfg-2.0"), ("eb", "cfg-4.0")):  # both runs called "preds", as per-checkpoint folders are
        make_predictions(tmp_path / name / "preds", records, noise=0.08 if name == "ea" else 0.02)
        evaluate([tmp_path / name / "preds"], records, tmp_path / f"{name}-eval", ["pixel"], show_progress=False)
    with pytest.raises(UserError, match="also in .*NAME=DIR"):
        compare_runs([tmp_path / "ea-eval", tmp_path / "eb-eval"], tmp_path / "cmp", n_boot=100)
    code, printed, err = run_cli(capsys, "compare", f"step1={tmp_path / 'ea-eval'}", f"step2={tmp_path / 'eb-eval'}",
                                 "--out", tmp_path / "cmp", "--n-boot", 100)
    assert code == 0 and "runs: step1, step2" in printed, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["results"]["step2"]["metrics"]["psnr"]["all"]["diff_mean"] > 0
    both = tmp_path / "both-eval"
    evaluate([runs / "cfg-2.0", runs / "cfg-4.0"], records, both, ["pixel"], show_progress=False)
    code, _, err = run_cli(capsys, "compare", f"x={both}", "--out", tmp_path / "cmp2")
    assert code == 2 and "holds 2" in err


def test_broken_compare_inputs_and_outputs_are_one_line(dataset, tmp_path, capsys):
    manifest, records, runs = dataset
    good = tmp_path / "eval"
    evaluate([runs / "cfg-4.0"], records, good, ["pixel"], show_progress=False)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "compare", good, "--out", a_file)
    assert code == 2 and "--out" in err and "is a file" in err
    summary = (good / "summary.json").read_text()
    for broken, expected in ((summary[: len(summary) // 2], "not valid JSON"), ("[1, 2]", "no 'runs' table"),
                             (json.dumps({"runs": {"cfg-4.0": 3}}), "no 'runs' table")):
        (good / "summary.json").write_text(broken)
        code, _, err = run_cli(capsys, "compare", good, "--out", tmp_path / "cmp")
        assert code == 2 and "summary.json" in err and expected in err and "Traceback" not in err
    (good / "summary.json").write_text(summary)
    table = (good / "per_sample.csv").read_text()
    (good / "per_sample.csv").write_text(table.replace("run,", "name,", 1))
    code, _, err = run_cli(capsys, "compare", good, "--out", tmp_path / "cmp")
    assert code == 2 and "per_sample.csv: no run column" in err


def test_eval_refuses_a_file_out_a_bad_device_and_an_empty_manifest(dataset, tmp_path, capsys):
    manifest, records, runs = dataset
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = ["eval", "--pred", runs / "cfg-4.0", "--data", manifest, "--metrics", "pixel"]
    code, _, err = run_cli(capsys, *base, "--out", a_file)
    assert code == 2 and "--out" in err and "is a file" in err
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "o", "--device", "bogus")
    assert code == 2 and "--device 'bogus'" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, *base, "--out", tmp_path / "o", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(capsys, "eval", "--pred", runs / "cfg-4.0", "--data", empty, "--out", tmp_path / "o5")
    assert code == 2 and "empty.jsonl" in err


def test_eval_reads_renamed_columns_with_field(dataset, tmp_path, capsys):
    manifest, records, runs = dataset
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    renamed = manifest.with_name("renamed.jsonl")
    renamed.write_text("".join(json.dumps({("caption" if k == "instruction" else k): v for k, v in row.items()}) + "\n"
                               for row in rows))
    code, printed, err = run_cli(capsys, "eval", "--pred", runs / "cfg-4.0", "--data", renamed, "--out", tmp_path / "o",
                                 "--metrics", "pixel", "--field", "instruction=caption")
    assert code == 0 and "cfg-4.0: 6/6 evaluated" in printed, err
    assert next(csv.DictReader((tmp_path / "o" / "per_sample.csv").open()))["instruction"].startswith("paint")
