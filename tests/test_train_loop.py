"""The trainer end to end on the tiny model and the synthetic dataset (CPU).

One cache of 8 synthetic records is built per session; runs are a few dozen steps.
"""

import csv
import subprocess
import sys

import pytest
import torch

from editkit.errors import UserError
from editkit.train.config import validate_config
from editkit.train.trainer import train


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    from editkit.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n=10, size=64, seed=0, val_fraction=0.2,
                      test_fraction=0.0, progress=False)


@pytest.fixture(scope="session")
def cache_dir(synth, tmp_path_factory):
    from editkit.train.cache import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache("tiny", synth["train"], out, area=64 * 64, multiple=16, dtype="fp32", device="cpu",
                shard_records=3, progress=False)
    return out


def _cfg(out, cache_dir, **sections):
    raw = {"model": "tiny", "output_dir": str(out), "seed": 0,
           "data": {"cache": [str(cache_dir)], "batch_size": 4, "area": 4096, "multiple": 16},
           "train": {"mode": "lora", "lora": {"rank": 8}},
           "optim": {"lr": 5e-3, "schedule": "constant"},
           "loop": {"max_steps": 4, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(raw)


def _losses(out, column="loss"):
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def _mean(values):
    return sum(values) / len(values)


# ---- cache --------------------------------------------------------------------------------

def test_cache_index_verify_resume_and_corruption(cache_dir, synth, tmp_path):
    import shutil

    from editkit.train.cache import CacheReader, build_cache

    reader = CacheReader(cache_dir)
    report = reader.verify()
    assert report["records"] == 8 and report["shards"] == 3 and report["white"] == ["64x64"]
    sample = reader.get(reader.ids[0])
    assert {"target", "source.0", "bridge_source", "embeds.en", "embeds.cn", "embeds.empty", "embeds.inverse",
            "mask"} <= set(sample)
    assert sample["target"].shape == (4, 8, 8) and sample["mask"].shape == (1, 8, 8)
    # a rerun skips everything already cached
    again = build_cache("tiny", synth["train"], cache_dir, area=4096, multiple=16, dtype="fp32", device="cpu",
                        progress=False)
    assert again == {"records": 0, "skipped": 8, "out": str(cache_dir)}
    # a damaged shard is refused with a clear message
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    shard = sorted((copy / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        CacheReader(copy).verify()


# ---- training runs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = _cfg(out, cache_dir, loop={"max_steps": 30, "checkpoint_every": 15, "keep_last": 1})
    summary = train(cfg, progress=False)
    return out, summary


def test_lora_run_lowers_loss_and_exports(lora_run):
    out, summary = lora_run
    losses = _losses(out)
    assert summary["steps"] == 30 and len(losses) == 30
    assert _mean([losses[s] for s in range(26, 31)]) < 0.85 * _mean([losses[s] for s in range(1, 6)])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000030"]  # keep_last=1
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "lora_diffsynth.safetensors"):
        assert (out / "final" / name).is_file()
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()


def test_full_run_lowers_loss(cache_dir, tmp_path):
    cfg = _cfg(tmp_path / "full", cache_dir, train={"mode": "full"}, optim={"lr": 1e-3},
               loop={"max_steps": 30, "checkpoint_every": 1000})
    train(cfg, progress=False)
    losses = _losses(tmp_path / "full")
    assert _mean([losses[s] for s in range(26, 31)]) < 0.85 * _mean([losses[s] for s in range(1, 6)])
    assert (tmp_path / "full" / "final" / "transformer" / "config.json").is_file()


def test_kill_and_resume_reproduces_losses(cache_dir, tmp_path):
    sections = dict(train={"lora": {"rank": 4, "dropout": 0.1}},
                    objective={"text_dropout": 0.3, "image_dropout": 0.3},
                    optim={"schedule": "cosine", "warmup_steps": 2},
                    loop={"max_steps": 6, "checkpoint_every": 3, "grad_accum": 2})
    train(_cfg(tmp_path / "whole", cache_dir, **sections), progress=False)
    cut = _cfg(tmp_path / "cut", cache_dir, **sections)
    first = train(cut, stop_after=4, progress=False)  # killed after step 4: steps 4.. are redone
    assert first["steps"] == 4
    resumed = train(cut, resume="latest", progress=False)
    assert resumed["resumed_from"].endswith("step-000003")
    whole, cut_losses = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(cut_losses) == list(range(1, 7))
    for step in range(1, 7):
        assert cut_losses[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path):
    cfg = _cfg(tmp_path / "nan", cache_dir, optim={"lr": 1e30, "max_grad_norm": None},
               loop={"max_steps": 5, "checkpoint_every": 1})
    with pytest.raises(UserError, match="not finite") as err:
        train(cfg, progress=False)
    assert "Last good checkpoint" in str(err.value) and "\n" not in str(err.value)
    from editkit.train.checkpoint import latest_checkpoint, load_checkpoint

    last = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert all(torch.isfinite(t).all() for t in load_checkpoint(last)["trainable"].values())


def test_cached_and_online_training_give_the_same_loss(cache_dir, synth, tmp_path):
    from editkit.train.edit_task import EditTask, _CachedSource

    online = _cfg(tmp_path / "o", cache_dir, data={"cache": [], "train": [{"manifest": str(synth["train"])}]},
                  objective={"text_dropout": 0.5, "mask_weight": 2.0})
    task = EditTask(online, torch.device("cpu"))
    cached = _CachedSource(str(cache_dir))
    ids = [r.id for r in task.sources[0].records[:2]]
    losses = []
    for source, indices in ((task.sources[0], [0, 1]), (cached, [cached.ids.index(i) for i in ids])):
        g = torch.Generator().manual_seed(3)
        losses.append(task.loss(task.make_batch(source, indices, g), g).loss.item())
    assert losses[0] == losses[1]


def test_lbm_run_with_sub_stream_and_pixel_loss(cache_dir, tmp_path):
    cfg = _cfg(tmp_path / "lbm", cache_dir,
               objective={"kind": "lbm", "timesteps": {"sampling": "discrete"},
                          "lbm": {"sub_stream_weight": 0.5, "pixel_loss_weight": 0.1, "pixel_crop": 4}},
               loop={"max_steps": 2})
    train(cfg, progress=False)
    for column in ("lbm", "lbm_sub", "lbm_pixel"):
        assert len(_losses(tmp_path / "lbm", column)) == 2


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  cache: [x]\noptim:\n  learning_rate: 1\n")
    proc = subprocess.run([sys.executable, "-m", "editkit", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"editkit: error: {bad}: field optim.learning_rate: unknown field; check the spelling "
        "(docs/training.md lists the fields)"]
