"""Config, timestep sampling, loss weighting, objectives (hand-computed), optimisers, checkpoints."""

import contextlib
import math
import random

import numpy as np
import pytest
import torch

from editkit.errors import UserError
from editkit.infer.sampler import dynamic_shift_mu
from editkit.models.qwen_image_edit import QWEN_IMAGE_SCHEDULER
from editkit.train import checkpoint as ckpt
from editkit.train.config import ObjectiveConfig, OptimConfig, TimestepConfig, load_config
from editkit.train.objectives import bridge_point, flow_matching_loss, lbm_loss, mask_weight_map
from editkit.train.optim import build_optimizer, build_schedule, clips_gradients, eval_mode, train_mode
from editkit.train.timesteps import exponential_shift, loss_weights, sample_sigmas


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


# ---- config ----

def test_config_overrides_and_defaults(tmp_path):
    p = _write(tmp_path, "data:\n  cache: [c1]\noptim:\n  name: prodigy_sf\n")
    cfg = load_config(p, ["optim.weight_decay=0.01", "train.lora.rank=512", "data.batch_size=4"])
    assert cfg.optim.lr == 1.0  # prodigy default
    assert cfg.optim.weight_decay == 0.01 and cfg.train.lora.rank == 512 and cfg.data.batch_size == 4
    assert load_config(p, ["optim.lr=1e-3"]).optim.lr == 1e-3


@pytest.mark.parametrize("text,overrides,needle", [
    ("data:\n  cache: [c]\noptim:\n  lrr: 1\n", [], "field optim.lrr: unknown field"),
    ("data:\n  cache: [c]\n", ["optim.lr=abc"], "field optim.lr:"),
    ("data:\n  cache: [c]\n", ["train.lora.rank=1024"], "field train.lora.rank:"),
    ("model: tiny\n", [], "give data.train"),
    ("data: [1\n", [], ":2: not valid YAML"),
    ("data:\n  cache: [c]\n", ["optim.lr"], "write key=value"),
    ("data:\n  cache: [c]\n  area: 100\n  multiple: 16\n", [], "data.area: at least one 16x16 tile"),
])
def test_config_errors_are_one_line(tmp_path, text, overrides, needle):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_config(p, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert str(p) in msg or msg.startswith("override")


# ---- timesteps ----

def test_sigma_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    for sampling in ("uniform", "logit_normal", "shifted"):
        s = sample_sigmas(TimestepConfig(sampling=sampling), 2000, g, image_seq_len=4096, shift=QWEN_IMAGE_SCHEDULER)
        assert s.min() > 0 and s.max() <= 1
    d = sample_sigmas(TimestepConfig(sampling="discrete", values=[0.25, 1.0]), 500, g)
    assert set(d.tolist()) == {0.25, 1.0}
    # the shift pushes σ towards noise for large images, following the scheduler's formula
    mu = dynamic_shift_mu(QWEN_IMAGE_SCHEDULER, 4096)
    assert mu == pytest.approx(0.5 + (0.9 - 0.5) * (4096 - 256) / (8192 - 256))
    assert float(exponential_shift(torch.tensor(0.5), mu)) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1))
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    t = torch.tensor([0.2, 0.6])
    assert torch.allclose(exponential_shift(t, mu), sched.time_shift(mu, 1.0, t).float())


def test_loss_weights():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weights("none", s), torch.ones(3))
    assert torch.allclose(loss_weights("sd3", s), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    bell = loss_weights("bell", torch.linspace(0, 1, 1001))
    assert bell.mean() == pytest.approx(1.0, abs=1e-3) and bell[500] == bell.max() and bell[0] < 1e-6


# ---- objectives ----

def test_flow_matching_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 1, 6, 6)
    cfg = ObjectiveConfig(timesteps=TimestepConfig(sampling="discrete", values=[0.3]))
    seen = {}

    def predict(x_t, sigmas):
        seen["x_t"], seen["s"] = x_t, sigmas
        return torch.zeros_like(x_t)

    out = flow_matching_loss(predict, x0, cfg, g)
    g2 = torch.Generator().manual_seed(3)
    torch.randint(1, (2,), generator=g2)
    noise = torch.randn(x0.shape, generator=g2)
    assert torch.allclose(seen["x_t"], 0.7 * x0 + 0.3 * noise)
    assert out.loss.item() == pytest.approx(((noise - x0) ** 2).mean().item(), rel=1e-5)


def test_mask_weight_map_at_latent_resolution():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1  # top-left quarter is the edit region
    w = mask_weight_map(mask, torch.Size([1, 4, 1, 2, 2]), extra=3.0)
    assert w.shape == (1, 1, 1, 2, 2)
    assert w.flatten().tolist() == [4.0, 1.0, 1.0, 1.0]
    assert mask_weight_map(mask, torch.Size([1, 4, 1, 2, 2]), 0.0) is None


