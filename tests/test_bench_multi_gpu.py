"""bench/multi_gpu.py on the tiny preset and the CPU: model folder, dataset editing, summaries, train config."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from bench import multi_gpu
from editkit.errors import UserError

INFER_FIELDS = {"kind", "time", "world_size", "model", "images", "size", "steps", "batch_size", "cfg", "accel",
                "edit_s", "images_per_s", "s_per_image", "gpu_s_per_image", "load_s", "warmup_s", "peak_gib",
                "per_rank", "device_name", "outputs"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "tiny2511"
    row = multi_gpu.main(["save-model", "--preset", "tiny", "--out", str(out), "--jsonl", str(out.parent / "s.jsonl")])
    assert row["save_s"] >= 0 and not row.get("reused")
    assert multi_gpu.read_jsonl(out.parent / "s.jsonl")[0]["kind"] == "save-model"
    return out


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_saved_folder_loads_with_load_model(tiny_folder):
    from editkit.models import load_model
    from editkit.models.families import get_family
    from editkit.models.loading import describe

    model = load_model(tiny_folder, dtype="fp32", device="cpu")
    assert model.family.name == "qwen-image-edit-2511"
    library = get_family("qwen-image-edit-2511").build_tiny(seed=0)  # the folder holds the library's tiny preset
    for name, module in library.modules().items():
        want, got = module.state_dict(), model.modules()[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert (model.vlm_image_area, model.vae_image_area, model.output_area) == (64 * 64,) * 3
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_editkit_bench_preset"] == "tiny" and index["_editkit_bench_seed"] == 0
    info = describe(tiny_folder)
    assert info["parameters"]["transformer"] == sum(p.numel() for p in model.transformer.parameters())
    again = multi_gpu.main(["save-model", "--preset", "tiny", "--out", str(tiny_folder)])
    assert again["reused"]  # a warm machine does not rebuild it


def test_infer_world_size_1_and_summary(tiny_folder, tmp_path, one_process, capsys):
    out = tmp_path / "res"
    argv = ["infer", "--model", str(tiny_folder), "--images", "2", "--size", "64", "--steps", "2",
            "--batch-size", "2", "--out", str(out), "--quiet"]
    row = multi_gpu.main(argv)
    assert INFER_FIELDS <= set(row)
    assert row["world_size"] == 1 and row["images"] == 2 and row["images_per_s"] > 0
    assert row["per_rank"][0]["images"] == 2
    assert len(list((out / "edits" / "ws1-n2-s64-t2" / "cfg-4.0").glob("*.png"))) == 2
    lines = (out / "multi_gpu.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == row
    multi_gpu.main(argv + ["--warmup-steps", "0"])  # a second run edits again (fresh folder) and appends
    rows = multi_gpu.read_jsonl(out / "multi_gpu.jsonl")
    assert len(rows) == 2 and rows[1]["images"] == 2
    capsys.readouterr()
    multi_gpu.main(["summary", str(out / "multi_gpu.jsonl")])
    table = capsys.readouterr().out
    assert "| GPUs |" in table and table.count("| 1 | 2 | 64² | 2 |") == 2 and "1.00x" in table


def test_infer_rejects_bad_arguments(tiny_folder, tmp_path, one_process):
    with pytest.raises(UserError, match="--size"):
        multi_gpu.main(["infer", "--model", str(tiny_folder), "--size", "100", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="model folder not found"):
        multi_gpu.main(["infer", "--model", str(tmp_path / "nope"), "--size", "64", "--images", "1",
                        "--out", str(tmp_path)])
    with pytest.raises(UserError, match="needs a GPU"):
        multi_gpu.save_model("full", tmp_path / "full", device="cpu")


def test_summary_speedup_against_world_size_1(tmp_path, capsys):
    base = {"kind": "infer", "model": "m", "images": 8, "size": 512, "steps": 10, "batch_size": 4, "cfg": 4.0,
            "accel": False, "edit_s": 20.0, "s_per_image": 2.5, "gpu_s_per_image": 2.5, "load_s": 40.0,
            "peak_gib": 60.0, "images_per_s": 0.4, "world_size": 1}
    rows = [base, {**base, "world_size": 2, "edit_s": 11.0, "images_per_s": 8 / 11.0},
            {**base, "accel": True, "world_size": 2, "images_per_s": 1.0},
            {"kind": "cache", "records": 8, "area": 1, "world_size": 2, "seconds": 3},
            {"kind": "save-model", "preset": "full", "gib_on_disk": 53.2, "build_s": 9.0, "save_s": 40.0},
            {"kind": "train", "run": "/tmp/ws1", "world_size": 1, "timed_steps": 8, "s_per_step": 2.0,
             "steps_per_s": 0.5, "samples_per_s": 0.5, "source": "step_seconds", "note": ""},
            {"kind": "train", "run": "/tmp/ws2", "world_size": 2, "timed_steps": 8, "s_per_step": 2.1,
             "steps_per_s": 1 / 2.1, "samples_per_s": 2 / 2.1, "source": "step_seconds", "note": ""}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = multi_gpu.summarize_infer(multi_gpu.read_jsonl(path))
    assert summary[1]["speedup"] == pytest.approx(20 / 11, abs=1e-3)
    assert summary[1]["efficiency"] == pytest.approx(10 / 11, abs=1e-3)
    assert summary[2]["speedup"] is None  # no world-size-1 row with accel
    multi_gpu.main(["summary", str(path)])
    out = capsys.readouterr().out
    assert "1.82x" in out and "- cache: 8 records" in out and "- save-model: full preset, 53.2 GiB" in out
    assert "| ws2 | 2 | 8 | 2.100 |" in out and "1.90x" in out


def _fake_run(folder, world, steps, step_seconds=None):
    folder.mkdir(parents=True)
    info = {"world_size": world, "time": "2026-01-01T00:00:00+00:00",
            "config": {"data": {"batch_size": 1}, "loop": {"grad_accum": 1}}}
    (folder / "run.json").write_text(json.dumps(info))
    with open(folder / "metrics.csv", "w", newline="") as f:
        cols = ["step", "loss"] + (["step_seconds"] if step_seconds else [])
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for s in range(1, steps + 1):
            w.writerow({"step": s, "loss": 1.0, **({"step_seconds": step_seconds[s - 1]} if step_seconds else {})})
    return folder


SCALING_RUN = {
    "stage": "edit", "seed": 0, "data.val": None, "data.multiple": 32, "data.batch_size": 1, "data.instruction": "en",
    "train.mode": "lora", "train.lora.rank": 64, "train.lora.alpha": 64.0, "train.lora.dropout": 0.0,
    "train.lora.targets": "default", "train.gradient_checkpointing": True, "objective.kind": "flow_matching",
    "objective.timesteps.sampling": "shifted", "objective.mask_weight": 0.0, "objective.text_dropout": 0.0,
    "objective.image_dropout": 0.0, "optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 0.0,
    "optim.max_grad_norm": 1.0, "optim.schedule": "constant", "optim.warmup_steps": 0, "loop.max_steps": 12,
    "loop.grad_accum": 1, "loop.mixed_precision": "auto", "loop.checkpoint_every": 12, "loop.keep_last": 1,
    "loop.log_every": 1, "loop.validate_every": 0, "loop.preview_every": 0, "loop.tensorboard": False,
    "loop.export_lora": False,
}
"""The scaling runs' settings (those of the hand-written config the shipped recipe replaced), --steps 12."""


