"""Trainer options and checkpoint plumbing added for GPU runs, checked on the CPU with the tiny model."""

import csv

import pytest
import torch

from editkit.errors import UserError
from editkit.train.config import validate_config
from editkit.train.trainer import train
from tests.train_fixtures import tiny_training_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tiny_training_cache(tmp_path_factory.mktemp("options"), n=6)


def _cfg(out, cache_dir, **train_section):
    return validate_config({
        "model": "tiny", "output_dir": str(out), "seed": 0,
        "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 16},
        "train": {"mode": "lora", "lora": {"rank": 4}, **train_section},
        "optim": {"lr": 5e-3, "schedule": "constant"},
        "loop": {"max_steps": 3, "checkpoint_every": 3, "tensorboard": False, "mixed_precision": "no"}})


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_step_seconds_are_logged(cache_dir, tmp_path):
    train(_cfg(tmp_path / "run", cache_dir), progress=False)
    rows = _rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["step_seconds"]) > 0 for r in rows)


def test_bf16_trainable_weights(cache_dir, tmp_path):
    from editkit.train.edit_task import EditTask

    task = EditTask(_cfg(tmp_path / "t", cache_dir, trainable_dtype="bf16"), "cpu")
    dtypes = {p.dtype for p in task.module.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}
    frozen = {p.dtype for p in task.module.parameters() if not p.requires_grad}
    assert frozen == {torch.float32}  # mixed_precision "no": the base stays as loaded
    result = train(_cfg(tmp_path / "run", cache_dir, trainable_dtype="bf16"), progress=False)
    assert result["steps"] == 3
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in _rows(tmp_path / "run"))


def test_export_from_gathered_weights_equals_export(cache_dir, tmp_path):
    """Sharded runs export from the gathered trainable weights; the files must equal an unsharded export."""
    from safetensors.torch import load_file

    from editkit.train.edit_task import EditTask
    from editkit.train.trainable import trainable_state_dict

    task = EditTask(_cfg(tmp_path / "t", cache_dir, lora={"rank": 4, "alpha": 2.0}, unfreeze=["img_in"]), "cpu")
    with torch.no_grad():
        for name, p in task.module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)  # lora_B starts at zero
    direct = task.export(task.module, tmp_path / "direct", 7)
    gathered = task.export_gathered({k: v.clone() for k, v in trainable_state_dict(task.module).items()},
                                    tmp_path / "gathered", 7)
    assert [p.name for p in direct] == [p.name for p in gathered] and len(direct) == 4
    for a, b in zip(direct, gathered):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (a.name, k)


def test_resuming_with_another_sharding_is_a_clear_error(cache_dir, tmp_path):
    import json

    cfg = _cfg(tmp_path / "run", cache_dir)
    train(cfg, progress=False)
    state = tmp_path / "run" / "checkpoints" / "step-000003" / "state.json"
    data = json.loads(state.read_text())
    assert data["sharding"] is None
    data["sharding"] = "fsdp"
    state.write_text(json.dumps(data))
    cfg.loop.max_steps = 4  # extended: a finished run would be resumed as a no-op
    with pytest.raises(UserError, match="saved by a fsdp run, resumed as unsharded"):
        train(cfg, resume="latest", progress=False)


def test_checkpoint_from_a_staging_folder(tmp_path):
    """Sharded runs fill a staging folder from every rank; the main process completes and renames it."""
    from editkit.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    staging = ckpt.staging_dir(root, 5)
    (staging / "optimizer_shards").mkdir(parents=True)
    (staging / "optimizer_shards" / "rank1.bin").write_bytes(b"x")
    (root / ".staging-step-000002").mkdir()  # left by a run killed while saving
    dest = ckpt.save_checkpoint(root, 5, {"w": torch.ones(2)}, {}, {"last_epoch": 5}, [{}], {"sampler": []},
                                keep_last=2, staging=staging)
    assert dest.name == "step-000005" and not staging.exists()
    assert (dest / "optimizer_shards" / "rank1.bin").read_bytes() == b"x"
    assert ckpt.load_checkpoint(dest)["state"]["step"] == 5
    assert ckpt.latest_checkpoint(root) == dest
    ckpt.remove_stale_temp(tmp_path)
    assert not (root / ".staging-step-000002").exists()


def test_compile_applies_the_lossless_fast_path(cache_dir, tmp_path, monkeypatch):
    """Wiring only (inductor on the CPU takes minutes); tests/test_train_gpu.py compares losses on a GPU."""
    from editkit.models import accel
    from editkit.train.edit_task import EditTask

    seen = []
    monkeypatch.setattr(accel, "apply_accel", lambda model, a: seen.append((model, a)))
    task = EditTask(_cfg(tmp_path / "t", cache_dir, compile=True), "cpu")
    assert len(seen) == 1 and seen[0][0] is task.model
    assert seen[0][1].compile and not seen[0][1].split_lengths and seen[0][1].fp8 is None
