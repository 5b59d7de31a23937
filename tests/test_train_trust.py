"""Trusting a run folder: resume with validation, refusing to mix runs, fingerprints, stale temp
files, cache/config agreement, config paths, manifest field names, bad values (CPU, tiny model)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editkit.errors import UserError
from editkit.train.config import load_config, trajectory_settings, validate_config
from editkit.train.trainer import run_fingerprint, train
from tests.train_fixtures import tiny_training_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tiny_training_cache(tmp_path_factory.mktemp("trust"), n=4)


@pytest.fixture(scope="module")
def manifest(cache_dir):
    return cache_dir.parent / "data" / "train.jsonl"


def _raw(out, cache_dir, **sections):
    raw = {"model": "tiny", "output_dir": str(out), "seed": 0,
           "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 16},
           "train": {"mode": "lora", "lora": {"rank": 4}},
           "optim": {"lr": 5e-3, "schedule": "constant"},
           "loop": {"max_steps": 2, "checkpoint_every": 2, "tensorboard": False, "mixed_precision": "no"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _cfg(out, cache_dir, **sections):
    return validate_config(_raw(out, cache_dir, **sections))


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- 1. resume with validation; a finished run ------------------------------------------------

def test_kill_and_resume_with_validation_repeats_the_uninterrupted_rows(cache_dir, manifest, tmp_path):
    sections = dict(data={"val": str(manifest)}, objective={"text_dropout": 0.3},
                    optim={"schedule": "cosine", "warmup_steps": 1},
                    loop={"max_steps": 5, "checkpoint_every": 2, "validate_every": 2})
    train(_cfg(tmp_path / "whole", cache_dir, **sections), progress=False)
    cut = _cfg(tmp_path / "cut", cache_dir, **sections)
    train(cut, stop_after=3, progress=False)  # killed after step 3 (checkpoint at 2)
    # what a kill during a checkpoint, final/ or preview write leaves behind
    stale = [tmp_path / "cut" / "checkpoints" / ".tmp-step-000004.x1", tmp_path / "cut" / "checkpoints" /
             ".staging-step-000004", tmp_path / "cut" / ".tmp-final.x2", tmp_path / "cut" / "previews" / ".tmp-p.png"]
    for path in stale:
        path.mkdir(parents=True)
    resumed = train(cut, resume="latest", progress=False)
    assert resumed["resumed_from"].endswith("step-000002") and resumed["steps"] == 5
    assert not any(p.exists() for p in stale)
    whole, cut_rows = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [r["step"] for r in whole] == ["1", "2", "3", "4", "5"]  # one row a step
    assert list(cut_rows[0]) == list(whole[0])
    for a, b in zip(whole, cut_rows):
        for column in ("loss", "lr", "val_loss"):
            assert (a[column] == "") == (b[column] == ""), (a["step"], column)
            if a[column]:
                assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-5, abs=1e-7), (a["step"], column)
    assert [r["step"] for r in whole if r["val_loss"]] == ["2", "4"]

    again = train(cut, resume="latest", progress=False)  # finished: nothing to do
    assert again["steps_run"] == 0 and "already trained to loop.max_steps=5" in again["note"]
    assert len(_rows(tmp_path / "cut")) == 5
    shutil.rmtree(tmp_path / "cut" / "final")  # killed while writing final/: resuming finishes it
    done = train(cut, resume="latest", progress=False)
    assert done["final"] and (tmp_path / "cut" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert len(_rows(tmp_path / "cut")) == 5


def test_shipped_tiny_lora_config_resumes_with_validation(cache_dir, manifest, tmp_path):
    """configs/tiny_lora.yaml (validation on) resumed: the crash was `dict contains fields not in
    fieldnames: 'val_loss'`."""
    root = Path(__file__).resolve().parents[1] / "configs" / "tiny_lora.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.cache=[{cache_dir}]", f"data.val={manifest}",
                 "data.batch_size=2", "loop.max_steps=3", "loop.checkpoint_every=1", "loop.validate_every=2",
                 "loop.preview_every=0", "loop.tensorboard=false", "optim.warmup_steps=1"]
    train(load_config(root, overrides), stop_after=2, progress=False)
    train(load_config(root, overrides), resume="latest", progress=False)
    assert [r["step"] for r in _rows(tmp_path / "run")] == ["1", "2", "3"]


# ---- 2. a rerun without --resume; --overwrite -------------------------------------------------

def test_rerun_without_resume_is_refused_and_overwrite_starts_again(cache_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, cache_dir, loop={"max_steps": 4}), progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as err:
        train(_cfg(out, cache_dir), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "--resume latest" in msg and "--overwrite" in msg and str(out) in msg
    assert len(_rows(out)) == 4  # nothing touched
    with pytest.raises(UserError, match="not both"):
        train(_cfg(out, cache_dir), resume="latest", overwrite=True, progress=False)
    train(_cfg(out, cache_dir, optim={"lr": 1e-3}), overwrite=True, progress=False)
    assert [r["step"] for r in _rows(out)] == ["1", "2"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # step-000004 went
    assert (out / "final").is_dir() and (out / "notes.txt").read_text() == "mine"


def test_cli_refuses_a_rerun_in_one_line(cache_dir, tmp_path):
    """From another working directory: the YAML's relative paths are found beside it (item 6)."""
    configs = tmp_path / "project" / "configs"
    configs.mkdir(parents=True)
    os.symlink(cache_dir, tmp_path / "project" / "cache")
    raw = _raw("../runs/a", "../cache")
    (configs / "a.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "project" / "runs" / "a" / "checkpoints").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "editkit", "train", str(configs / "a.yaml")], cwd=elsewhere,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"editkit: error: {tmp_path / 'project' / 'runs' / 'a'}: holds")
    assert "--overwrite" in lines[0]


# ---- 3. fingerprints ------------------------------------------------------------------------

def test_resume_with_other_settings_names_them(cache_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, cache_dir), progress=False)
    with pytest.raises(UserError) as err:
        train(_cfg(out, cache_dir, optim={"lr": 1e-3}, train={"lora": {"rank": 8}}), resume="latest", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "optim.lr" in msg and "train.lora.rank" in msg and "--overwrite" in msg
    # a constant schedule may be extended, and the reporting settings change freely
    more = train(_cfg(out, cache_dir, loop={"max_steps": 3, "log_every": 1, "checkpoint_every": 3, "keep_last": 1}),
                 resume="latest", progress=False)
    assert more["steps"] == 3 and more["steps_run"] == 1
    # a checkpoint of this run does not resume a run of other settings in another folder
    with pytest.raises(UserError, match="other settings"):
        train(_cfg(tmp_path / "other", cache_dir, seed=1, loop={"max_steps": 3}),
              resume=str(out / "checkpoints" / "step-000003"), progress=False)


def test_fingerprint_keys(cache_dir, tmp_path):
    cfg = _cfg(tmp_path / "a", cache_dir)
    keys = trajectory_settings(cfg)
    assert {"optim.lr", "seed", "train.lora.rank", "data.batch_size", "loop.grad_accum", "stage"} <= set(keys)
    free = {"loop.max_steps", "loop.checkpoint_every", "loop.validate_every", "output_dir", "data.val"}
    assert not free & set(keys)
    assert "loop.max_steps" in trajectory_settings(_cfg(tmp_path / "a", cache_dir, optim={"schedule": "cosine"}))
    assert run_fingerprint(cfg) == run_fingerprint(_cfg(tmp_path / "b", cache_dir, loop={"max_steps": 9}))
    # the cache enters by content: the same path with another shard is another cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    before = run_fingerprint(_cfg(tmp_path / "a", copy))
    index = copy / "index-r0.json"
    data = json.loads(index.read_text())
    shard = next(iter(data["shards"]))
    data["shards"][shard] = "0" * 64
    index.write_text(json.dumps(data))
    after = run_fingerprint(_cfg(tmp_path / "a", copy))
    assert [k for k in before if before[k] != after[k]] == ["data.cache"]


def test_an_older_run_without_fingerprint_is_not_resumed(cache_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, cache_dir), progress=False)
    (out / "fingerprint.json").unlink()
    with pytest.raises(UserError, match="without fingerprint.json"):
        train(_cfg(out, cache_dir, loop={"max_steps": 3}), resume="latest", progress=False)