def test_bridge_point_hand_values():
    src, tgt, eps = torch.full((1, 2), 2.0), torch.full((1, 2), -1.0), torch.ones(1, 2)
    x = bridge_point(src, tgt, torch.tensor([0.25]), eps, bridge_noise=0.1)
    # σ·src + (1-σ)·tgt + b·sqrt(σ(1-σ))·ε with σ = 0.25 (LBM's t = 0.75)
    expected = 0.25 * 2 + 0.75 * -1 + 0.1 * math.sqrt(0.25 * 0.75)
    assert torch.allclose(x, torch.full((1, 2), expected))
    assert torch.equal(bridge_point(src, tgt, torch.tensor([1.0]), eps, 0.1), src)
    assert torch.equal(bridge_point(src, tgt, torch.tensor([0.0]), eps, 0.1), tgt)


def test_lbm_loss_and_sub_stream_hand_values():
    src, tgt, white = torch.full((1, 2, 1, 2, 2), 1.0), torch.zeros(1, 2, 1, 2, 2), torch.full((1, 2, 1, 2, 2), 3.0)
    cfg = ObjectiveConfig(kind="lbm", timesteps=TimestepConfig(sampling="discrete", values=[0.5]))
    cfg.lbm.bridge_noise = 0.0
    cfg.lbm.sub_stream_weight = 0.5
    # a network that always predicts 2.0: main error (2-1)^2 = 1, sub error (2-3)^2 = 1 → 1 + 0.5·1
    out = lbm_loss(lambda x, s: torch.full_like(x, 2.0), src, tgt, cfg, torch.Generator().manual_seed(0), white=white)
    assert out.parts["lbm"] == pytest.approx(1.0) and out.parts["lbm_sub"] == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.5)
    # the perfect drift has zero loss
    perfect = lbm_loss(lambda x, s: src - tgt, src, tgt, cfg, white=white)
    assert perfect.parts["lbm"] == 0.0


def test_lbm_pixel_loss_uses_decoder():
    src, tgt = torch.ones(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4)
    cfg = ObjectiveConfig(kind="lbm", timesteps=TimestepConfig(sampling="discrete", values=[1.0]))
    cfg.lbm.pixel_loss_weight, cfg.lbm.pixel_crop = 2.0, 2
    decoded = []

    def decode(z):
        decoded.append(z.shape)
        return z * 10

    # predict zero drift: estimate = x_1 - 1·0 = src, decoded |10 - 0| = 10
    out = lbm_loss(lambda x, s: torch.zeros_like(x), src, tgt, cfg, torch.Generator().manual_seed(0), decode=decode)
    assert decoded[0][-2:] == (2, 2)
    assert out.parts["lbm_pixel"] == pytest.approx(10.0)
    assert out.loss.item() == pytest.approx(1.0 + 2.0 * 10.0)


# ---- optimisers ----

def test_adamw_schedule_and_prodigy_modes():
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], OptimConfig(lr=0.1, warmup_steps=2))
    sched = build_schedule(opt, OptimConfig(lr=0.1, warmup_steps=2), 10)
    assert opt.param_groups[0]["lr"] == 0.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert clips_gradients(OptimConfig()) and not clips_gradients(OptimConfig(name="prodigy_sf"))
    q = torch.nn.Parameter(torch.zeros(3))
    sf = build_optimizer([q], OptimConfig(name="prodigy_sf"))
    for _ in range(5):
        q.grad = torch.tensor([1.0, -2.0, 3.0])
        sf.step()
    train_w = q.detach().clone()
    eval_mode(sf)
    assert not torch.equal(q.detach(), train_w)  # averaged weights swapped in
    train_mode(sf)
    assert torch.allclose(q.detach(), train_w)


# ---- checkpoints ----