def test_train_config_and_summary_train(tmp_path, capsys):
    from editkit.train.config import _flatten, load_config

    cfg_path = tmp_path / "cfg.yaml"
    multi_gpu.main(["train-config", "--model", "/models/x", "--cache", "/tmp/cache", "--out", str(cfg_path),
                    "--steps", "12", "--set", "optim.lr=2e-4"])
    cfg = load_config(cfg_path, [f"output_dir={tmp_path / 'r'}"])
    flat = _flatten(cfg.model_dump(mode="json"))
    assert {key: flat[key] for key in SCALING_RUN} == {**SCALING_RUN, "optim.lr": 2e-4}
    assert cfg.model == "/models/x" and cfg.data.cache == ["/tmp/cache"] and cfg.data.area == 1024 * 1024
    with pytest.raises(UserError, match="unknown field"):
        multi_gpu.train_config("m", "c", tmp_path / "x.yaml", overrides=["train.nope=1"])
    with pytest.raises(UserError, match="--steps"):
        multi_gpu.train_config("m", "c", tmp_path / "x.yaml", steps=2)

    ws1 = _fake_run(tmp_path / "ws1", 1, 6, step_seconds=[9, 5, 2.0, 2.0, 2.0, 2.0])
    ws2 = _fake_run(tmp_path / "ws2", 2, 6, step_seconds=[30, 4, 2.0, 2.2, 2.1, 2.1])
    timings = multi_gpu.main(["summary-train", str(ws1), str(ws2)])
    assert timings[0]["timed_steps"] == 4  # the first two steps (compile, warm-up) are not timed
    assert timings[0]["s_per_step"] == pytest.approx(2.0)
    assert timings[1]["s_per_step"] == pytest.approx(2.1, abs=1e-3)
    assert timings[1]["samples_per_s"] == pytest.approx(2 / 2.1, abs=1e-3)
    assert timings[1]["speedup"] == pytest.approx(2 * 2.0 / 2.1, abs=1e-3)
    out = capsys.readouterr().out
    assert "| ws2 | 2 |" in out and "0.95" in out
    with pytest.raises(UserError, match="no step_seconds column"):
        multi_gpu.train_run_timing(_fake_run(tmp_path / "old", 1, 5))
    with pytest.raises(UserError, match="train at least 3 steps"):
        multi_gpu.train_run_timing(_fake_run(tmp_path / "short", 1, 2, step_seconds=[9, 5]))
    with pytest.raises(UserError, match="not an editkit training run"):
        multi_gpu.train_run_timing(tmp_path / "nothing")