# ---- 5. cache built for other buckets -------------------------------------------------------

def test_data_area_must_match_the_cache(cache_dir, tmp_path):
    with pytest.raises(UserError) as err:
        train(_cfg(tmp_path / "run", cache_dir, data={"area": 128 * 128}), progress=False)
    msg = str(err.value)
    assert "--area 4096" in msg and "data.area is 16384" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


# ---- 6. config paths ------------------------------------------------------------------------

def test_yaml_paths_are_relative_to_the_yaml_and_overrides_to_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "cfgs"
    folder.mkdir()
    path = folder / "c.yaml"
    path.write_text("model: ../models/m\noutput_dir: runs/a\n"
                    "data: {train: [{manifest: ../data/train.jsonl}], val: val.jsonl}\n")
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(path, ["data.val=v.jsonl"])
    assert cfg.model == str(tmp_path / "models" / "m") and cfg.output_dir == str(folder / "runs" / "a")
    assert cfg.data.train[0].manifest == str(tmp_path / "data" / "train.jsonl")
    assert cfg.data.val == str(cwd / "v.jsonl")
    assert load_config(path, ["model=tiny"]).model == "tiny"
    assert load_config(Path("..") / "cfgs" / "c.yaml").output_dir == str(folder / "runs" / "a")


def test_demo_configs_load_from_a_relative_demo_folder(tmp_path, monkeypatch):
    from editkit.demo.pipeline import Demo
    from editkit.demo.presets import QUICK

    monkeypatch.chdir(tmp_path)
    demo = Demo("demo-out", QUICK)
    cfg = demo._write_config("vae.yaml", demo.vae_config())
    assert cfg.output_dir == str(tmp_path / "demo-out" / "vae")
    assert cfg.data.train[0].manifest == str(tmp_path / "demo-out" / "data" / "train.jsonl")


