"""WandB logging (`loop.wandb: true`), offline: what editkit hands to wandb, the one-line error
without the package, and (where wandb is installed) the offline run folder itself.

wandb is an optional extra, not an editkit dependency (pyproject.toml): `pip install wandb`.
"""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest

from editkit.train.config import validate_config
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from editkit.data.synth import synthesize

    synth = synthesize(tmp_path_factory.mktemp("synth") / "data", n=4, size=32, seed=0, val_fraction=0.0,
                       test_fraction=0.0, progress=False)
    return synth["train"]


def _raw(out, manifest) -> dict:
    return {"model": "tiny", "output_dir": str(out), "seed": 0,
            "data": {"train": [{"manifest": str(manifest)}], "batch_size": 2, "area": 32 * 32, "multiple": 16},
            "train": {"mode": "lora", "lora": {"rank": 4}}, "optim": {"lr": 1e-3, "schedule": "constant"},
            "loop": {"max_steps": 3, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no",
                     "wandb": True}}


def _csv_rows(out) -> dict[int, dict]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


class _Recorder:
    """A stand-in for the wandb package: records init's arguments (and WANDB_MODE then) and every log."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def module(self):
        import importlib.machinery

        import accelerate  # noqa: F401 - probes for wandb when first imported: before the stand-in goes in

        module = types.ModuleType("wandb")
        module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        recorder = self

        class Run:
            def log(self, values, step=None):
                recorder.logs.append((step, dict(values)))

            def finish(self):
                recorder.finished += 1

        def init(**kwargs):
            import os

            recorder.inits.append({**kwargs, "WANDB_MODE": os.environ.get("WANDB_MODE")})
            return Run()

        module.init, module.Image = init, lambda path: ("image", path)
        return module


def test_metrics_go_to_an_offline_wandb_run(manifest, tmp_path, monkeypatch):
    from editkit.train.trainer import train

    recorder = _Recorder()
    monkeypatch.setitem(sys.modules, "wandb", recorder.module())
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored at the end: the logger sets it when unset
    monkeypatch.delenv("WANDB_MODE")
    out = tmp_path / "run"
    train(validate_config(_raw(out, manifest)), progress=False)
    (init,) = recorder.inits
    assert init["WANDB_MODE"] == "offline" and init["dir"] == str(out) and init["name"] == "run"
    assert init["config"]["loop"]["wandb"] is True  # the run's whole config goes with it
    rows = _csv_rows(out)
    logged = {step: values for step, values in recorder.logs}
    assert sorted(logged) == sorted(rows) == [1, 2, 3]
    for step, values in logged.items():
        assert values["loss"] == pytest.approx(float(rows[step]["loss"]), rel=1e-6)
    assert recorder.finished == 1


def test_a_user_choice_of_wandb_mode_is_kept(manifest, tmp_path, monkeypatch):
    from editkit.train.trainer import train

    recorder = _Recorder()
    monkeypatch.setitem(sys.modules, "wandb", recorder.module())
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(validate_config(_raw(tmp_path / "run", manifest)), progress=False)
    assert recorder.inits[0]["WANDB_MODE"] == "disabled"


def test_without_the_package_it_is_one_line(manifest, tmp_path, capsys, monkeypatch):
    import accelerate  # noqa: F401 - probes for wandb when first imported

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_raw(tmp_path / "run", manifest)))
    code, _, err = run_cli(capsys, "train", config)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "loop.wandb=true needs the wandb package: pip install wandb" in lines[0]


def test_the_real_offline_run_holds_the_metrics(manifest, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from editkit.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(validate_config(_raw(out, manifest)), progress=False)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("*.wandb")  # protobuf records; wandb >= 0.19 keeps the summary there too
    data = run_file.read_bytes()
    rows = _csv_rows(out)
    assert sorted(rows) == [1, 2, 3] and b"loss" in data
    for row in rows.values():  # every step's loss, as JSON text in its history record
        assert repr(float(row["loss"])).encode() in data, f"wandb {wandb.__version__}: step {row['step']} missing"
