"""`editkit eval`: matching by id, missing predictions, combined table, resume, sharding over gloo ranks,
the run manifest, CLI errors."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

import editkit.eval.runner as runner
from editkit.errors import UserError
from editkit.eval.runner import evaluate
from tests.cli_run import run_cli
from tests.eval_fixtures import make_dataset, make_predictions

FAST = ["pixel", "seam"]


@pytest.fixture
def dataset(tmp_path):
    manifest, records = make_dataset(tmp_path / "data", n=6)
    runs = tmp_path / "runs"
    make_predictions(runs / "cfg-2.0", records, noise=0.08, skip=("s3",))
    make_predictions(runs / "cfg-4.0", records, noise=0.02, seed=2)
    return manifest, records, runs


@pytest.fixture
def load_counter(monkeypatch):
    calls = []
    original = runner.load_sample

    def counting(record, pred_path):
        calls.append((pred_path.parent.name, record.id))
        return original(record, pred_path)

    monkeypatch.setattr(runner, "load_sample", counting)
    return calls


def _rows(out):
    with (out / "per_sample.csv").open() as f:
        return list(csv.DictReader(f))


def test_missing_predictions_are_counted_listed_and_runs_combined(dataset, tmp_path):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    summary = evaluate([runs / "cfg-2.0", runs / "cfg-4.0"], records, out, FAST, show_progress=False)
    assert summary["runs"]["cfg-2.0"]["n_missing"] == 1
    assert summary["runs"]["cfg-2.0"]["missing"] == ["s3"]
    assert summary["runs"]["cfg-4.0"]["n_missing"] == 0
    assert "resized to the ground truth" in summary["resize_policy"]
    assert "cfg-2.0\ts3" in (out / "missing.txt").read_text()
    rows = _rows(out)
    assert len(rows) == 11
    assert {r["run"] for r in rows} == {"cfg-2.0", "cfg-4.0"}
    assert {r["edit_type"] for r in rows} == {"color", "object"}
    better = summary["runs"]["cfg-4.0"]["means"]
    worse = summary["runs"]["cfg-2.0"]["means"]
    assert better["psnr"] > worse["psnr"] and better["psnr_out"] > worse["psnr_out"]
    assert json.loads((out / "summary.json").read_text())["runs"]["cfg-2.0"]["missing"] == ["s3"]


def test_resume_computes_only_new_or_changed_predictions(dataset, tmp_path, load_counter):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    evaluate([runs / "cfg-2.0"], records, out, FAST, show_progress=False)
    assert len(load_counter) == 5
    load_counter.clear()
    again = evaluate([runs / "cfg-2.0"], records, out, FAST, show_progress=False)
    assert load_counter == [] and again["computed"] == 0
    make_predictions(runs / "cfg-2.0", [r for r in records if r.id == "s3"], noise=0.08)  # the missing one arrives
    Image.new("RGB", (48, 48), "red").save(runs / "cfg-2.0" / "s0.png")  # and one prediction changes
    summary = evaluate([runs / "cfg-2.0"], records, out, FAST, show_progress=False)
    assert sorted(load_counter) == [("cfg-2.0", "s0"), ("cfg-2.0", "s3")]
    assert summary["runs"]["cfg-2.0"]["n_missing"] == 0
    red = next(r for r in _rows(out) if r["id"] == "s0")
    assert float(red["mse"]) > 0.05  # the changed prediction's new score, not the cached one


def test_a_new_metric_group_is_computed_without_redoing_the_others(dataset, tmp_path, load_counter, monkeypatch):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    evaluate([runs / "cfg-4.0"], records, out, ["pixel"], show_progress=False)
    seen = []
    original = runner._sample_metrics
    monkeypatch.setattr(runner, "_sample_metrics", lambda s, groups: seen.append(tuple(groups)) or original(s, groups))
    summary = evaluate([runs / "cfg-4.0"], records, out, ["pixel", "seam"], show_progress=False)
    assert set(seen) == {("seam",)} and len(seen) == 6
    assert summary["runs"]["cfg-4.0"]["means"]["seam"] is not None


def test_predictions_of_another_size_are_resized_to_the_ground_truth(dataset, tmp_path):
    manifest, records, runs = dataset
    big = runs / "big"
    big.mkdir()
    for record in records:
        Image.open(record.target).resize((96, 80), Image.BICUBIC).save(big / f"{record.id}.png")
    summary = evaluate([big], records, tmp_path / "out", ["pixel"], show_progress=False)
    assert summary["runs"]["big"]["n_evaluated"] == 6
    assert summary["runs"]["big"]["means"]["psnr"] > 25  # up- then down-sampling keeps it close


RANK_SCRIPT = """
import json, sys
from pathlib import Path

