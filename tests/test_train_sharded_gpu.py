"""Sharded training on CUDA GPUs: FSDP2 and DeepSpeed ZeRO-2/3 through `accelerate launch`.

Two processes on a machine with two GPUs or more, one on a single GPU. Skipped without GPUs (and,
for DeepSpeed, without the deepspeed package); run on the GPU machine (docs/training.md says how).
A run cut after 4 steps and resumed from its step-3 checkpoint must repeat the losses of an
uninterrupted run step for step: that needs every rank's optimiser shard back (a restarted AdamW
changes step 4 onwards by far more than the tolerance).
"""

import csv
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_fixtures import tiny_training_cache

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]
# two processes where two GPUs exist; one still runs the partitioned code paths and their checkpoints
PROCESSES = min(2, torch.cuda.device_count())

LAUNCH = {
    "fsdp2": {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "QwenImageTransformerBlock", "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": False,
        "fsdp_cpu_ram_efficient_loading": False, "fsdp_activation_checkpointing": False}},
    "zero2": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "deepspeed_config_file": str(REPO / "configs/deepspeed/zero2.json"), "zero3_init_flag": False}},
    "zero3": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "deepspeed_config_file": str(REPO / "configs/deepspeed/zero3.json"), "zero3_init_flag": False}},
}

RUNNER = """
import sys
from editkit.train.config import load_config
from editkit.train.trainer import train
resume, stop = sys.argv[2] or None, int(sys.argv[3]) or None
train(load_config(sys.argv[1]), resume=resume, stop_after=stop, progress=False)
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tiny_training_cache(tmp_path_factory.mktemp("sharded"), n=12)


def _launch(tmp_path: Path, kind: str, cfg_path: Path, resume: str = "", stop: int = 0) -> None:
    launch = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "num_processes": PROCESSES, "machine_rank": 0,
              "use_cpu": False, **LAUNCH[kind]}
    if kind == "fsdp2":  # with a DeepSpeed config file, precision comes from it ("auto": the trainer's choice)
        launch["mixed_precision"] = "no"
    launch_path = tmp_path / f"{kind}.yaml"
    launch_path.write_text(yaml.safe_dump(launch))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_path),
                           "--main_process_port", str(port), str(runner), str(cfg_path), resume, str(stop)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode != 0:  # every rank's error lines first (the tail is mostly the launcher's)
        lines = proc.stderr.splitlines()
        failed = [line for line in lines if "Error" in line]
        rank = failed[0].split("]")[0] + "]" if failed and failed[0].startswith("[rank") else "Traceback"
        pytest.fail("\n".join(line for line in lines if line.startswith(rank))[-6000:])


def _losses(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.mark.parametrize("kind", ["fsdp2", "zero2", "zero3"])
def test_sharded_kill_and_resume_reproduces_losses(kind, cache_dir, tmp_path):
    if kind.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    paths = {}
    for name in ("whole", "cut"):
        raw = {"model": "tiny", "output_dir": str(tmp_path / name), "seed": 0,
               "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 16},
               "train": {"mode": "lora", "lora": {"rank": 8}},
               "optim": {"lr": 5e-3, "schedule": "cosine", "warmup_steps": 1},
               "loop": {"max_steps": 6, "checkpoint_every": 3, "tensorboard": False, "mixed_precision": "no"}}
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw))
    _launch(tmp_path, kind, paths["whole"])
    _launch(tmp_path, kind, paths["cut"], stop=4)  # "killed" after step 4: step 4 is redone
    _launch(tmp_path, kind, paths["cut"], resume="latest")
    whole, cut = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    for step in range(1, 7):
        assert cut[step] == pytest.approx(whole[step], rel=1e-4), (kind, step, cut, whole)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-000006"
    assert (checkpoint / "optimizer_shards").is_dir()
    from safetensors.torch import load_file

    from editkit.models.lora import load_lora, parse

    trainable = load_file(str(checkpoint / "trainable.safetensors"))
    assert trainable and all(".lora_" in k for k in trainable)
    modules = parse(load_lora(checkpoint / "export" / "pytorch_lora_weights.safetensors")[0])
    assert len(modules) == len(trainable) // 2  # one A and one B per module