# ---- 8. renamed manifest columns ------------------------------------------------------------

def test_data_fields_rename_manifest_columns(manifest, tmp_path):
    from editkit.train.vae_stage import VaeTask

    renamed = tmp_path / "renamed.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    renamed.write_text("".join(json.dumps({"caption" if k == "instruction" else k: v for k, v in r.items()}) + "\n"
                               for r in rows))
    for row in rows:  # images beside the manifest, as in the original folder
        for key in ("source_image", "target_image", "mask"):
            (tmp_path / row[key]).parent.mkdir(exist_ok=True)
            shutil.copy(manifest.parent / row[key], tmp_path / row[key])
    raw = {"stage": "vae", "output_dir": str(tmp_path / "v"), "data": {"train": [{"manifest": str(renamed)}]},
           "loop": {"tensorboard": False, "mixed_precision": "no"}}
    with pytest.raises(UserError, match=r"data\.fields"):
        VaeTask(validate_config(raw), "cpu")
    raw["data"]["fields"] = {"instruction": "caption"}
    assert len(VaeTask(validate_config(raw), "cpu").paths) == 2 * len(rows)  # sources and targets
    with pytest.raises(UserError, match="field data.fields: unknown record field 'promt'"):
        validate_config({**raw, "data": {**raw["data"], "fields": {"promt": "caption"}}})


# ---- 9. bad values --------------------------------------------------------------------------

@pytest.mark.parametrize("override,field", [
    ("loop.max_steps=0", "loop.max_steps"), ("loop.max_steps=-5", "loop.max_steps"),
    ("data.batch_size=0", "data.batch_size"), ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-4", "optim.lr"),
    ("loop.grad_accum=0", "loop.grad_accum"), ("seed=-1", "seed"), ("optim.eps=0", "optim.eps"),
    ("optim.betas=[1.5,0.9]", "optim.betas"), ("data.max_ratio=0.5", "data.max_ratio"),
    ("objective.timesteps.values=[0]", "objective.timesteps.values"), ("data.cache_weights=[-1]", "data.cache_weights"),
    ("loop.checkpoint_every=0", "loop.checkpoint_every"), ("train.lora.alpha=0", "train.lora.alpha"),
    ("vae.input_channels=5", "vae.input_channels"), ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
])
def test_bad_values_are_one_line(tmp_path, override, field):
    path = tmp_path / "c.yaml"
    path.write_text("data: {cache: [c]}\n")
    with pytest.raises(UserError) as err:
        load_config(path, [override])
    msg = str(err.value)
    assert msg.startswith(f"{path}: field {field}") and "\n" not in msg


# ---- damaged checkpoints and logs (found by bench/reliability) ---------------------------------

@pytest.mark.parametrize("name,damage", [("trainable.safetensors", "data-byte"), ("optimizer.pt", "truncate"),
                                         ("rng.pt", "data-byte"), ("state.json", "truncate"),
                                         ("metrics.csv", "cell")])
def test_a_damaged_checkpoint_or_log_is_one_line(cache_dir, tmp_path, name, damage):
    out = tmp_path / "run"
    cfg = _cfg(out, cache_dir, loop={"max_steps": 4, "checkpoint_every": 2})
    train(cfg, stop_after=2, progress=False)
    path = out / "metrics.csv" if name == "metrics.csv" else out / "checkpoints" / "step-000002" / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "cell":
        data = data.replace(b"\n2,", b"\n2,x", 1)
    else:
        data[-5] ^= 0xFF  # inside the tensor data: only a checksum notices
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{name}: damaged"):
        train(_cfg(out, cache_dir, loop={"max_steps": 4, "checkpoint_every": 2}), resume="latest", progress=False)