@pytest.mark.slow
def test_two_gloo_processes_infer_and_cache_then_train_from_it(tiny_folder, tmp_path, one_process, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, cache = tmp_path / "res", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "bench/multi_gpu.py", "infer", "--model", str(tiny_folder), "--images", "2",
                           "--size", "64", "--steps", "2", "--out", str(out), "--quiet", "--cache-out", str(cache),
                           "--cache-records", "3", "--cache-area", "4096", "--cache-multiple", "16"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=multi_gpu.REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = multi_gpu.read_jsonl(out / "multi_gpu.jsonl")
    infer = next(r for r in rows if r["kind"] == "infer")
    assert infer["world_size"] == 2 and infer["images"] == 2
    assert [r["images"] for r in infer["per_rank"]] == [1, 1]
    assert next(r for r in rows if r["kind"] == "cache")["records"] == 3
    assert sorted(p.name for p in cache.glob("index-r*.json")) == ["index-r0.json", "index-r1.json"]

    from editkit.train.config import load_config
    from editkit.train.trainer import train

    cfg_path = tmp_path / "cfg.yaml"
    multi_gpu.main(["train-config", "--model", str(tiny_folder), "--cache", str(cache), "--out", str(cfg_path),
                    "--steps", "4", "--rank", "4", "--area", "4096", "--multiple", "16"])
    run = tmp_path / "train-ws1"
    summary = train(load_config(cfg_path, [f"output_dir={run}"]), progress=False)
    assert summary["steps"] == 4
    timing = multi_gpu.main(["summary-train", str(run)])[0]
    assert timing["world_size"] == 1 and timing["timed_steps"] == 2 and timing["steps_per_s"] > 0
