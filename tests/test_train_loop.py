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
    assert (again["records"], again["skipped"], again["out"]) == (0, 8, str(cache_dir))
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


@pytest.mark.slow
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
    from editkit.models import load_model

    tuned = load_model("tiny", transformer=tmp_path / "full" / "final" / "transformer", dtype="fp32", device="cpu")
    base = load_model("tiny", dtype="fp32", device="cpu")
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.transformer.parameters(), base.transformer.parameters())]
    assert max(diffs) > 1e-3  # the engine loads the fine-tuned transformer with transformer=PATH


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
    with open(tmp_path / "cut" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))  # step 4 not logged twice
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
    cached = _CachedSource(str(cache_dir), online.data)
    ids = [r.id for r in task.sources[0].records[:2]]
    losses = []
    for source, indices in ((task.sources[0], [0, 1]), (cached, [cached.ids.index(i) for i in ids])):
        g = torch.Generator().manual_seed(3)
        losses.append(task.loss(task.make_batch(source, indices, g), g).loss.item())
    # Same record, same noise, but the cache encoded its records in batches (build_cache's batch_size)
    # and the online source one at a time: float32 matmuls of other shapes block (round) differently,
    # a few ulps (~1e-7 relative) per op through the VLM, VAE and transformer (measured: 8e-8). 1e-5
    # allows that and still fails on a real difference (other records or other noise: >1e-2).
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_lbm_run_with_sub_stream_and_pixel_loss(cache_dir, tmp_path):
    cfg = _cfg(tmp_path / "lbm", cache_dir, data={"inverse_probability": 1.0},  # the inverse edit too
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


def _edit_plus_pipeline(model, monkeypatch):
    """The diffusers 2511 pipeline over the same components, with the tiny model's view sizes."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", model.vlm_image_area)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", model.vae_image_area)
    pipe = plus.QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, processor=model.processor,
        transformer=model.transformer)
    pipe.prompt_template_encode_start_idx = model.drop_idx
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_trained_lora_changes_engine_and_diffusers_identically(lora_run, synth, monkeypatch):
    from editkit.data import read_manifest
    from editkit.data.images import load_image
    from editkit.infer.engine import Engine
    from editkit.infer.sampler import sample
    from editkit.models import load_model

    out, _ = lora_run
    record = read_manifest(synth["val"])[0]
    image, prompt = load_image(record.sources[0]), record.instruction
    model = load_model("tiny", dtype="fp32", device="cpu")
    inputs = model.prepare([prompt], [[image]], 64, 64, None)
    base = sample(model, inputs, steps=3, true_cfg_scale=1.0, seeds=[0])
    engine = Engine(model)
    results = {}
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "lora_diffsynth.safetensors"):
        engine.load_loras([str(out / "final" / name)])
        results[name] = sample(model, inputs, steps=3, true_cfg_scale=1.0, seeds=[0])
    engine.unload_loras()
    reference = load_model("tiny", dtype="fp32", device="cpu")
    pipe = _edit_plus_pipeline(reference, monkeypatch)
    pipe.load_lora_weights(str(out / "final"))
    ref = pipe(image=[image], prompt=prompt, negative_prompt=None, true_cfg_scale=1.0, num_inference_steps=3,
               width=64, height=64, generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    ours = results["pytorch_lora_weights.safetensors"]
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the edit
    assert (ours - ref).abs().max() <= 1e-4  # exactly as diffusers applies it
    for name, other in results.items():
        assert torch.equal(other, ours), name


@pytest.mark.slow
def test_two_process_gloo_ddp_run(cache_dir, tmp_path):
    import json
    import os
    import socket

    import yaml

    cfg = _cfg(tmp_path / "ddp", cache_dir, loop={"max_steps": 2, "checkpoint_every": 2})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "editkit", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    from editkit.train.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step-000002")
    assert len(state["rng"]) == 2 and len(state["state"]["sampler"]) == 2
    assert sorted(_losses(tmp_path / "ddp")) == [1, 2]


def test_vae_stage_trains_and_saves_a_loadable_vae(synth, tmp_path):
    import shutil

    from diffusers import AutoencoderKLQwenImage

    from editkit.models import load_model
    from editkit.models.loading import save_tiny

    cfg = validate_config({
        "stage": "vae", "output_dir": str(tmp_path / "vae"),
        "data": {"train": [{"manifest": str(synth["train"])}], "batch_size": 8},
        "vae": {"size": 32, "stats_batches": 2},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "loop": {"max_steps": 15, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no",
                 "preview_every": 15, "val_samples": 4}})
    train(cfg, progress=False)
    losses = _losses(tmp_path / "vae")
    assert _mean([losses[s] for s in (13, 14, 15)]) < 0.8 * _mean([losses[s] for s in (1, 2, 3)])
    assert (tmp_path / "vae" / "previews" / "step-000015.png").is_file()
    vae = AutoencoderKLQwenImage.from_pretrained(tmp_path / "vae" / "final" / "vae")
    assert len(vae.config.latents_mean) == 4 and vae.config.latents_std != [1.0] * 4
    # the facade normalises the new latents: about zero mean and unit std per channel
    folder = save_tiny(tmp_path / "model")
    shutil.rmtree(folder / "vae")
    shutil.copytree(tmp_path / "vae" / "final" / "vae", folder / "vae")
    model = load_model(folder, dtype="fp32", device="cpu")
    from editkit.train.vae_stage import VaeTask

    task = VaeTask(cfg, torch.device("cpu"))
    pixels = task.pixels(list(range(16)))[:, :, 0]
    z = model.encode_latents(pixels).transpose(0, 1).reshape(4, -1)
    assert z.mean(1).abs().max() < 0.05 and (z.std(1) - 1).abs().max() < 0.05


def _vae_cfg(out, synth, **loop):
    return validate_config({
        "stage": "vae", "output_dir": str(out), "seed": 1,
        "data": {"train": [{"manifest": str(synth["train"])}], "batch_size": 4},
        "vae": {"size": 32, "stats_batches": 1},
        "optim": {"name": "prodigy_sf"},
        "loop": {"max_steps": 4, "checkpoint_every": 2, "tensorboard": False, "mixed_precision": "no", **loop}})


@pytest.mark.slow
def test_prodigy_schedule_free_resume_is_exact(synth, tmp_path):
    train(_vae_cfg(tmp_path / "whole", synth, tensorboard=True), progress=False)
    assert list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))
    cut = _vae_cfg(tmp_path / "cut", synth)
    train(cut, stop_after=3, progress=False)
    train(cut, resume="latest", progress=False)
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step


def test_out_of_memory_names_the_switches(synth, tmp_path, monkeypatch):
    from editkit.train.vae_stage import VaeTask

    def oom(self, batch, generator):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VaeTask, "loss", oom)
    with pytest.raises(UserError) as err:
        train(_vae_cfg(tmp_path / "oom", synth), progress=False)
    msg = str(err.value)
    assert msg.startswith("out of memory") and "train.gradient_checkpointing=true" in msg and "\n" not in msg


def test_cache_ranks_write_their_own_shards(synth, tmp_path, monkeypatch):
    from editkit.data import read_manifest
    from editkit.train.cache import CacheReader, build_cache

    out = tmp_path / "c"
    for rank in (1, 0):  # as two torchrun processes would
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        build_cache("tiny", synth["val"], out, area=4096, multiple=16, dtype="fp32", device="cpu", progress=False)
    assert sorted(p.name for p in out.glob("index-r*.json")) == ["index-r0.json", "index-r1.json"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["r0-00000.safetensors", "r1-00000.safetensors"]
    reader = CacheReader(out)
    assert reader.ids == sorted(r.id for r in read_manifest(synth["val"]))
    assert reader.verify()["records"] == 2


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from editkit.train.metrics import MetricsLogger

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)