import editkit.eval.runner as runner
from editkit.data import read_manifest
from editkit.utils import dist

manifest, pred, out, report = map(Path, sys.argv[1:5])
caller_group = sys.argv[5] == "caller-group"
loaded, load_sample, check = [], runner.load_sample, runner.FeatureModels.check
runner.load_sample = lambda record, path: loaded.append(record.id) or load_sample(record, path)
if dist.rank() == 1:  # a reason only rank 1 meets must reach rank 0's summary
    runner.FeatureModels.check = lambda self, names: check(self, names) or self.unavailable.update(
        {"rank1-only": "rank1-only: met by rank 1"})
if caller_group:  # the caller's own group, reported as NCCL: eval gathers over a gloo group of its own
    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    tdist.get_backend = lambda group=None: "nccl"
summary = runner.evaluate([pred], read_manifest(manifest), out, ["pixel", "seam"], show_progress=False)
if caller_group:
    assert tdist.is_initialized(), "eval tore down the caller's process group"
report.joinpath(f"rank{dist.rank()}.json").write_text(json.dumps({"summary": summary, "loaded": loaded}))
"""


def _two_gloo_ranks(tmp_path, *args) -> list[dict]:
    """Run RANK_SCRIPT in 2 processes under torchrun (gloo); each rank's summary and loaded ids.
    The last argument: "caller-group" (the script forms the process group) or "eval-group"."""
    import os
    import socket
    import subprocess
    import sys

    script, report = tmp_path / "rank_eval.py", tmp_path / "report"
    script.write_text(RANK_SCRIPT)
    report.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), *map(str, args[:3]), str(report), args[3]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_gloo_ranks_split_the_records_and_rank0_merges(dataset, tmp_path):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    rank0, rank1 = _two_gloo_ranks(tmp_path, manifest, runs / "cfg-4.0", out, "eval-group")
    assert sorted(rank0["loaded"]) == ["s0", "s2", "s4"] and sorted(rank1["loaded"]) == ["s1", "s3", "s5"]
    assert rank1["summary"] is None
    summary = rank0["summary"]
    assert summary["computed"] == 3  # rank 0's shard
    assert summary["unavailable"] == {"rank1-only": "rank1-only: met by rank 1"}
    assert sorted(r["id"] for r in _rows(out)) == [f"s{i}" for i in range(6)]
    assert json.loads((out / "run.json").read_text())["config"]["world_size"] == 2
    assert not (out / "parts").exists()
    again = _two_gloo_ranks(tmp_path, manifest, runs / "cfg-4.0", out, "caller-group")  # resumed: nothing to do
    assert again[0]["loaded"] == [] and again[1]["loaded"] == [] and again[0]["summary"]["computed"] == 0


def test_one_process_forms_no_process_group(dataset, tmp_path, monkeypatch):
    import torch.distributed as tdist

    manifest, records, runs = dataset
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    evaluate([runs / "cfg-4.0"], records, tmp_path / "out", ["pixel"], show_progress=False)
    assert not tdist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE=2: cannot reach the other ranks.*torchrun"):
        evaluate([runs / "cfg-4.0"], records, tmp_path / "out2", ["pixel"], show_progress=False)


def test_the_library_writes_the_run_manifest(dataset, tmp_path):
    manifest, records, runs = dataset
    out = tmp_path / "out"
    evaluate([runner.Run("best", runs / "cfg-4.0")], records, out, ["pixel"], manifest=manifest, show_progress=False,
             run_config={"note": "mine"})
    run = json.loads((out / "run.json").read_text())
    assert run["job"] == "eval" and run["versions"]["torch"]
    assert run["config"]["runs"] == {"best": str(runs / "cfg-4.0")}
    assert run["config"]["metrics"] == ["pixel"] and run["config"]["data"] == str(manifest)
    assert run["config"]["note"] == "mine"


def test_unavailable_metrics_say_how_to_enable_them(dataset, tmp_path):
    manifest, records, runs = dataset
    summary = evaluate([runs / "cfg-4.0"], records, tmp_path / "out", ["pixel", "clip"], show_progress=False)
    assert "--weights clip=PATH" in summary["unavailable"]["clip"]
    assert "clip_i" not in _rows(tmp_path / "out")[0]


def test_feature_metrics_run_batched_from_weights(dataset, tmp_path):
    from tests.test_eval_features import _dino

    manifest, records, runs = dataset
    _dino(tmp_path / "dino")
    summary = evaluate([runs / "cfg-4.0"], records, tmp_path / "out", ["dino"],
                       weights={"dino": tmp_path / "dino"}, batch_size=4, show_progress=False)
    assert "dino" not in summary["unavailable"]
    values = [float(r["dino"]) for r in _rows(tmp_path / "out")]
    assert len(values) == 6 and all(0.5 < v <= 1.0 + 1e-6 for v in values)


def test_bad_inputs_are_user_errors(dataset, tmp_path):
    manifest, records, runs = dataset
    with pytest.raises(UserError, match="unknown metric 'nope'"):
        evaluate([runs / "cfg-4.0"], records, tmp_path / "o", ["nope"])
    with pytest.raises(UserError, match="--weights foo=..."):
        evaluate([runs / "cfg-4.0"], records, tmp_path / "o", weights={"foo": tmp_path})
    with pytest.raises(UserError, match="not a folder"):
        evaluate([tmp_path / "absent"], records, tmp_path / "o")


def test_cli_eval_with_a_glob_and_exit_2_on_bad_flags(dataset, tmp_path, capsys):
    manifest, records, runs = dataset
    out = tmp_path / "cli"
    code, printed, _ = run_cli(capsys, "eval", "--pred", runs / "cfg-*", "--data", manifest, "--out", out,
                               "--metrics", "pixel")
    assert code == 0
    assert "cfg-2.0: 5/6 evaluated, 1 missing" in printed and "cfg-4.0: 6/6 evaluated" in printed
    assert "unavailable" not in printed and "--weights" not in printed  # only pixel was asked for
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["pred"] == [str(runs / "cfg-*")] and set(config["runs"]) == {"cfg-2.0", "cfg-4.0"}
    code, _, err = run_cli(capsys, "eval", "--pred", runs / "cfg-4.0", "--data", manifest, "--out", out,
                           "--weights", "clip")
    assert code == 2 and "expected NAME=PATH" in err


@pytest.mark.slow  # EfficientNet at 224 px and a 1280-d FID on the CPU
def test_default_metrics_include_effnet_and_fid(dataset, tmp_path):
    manifest, records, runs = dataset
    summary = evaluate([runs / "cfg-2.0", runs / "cfg-4.0"], records, tmp_path / "out", show_progress=False)
    good, bad = summary["runs"]["cfg-4.0"]["means"], summary["runs"]["cfg-2.0"]["means"]
    assert good["effnet_sim"] > bad["effnet_sim"]
    assert good["fid_effnet"] < bad["fid_effnet"]
    assert "ghost" in summary["columns"]
