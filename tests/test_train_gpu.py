"""The trainer on one CUDA GPU (skipped without one; run on the GPU machine)."""

import csv

import pytest
import torch

from tests.train_fixtures import tiny_training_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tiny_training_cache(tmp_path_factory.mktemp("gpu"), n=6)


def _losses(out):
    with open(out / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_compiled_training_matches_eager(cache_dir, tmp_path, precision):
    from accelerate.state import AcceleratorState

    from editkit.train.config import validate_config
    from editkit.train.trainer import train

    losses = {}
    for compiled in (False, True):
        AcceleratorState._reset_state(True)  # accelerate keeps one precision per process otherwise
        out = tmp_path / f"{precision}-{compiled}"
        train(validate_config({
            "model": "tiny", "output_dir": str(out), "seed": 0,
            "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 16},
            "train": {"mode": "lora", "lora": {"rank": 4}, "compile": compiled, "gradient_checkpointing": True},
            "optim": {"lr": 5e-3, "schedule": "constant"},
            "loop": {"max_steps": 4, "checkpoint_every": 4, "tensorboard": False, "mixed_precision": precision}}),
            progress=False)
        losses[compiled] = _losses(out)
    tol = 1e-4 if precision == "no" else 2e-2
    assert losses[True] == pytest.approx(losses[False], rel=tol)