def test_checkpoint_roundtrip_keep_last_and_rng(tmp_path):
    g = torch.Generator().manual_seed(1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = ckpt.capture_rng(g)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"o": step}, {"s": step},
                             [state], {"sampler": {"pos": step}}, keep_last=2)
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step-000002", "step-000003"]
    latest = ckpt.resolve_resume("latest", tmp_path)
    loaded = ckpt.load_checkpoint(latest)
    assert {k: v for k, v in loaded["state"].items() if k != "sha256"} == {"step": 3, "sampler": {"pos": 3}}
    assert sorted(loaded["state"]["sha256"]) == ["optimizer.pt", "rng.pt", "scheduler.pt", "trainable.safetensors"]
    assert loaded["trainable"]["w"].tolist() == [3.0, 3.0]
    ckpt.restore_rng(loaded["rng"][0], g)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()) == expected
    (latest / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(latest)
    assert ckpt.resolve_resume("latest", tmp_path / "none") is None


def test_example_configs_validate():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"lora_2511.yaml", "full_ft_2511.yaml", "lbm_2511.yaml", "vae_tiny.yaml", "tiny_lora.yaml"} <= set(names)
    for path in root.glob("*.yaml"):
        load_config(path)
    for path in (root / "accelerate").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    zero3 = yaml.safe_load((root / "deepspeed" / "zero3.json").read_text())["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["overlap_comm"] and zero3["offload_param"]["device"] == "none"


def test_unused_last_block_modules_are_left_out():
    """The last block's text output is discarded: those weights get no gradient, so editkit freezes them."""
    from editkit.models.families import get_family
    from editkit.train.config import ModelSection
    from editkit.train.trainable import lora_target_modules, setup_trainable

    family = get_family("qwen-image-edit-2511")
    transformer = family.build_tiny().transformer
    last = len(transformer.transformer_blocks) - 1
    hidden = torch.randn(1, 32, transformer.config.in_channels)
    text = torch.randn(1, 5, transformer.config.joint_attention_dim)
    transformer(hidden, text, torch.ones(1, 5), torch.tensor([0.5]), [[(1, 4, 4), (1, 4, 4)]]).sample.sum().backward()
    no_grad = {n.rsplit(".", 1)[0] for n, p in transformer.named_parameters() if p.grad is None}
    unused = family.unused_modules(transformer)
    assert {m for m in no_grad} == {f"transformer_blocks.{last}.attn.to_add_out",
                                    f"transformer_blocks.{last}.txt_mlp.net.0.proj",
                                    f"transformer_blocks.{last}.txt_mlp.net.2"}
    assert all(any(n == u or n.startswith(u + ".") for u in unused) for n in no_grad)
    targets = lora_target_modules(transformer, "default", family)
    assert f"transformer_blocks.{last}.attn.to_add_out" not in targets
    assert "transformer_blocks.0.attn.to_add_out" in targets and "img_in" not in targets
    assert {"img_in", "txt_in", "proj_out"} <= set(lora_target_modules(transformer, "expanded", family))
    assert lora_target_modules(transformer, ["*.attn.to_q"], family) == [
        f"transformer_blocks.{i}.attn.to_q" for i in range(last + 1)]
    linear = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lora_target_modules(transformer, "all-linear", family)) == linear - no_grad
    with pytest.raises(UserError, match="matches no Linear.*use default, expanded, all-linear"):
        lora_target_modules(transformer, ["nothing_*"], family)
    full = family.build_tiny().transformer
    info = setup_trainable(full, ModelSection(mode="full"), family)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in full.named_parameters() if n.rsplit(".", 1)[0] in no_grad}
    assert info["trainable_params"] == sum(p.numel() for p in full.parameters()) - sum(
        p.numel() for n, p in full.named_parameters() if n in frozen)


def test_bridge_sampler_one_step_inverts_a_perfect_drift():
    from types import SimpleNamespace

    from editkit.infer.sampler import sample_bridge

    g = torch.Generator().manual_seed(0)
    source = torch.randint(-8, 8, (2, 16, 16), generator=g).float() / 4  # dyadic: exact arithmetic
    target = torch.randint(-8, 8, (2, 16, 16), generator=g).float() / 4
    model = SimpleNamespace(predict=lambda x, t, *args: source - target, denoising=contextlib.nullcontext)
    inputs = SimpleNamespace(prompt_embeds=None, prompt_mask=None, img_shapes=None, cond_latents=None)
    assert torch.equal(sample_bridge(model, inputs, source, steps=1, bridge_noise=0.005, seeds=[0, 1]), target)
    many = sample_bridge(model, inputs, source, steps=4, bridge_noise=0.0, seeds=[0, 1])
    assert torch.allclose(many, target, atol=1e-6)


def test_reverse_sample_swaps_source_and_target():
    from editkit.train.samples import can_reverse, collate, reverse_sample

    t, b = torch.full((4, 8, 8), 1.0), torch.full((4, 8, 8), 2.0)
    e = {n: torch.full((3, 6), float(i)) for i, n in enumerate(("en", "empty", "inverse", "inverse_cn"))}
    sample = {"target": t, "source.0": torch.zeros(4, 4, 4), "bridge_source": b, "mask": torch.ones(1, 8, 8),
              **{f"embeds.{n}": v for n, v in e.items()}}
    assert can_reverse(sample) and not can_reverse({**sample, "source.1": t})
    rev = reverse_sample(sample)
    assert rev["target"] is b and rev["source.0"] is t and rev["bridge_source"] is t
    assert rev["embeds.en"] is e["inverse"] and rev["embeds.cn"] is e["inverse_cn"]
    batch = collate([rev, rev], (64, 64), [(64, 64)], instruction="cn")
    assert torch.equal(batch.embeds[0], e["inverse_cn"]) and torch.equal(batch.sources[0][0], t)
