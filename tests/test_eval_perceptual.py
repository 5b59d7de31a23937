"""LPIPS and DreamSim on torch alone, from tiny random weights saved in the reference packages' file
layouts (torchvision's AlexNet / VGG16 / SqueezeNet 1.1 checkpoints + the lpips v0.1 heads; a dreamsim
cache_dir).

Equality with the `lpips` and `dreamsim` packages themselves needs torchvision: bench/perceptual_equality.py.
Here: the distances' properties, the LoRA merge against peft, the ViT against transformers' ViT and CLIP
on the same weights, the LPIPS formula written out (AlexNet and SqueezeNet), PIE-Bench's zero-filled
background LPIPS (`lpips_out`), the choice of backbone, the metrics through `editkit eval`, the RGBA-VAE
loss's gradient, and one-line errors for missing files.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from editkit.errors import UserError
from editkit.eval.metrics import FEATURE_METRICS
from editkit.eval.metrics.dreamsim_net import load_dreamsim
from editkit.eval.metrics.lpips_net import SCALE, SHIFT, load_lpips
from editkit.eval.sample import Sample
from tests.cli_run import run_cli
from tests.eval_fixtures import make_dataset, make_predictions

CPU = torch.device("cpu")

# ----- LPIPS files: torchvision's `features` keys with reduced widths, the lpips heads ---------------

ALEX_CONVS = {0: 11, 3: 5, 6: 3, 8: 3, 10: 3}  # torchvision index -> kernel size
ALEX_WIDTHS = (8, 12, 16, 12, 12)
VGG_CONVS = {i: 3 for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
VGG_WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)
VGG_TAPPED = (1, 3, 6, 9, 12)  # which convolutions feed the tapped ReLUs (relu1_2 ... relu5_3)
SQUEEZE_STEM = 8  # features.0: Conv2d(3, 8, 3, stride=2)
SQUEEZE_FIRES = {3: (4, 4, 4), 4: (4, 4, 4), 6: (4, 6, 6), 7: (4, 6, 6), 9: (6, 8, 8), 10: (6, 8, 8),
                 11: (8, 10, 10), 12: (8, 10, 10)}  # torchvision index -> (squeeze, expand1x1, expand3x3)
SQUEEZE_TAPPED = (SQUEEZE_STEM, 8, 12, 16, 16, 20, 20)  # widths after indices 1, 4, 7, 9, 10, 11, 12


def _conv(state, key, out, inp, kernel, gen):
    std = (2 / (inp * kernel * kernel)) ** 0.5  # He initialisation: the ReLUs stay alive
    state[f"{key}.weight"] = std * torch.randn(out, inp, kernel, kernel, generator=gen)
    state[f"{key}.bias"] = 0.01 * torch.randn(out, generator=gen)


def _squeeze_state(gen: torch.Generator) -> dict:
    """torchvision's squeezenet1_1 state dict keys (features.N.squeeze / expand1x1 / expand3x3), narrow."""
    state, channels = {}, SQUEEZE_STEM
    _conv(state, "features.0", SQUEEZE_STEM, 3, 3, gen)
    for index, (squeeze, e1, e3) in SQUEEZE_FIRES.items():
        _conv(state, f"features.{index}.squeeze", squeeze, channels, 1, gen)
        _conv(state, f"features.{index}.expand1x1", e1, squeeze, 1, gen)
        _conv(state, f"features.{index}.expand3x3", e3, squeeze, 3, gen)
        channels = e1 + e3
    state["classifier.1.weight"] = torch.randn(10, channels, 1, 1, generator=gen)
    return state


def _trunk_state(convs: dict, widths: tuple, gen: torch.Generator) -> dict:
    state, channels = {}, 3
    for (index, kernel), width in zip(convs.items(), widths):
        std = (2 / (channels * kernel * kernel)) ** 0.5  # He initialisation: the ReLUs stay alive
        state[f"features.{index}.weight"] = std * torch.randn(width, channels, kernel, kernel, generator=gen)
        state[f"features.{index}.bias"] = 0.01 * torch.randn(width, generator=gen)
        channels = width
    state["classifier.1.weight"] = torch.randn(10, 4, generator=gen)  # torchvision files carry the classifier too
    return state


def _heads(channels, gen) -> dict:
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(channels)}


def write_lpips(folder, net: str = "alex", seed: int = 0, safetensors: bool = False):
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if net == "alex":
        trunk, heads = _trunk_state(ALEX_CONVS, ALEX_WIDTHS, gen), _heads(ALEX_WIDTHS, gen)
        names = ("checkpoints/alexnet-owt-7be5be79.pth", "alex.pth")  # the torch hub folder layout
    elif net == "vgg":
        trunk, heads = _trunk_state(VGG_CONVS, VGG_WIDTHS, gen), _heads([VGG_WIDTHS[i] for i in VGG_TAPPED], gen)
        names = ("vgg16-397923af.pth", "vgg.pth")
    else:
        trunk, heads = _squeeze_state(gen), _heads(SQUEEZE_TAPPED, gen)
        names = ("squeezenet1_1-b8a52dc0.pth", "squeeze.pth")
    if safetensors:
        stems = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
        names = (f"{stems[net]}.safetensors", f"{net}.safetensors")
    for name, state in zip(names, (trunk, heads)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if safetensors:
            save_file(state, folder / name)
        else:
            torch.save(state, folder / name)
    return folder


@pytest.fixture(scope="module")
def lpips_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    return {net: write_lpips(root / net, net) for net in ("alex", "vgg", "squeeze")}


def _smooth(shape=(2, 3, 48, 48), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(shape[0], 3, 6, 6, generator=gen) * 2 - 1
    return F.interpolate(low, size=shape[2:], mode="bilinear", align_corners=False)


def _noisy(x, level, seed=1):
    return (x + level * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_is_zero_on_equal_images_symmetric_and_grows_with_noise(lpips_dirs, net):
    lpips = load_lpips(lpips_dirs[net], CPU, "test")
    assert lpips.trunk_name == net
    x = _smooth()
    with torch.no_grad():
        assert lpips(x, x).abs().max().item() < 1e-6
        y = _noisy(x, 0.2)
        torch.testing.assert_close(lpips(x, y), lpips(y, x), rtol=1e-5, atol=1e-7)
        levels = [lpips(x, _noisy(x, s)).mean().item() for s in (0.03, 0.15, 0.6)]
    assert levels[0] < levels[1] < levels[2], levels


def test_lpips_is_the_v01_formula_written_out(lpips_dirs):
    """AlexNet's five ReLUs after the ScalingLayer, unit-normalised, squared, weighted, averaged, summed."""
    folder = lpips_dirs["alex"]
    trunk = torch.load(folder / "checkpoints" / "alexnet-owt-7be5be79.pth", weights_only=True)
    heads = torch.load(folder / "alex.pth", weights_only=True)

    def relus(img):
        h = (img - torch.tensor(SHIFT).view(1, 3, 1, 1)) / torch.tensor(SCALE).view(1, 3, 1, 1)
        out = []
        for index, (stride, pad, pool) in {0: (4, 2, False), 3: (1, 2, True), 6: (1, 1, True), 8: (1, 1, False),
                                           10: (1, 1, False)}.items():
            h = F.max_pool2d(h, 3, 2) if pool else h
            h = F.relu(F.conv2d(h, trunk[f"features.{index}.weight"], trunk[f"features.{index}.bias"], stride, pad))
            out.append(h)
        return out

    x, y = _smooth(seed=3), _smooth(seed=4)
    expected = sum((F.conv2d((a / (a.norm(dim=1, keepdim=True) + 1e-10) - b / (b.norm(dim=1, keepdim=True) + 1e-10))
                             ** 2, heads[f"lin{k}.model.1.weight"])).mean(dim=(1, 2, 3))
                   for k, (a, b) in enumerate(zip(relus(x), relus(y))))
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(folder, CPU, "test")(x, y), expected, rtol=1e-5, atol=1e-7)


def _lpips_v01(taps_x, taps_y, heads) -> torch.Tensor:
    return sum((F.conv2d((a / (a.norm(dim=1, keepdim=True) + 1e-10) - b / (b.norm(dim=1, keepdim=True) + 1e-10))
                         ** 2, heads[f"lin{k}.model.1.weight"])).mean(dim=(1, 2, 3))
               for k, (a, b) in enumerate(zip(taps_x, taps_y)))


def test_squeeze_lpips_is_the_v01_formula_on_squeezenet_written_out(lpips_dirs):
    """SqueezeNet 1.1 as torchvision's forward computes it, functionally: stem conv (stride 2) + ReLU, then
    Fire modules between ceil-mode 3/2 max pools; LPIPS taps the stem's ReLU and Fires 4, 7, 9, 10, 11, 12."""
    folder = lpips_dirs["squeeze"]
    w = torch.load(folder / "squeezenet1_1-b8a52dc0.pth", weights_only=True)
    heads = torch.load(folder / "squeeze.pth", weights_only=True)

    def fire(h, i):
        h = F.relu(F.conv2d(h, w[f"features.{i}.squeeze.weight"], w[f"features.{i}.squeeze.bias"]))
        return torch.cat([F.relu(F.conv2d(h, w[f"features.{i}.expand1x1.weight"], w[f"features.{i}.expand1x1.bias"])),
                          F.relu(F.conv2d(h, w[f"features.{i}.expand3x3.weight"], w[f"features.{i}.expand3x3.bias"],
                                          padding=1))], dim=1)

    def taps(img):
        h = (img - torch.tensor(SHIFT).view(1, 3, 1, 1)) / torch.tensor(SCALE).view(1, 3, 1, 1)
        out = [F.relu(F.conv2d(h, w["features.0.weight"], w["features.0.bias"], stride=2))]
        h = F.max_pool2d(out[0], 3, 2, ceil_mode=True)
        h = fire(fire(h, 3), 4)
        out.append(h)
        h = fire(fire(F.max_pool2d(h, 3, 2, ceil_mode=True), 6), 7)
        out.append(h)
        h = F.max_pool2d(h, 3, 2, ceil_mode=True)
        for i in (9, 10, 11, 12):
            h = fire(h, i)
            out.append(h)
        return out

    x, y = _smooth((2, 3, 50, 61), seed=3), _smooth((2, 3, 50, 61), seed=4)  # odd sizes: ceil mode matters
    assert [t.shape[1] for t in taps(x)] == list(SQUEEZE_TAPPED)
    assert taps(x)[-1].shape[2:] == (3, 3)  # floor-mode pools would give 2x3
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(folder, CPU, "test")(x, y), _lpips_v01(taps(x), taps(y), heads),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_lpips_reads_safetensors_files_alike(lpips_dirs, tmp_path, net):
    folder = write_lpips(tmp_path / "st", net, safetensors=True)
    x, y = _smooth(seed=5), _smooth(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(folder, CPU, "t")(x, y), load_lpips(lpips_dirs[net], CPU, "t")(x, y))


def test_the_lpips_backbone_is_chosen_by_net_else_alex_vgg_squeeze_in_order(lpips_dirs, tmp_path):
    import shutil

    both = shutil.copytree(lpips_dirs["squeeze"], tmp_path / "both")
    shutil.copytree(lpips_dirs["vgg"], both, dirs_exist_ok=True)
    assert load_lpips(both, CPU, "t").trunk_name == "vgg"
    shutil.copytree(lpips_dirs["alex"], both, dirs_exist_ok=True)
    assert load_lpips(both, CPU, "t").trunk_name == "alex"
    x, y = _smooth(seed=12), _smooth(seed=13)
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(both, CPU, "t", net="squeeze")(x, y),
                                   load_lpips(lpips_dirs["squeeze"], CPU, "t")(x, y))
    with pytest.raises(UserError, match=r"has no squeezenet1_1-b8a52dc0\.pth") as err:
        load_lpips(lpips_dirs["alex"], CPU, "--weights lpips", net="squeeze")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="choose one of alex, vgg, squeeze"):
        FEATURE_METRICS["lpips"](net="resnet")
    assert FEATURE_METRICS["lpips"].settings() == {"net": "auto"}
    assert FEATURE_METRICS["lpips"].settings(net="squeeze") == {"net": "squeeze"}


def _masked_sample(pred: Image.Image, target: Image.Image | None, mask) -> Sample:
    return Sample("s", pred, target, mask)


def _tensor_of(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1


def test_lpips_out_is_lpips_of_both_images_with_the_edit_region_zero_filled(lpips_dirs):
    metric = FEATURE_METRICS["lpips"](net="squeeze")
    metric.load(lpips_dirs["squeeze"], CPU)
    pred, target = (_pil(x) for x in _smooth((2, 3, 40, 56), seed=14))
    mask = np.zeros((40, 56), dtype=bool)
    mask[8:30, 12:40] = True
    rows = metric.compute([_masked_sample(pred, target, mask), _masked_sample(pred, target, None),
                           _masked_sample(pred, target, np.ones((40, 56), dtype=bool)),
                           _masked_sample(pred, None, mask)])

    def by_hand(img):  # PIE-Bench: img * (1 - mask) in [0, 1], then * 2 - 1
        unit = np.asarray(img, dtype=np.float32) / 255 * (1 - mask[..., None].astype(np.float32))
        return torch.from_numpy(unit).permute(2, 0, 1)[None] * 2 - 1

    with torch.no_grad():
        expected = load_lpips(lpips_dirs["squeeze"], CPU, "t")(by_hand(pred), by_hand(target)).item()
        whole = load_lpips(lpips_dirs["squeeze"], CPU, "t")(_tensor_of(pred), _tensor_of(target)).item()
    assert rows[0]["lpips_out"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert rows[0]["lpips"] == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert abs(rows[0]["lpips_out"] - rows[0]["lpips"]) > 1e-4  # the zero-fill changes the value
    assert math.isnan(rows[1]["lpips_out"]) and rows[1]["lpips"] == pytest.approx(whole, rel=1e-5)  # no mask
    assert math.isnan(rows[2]["lpips_out"])  # everything is edit region: no background
    assert math.isnan(rows[3]["lpips_out"]) and math.isnan(rows[3]["lpips"])  # no ground truth


def test_a_change_inside_the_mask_only_leaves_lpips_out_at_zero(lpips_dirs):
    metric = FEATURE_METRICS["lpips"]()
    metric.load(lpips_dirs["alex"], CPU)
    target = _pil(_smooth((1, 3, 48, 48), seed=15)[0])
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:34, 14:38] = True
    edited = np.array(target)
    edited[mask] = (np.random.default_rng(0).random((int(mask.sum()), 3)) * 255).astype(np.uint8)
    row = metric.compute([_masked_sample(Image.fromarray(edited), target, mask)])[0]
    assert row["lpips_out"] == pytest.approx(0, abs=1e-6)
    assert row["lpips"] > 1e-3


def test_the_rgba_vae_loss_uses_lpips_and_keeps_its_gradient(lpips_dirs):
    from editkit.train.rgba_vae_stage import RgbaVaeTask

    stage = SimpleNamespace(stage=SimpleNamespace(lpips_weights=str(lpips_dirs["alex"])), device=CPU)
    task = SimpleNamespace(perceptual=RgbaVaeTask._perceptual(stage))
    target = torch.cat([_smooth(seed=7), torch.rand(2, 1, 48, 48) * 2 - 1], dim=1)  # RGBA in [-1, 1]
    rec = _noisy(target, 0.3).requires_grad_(True)
    loss = RgbaVaeTask._lpips(task, rec, target)
    loss.backward()
    assert loss.item() > 0 and rec.grad.abs().sum().item() > 0
    assert all(p.grad is None for p in task.perceptual.parameters())
    assert RgbaVaeTask._lpips(task, target, target).item() == pytest.approx(0, abs=1e-6)


def test_lpips_missing_or_mismatched_files_are_one_line_errors(lpips_dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth") as err:
        load_lpips(empty, CPU, "--weights lpips=X")
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    no_heads = tmp_path / "no-heads"
    write_lpips(no_heads, "alex")
    (no_heads / "alex.pth").unlink()
    with pytest.raises(UserError, match=r"has no alex\.pth"):
        load_lpips(no_heads, CPU, "rgba_vae.lpips_weights")
    torch.save(torch.load(lpips_dirs["vgg"] / "vgg.pth", weights_only=True), no_heads / "alex.pth")
    with pytest.raises(UserError, match="another backbone"):
        load_lpips(no_heads, CPU, "t")
    backbone = no_heads / "checkpoints" / "alexnet-owt-7be5be79.pth"
    torch.save(torch.load(lpips_dirs["vgg"] / "vgg16-397923af.pth", weights_only=True), backbone)
    with pytest.raises(UserError, match="not torchvision's AlexNet state dict"):
        load_lpips(no_heads, CPU, "t")
    backbone.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read .*alexnet-owt-7be5be79.pth"):
        load_lpips(no_heads, CPU, "t")


def test_squeeze_missing_or_mismatched_files_are_one_line_errors(lpips_dirs, tmp_path):
    folder = write_lpips(tmp_path / "sq", "squeeze")
    (folder / "squeeze.pth").unlink()
    with pytest.raises(UserError, match=r"has no squeeze\.pth") as err:
        load_lpips(folder, CPU, "--weights lpips")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    torch.save(torch.load(lpips_dirs["alex"] / "alex.pth", weights_only=True), folder / "squeeze.pth")
    with pytest.raises(UserError, match=r"linear head lin\d is shape .*another backbone") as err:
        load_lpips(folder, CPU, "t")
    assert "\n" not in str(err.value)
    heads = torch.load(lpips_dirs["squeeze"] / "squeeze.pth", weights_only=True)
    del heads["lin6.model.1.weight"]  # six of the seven heads
    torch.save(heads, folder / "squeeze.pth")
    with pytest.raises(UserError, match="linear head lin6 is missing"):
        load_lpips(folder, CPU, "t")
    torch.save(torch.load(lpips_dirs["squeeze"] / "squeeze.pth", weights_only=True), folder / "squeeze.pth")
    backbone = folder / "squeezenet1_1-b8a52dc0.pth"
    state = torch.load(backbone, weights_only=True)
    del state["features.9.expand3x3.weight"]
    torch.save(state, backbone)
    with pytest.raises(UserError, match=r"features\.9\.expand3x3\.weight .*not torchvision's SqueezeNet 1\.1") as err:
        load_lpips(folder, CPU, "t")
    assert "\n" not in str(err.value)
    torch.save(torch.load(lpips_dirs["alex"] / "checkpoints" / "alexnet-owt-7be5be79.pth", weights_only=True),
               backbone)
    with pytest.raises(UserError, match="not torchvision's SqueezeNet 1.1 state dict"):
        load_lpips(folder, CPU, "t")


# ----- DreamSim files: a tiny dreamsim cache_dir ----------------------------------------------------

DIM, DEPTH, PATCH, GRID, HIDDEN, PROJ, RANK = 64, 2, 8, 4, 128, 32, 4  # 32x32 images, one 64-wide head


def _vit_state(gen, clip: bool) -> dict:
    """A ViT in DINO's layout; dreamsim's CLIP / OpenCLIP files add `pos_drop` (ln_pre) and `proj`."""
    def r(*shape, std=0.05):
        return std * torch.randn(*shape, generator=gen)

    state = {"cls_token": r(1, 1, DIM), "pos_embed": r(1, GRID * GRID + 1, DIM),
             "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": r(DIM),
             "norm.weight": 1 + r(DIM), "norm.bias": r(DIM)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(DIM), p + "norm1.bias": r(DIM),
                      p + "attn.qkv.weight": r(3 * DIM, DIM, std=0.15), p + "attn.qkv.bias": r(3 * DIM),
                      p + "attn.proj.weight": r(DIM, DIM, std=0.1), p + "attn.proj.bias": r(DIM),
                      p + "norm2.weight": 1 + r(DIM), p + "norm2.bias": r(DIM),
                      p + "mlp.fc1.weight": r(HIDDEN, DIM, std=0.1), p + "mlp.fc1.bias": r(HIDDEN),
                      p + "mlp.fc2.weight": r(DIM, HIDDEN, std=0.1), p + "mlp.fc2.bias": r(DIM)})
    if clip:
        state.update({"pos_drop.weight": 1 + r(DIM), "pos_drop.bias": r(DIM), "proj": r(DIM, PROJ, std=0.2)})
    return state


def _lora(gen, branches: int) -> dict:
    return {f"base_model.model.extractor_list.{b}.model.blocks.{i}.attn.qkv.lora_{w}.weight":
            0.2 * torch.randn(*((RANK, DIM) if w == "A" else (3 * DIM, RANK)), generator=gen)
            for b in range(branches) for i in range(DEPTH) for w in "AB"}


def write_dreamsim(folder, variant: str = "ensemble", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(_vit_state(gen, clip=False), folder / "checkpoints" / "dino_vitbase16_pretrain.pth")
    branches = 1
    if variant == "ensemble":
        for name in ("clip_vitb16", "open_clip_vitb16"):
            torch.save({"state_dict": _vit_state(gen, clip=True)}, folder / f"{name}_pretrain.pth.tar")
        branches = 3
    lora = folder / ("ensemble_lora" if variant == "ensemble" else "dino_vitb16_single_lora")
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2,
                                                          "lora_dropout": 0.3, "bias": "none",
                                                          "target_modules": ["qkv"]}))
    save_file(_lora(gen, branches), lora / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def dreamsim_dir(tmp_path_factory):
    return write_dreamsim(tmp_path_factory.mktemp("dreamsim") / "cache")


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_dreamsim_through_the_registry_is_zero_on_equal_images_symmetric_and_grows_with_noise(dreamsim_dir):
    metric = FEATURE_METRICS["dreamsim"]()
    metric.load(dreamsim_dir, CPU)
    assert metric.network.variant == "ensemble" and metric.size == PATCH * GRID
    base = [_pil(x) for x in _smooth((2, 3, 40, 56), seed=8)]
    noisy = {s: [_pil(x) for x in _noisy(_smooth((2, 3, 40, 56), seed=8), s)] for s in (0.03, 0.2, 0.7)}
    rows = metric.compute([Sample("same", base[0], base[0].copy()), Sample("none", base[0], None),
                           Sample("ab", base[0], noisy[0.2][0]), Sample("ba", noisy[0.2][0], base[0])])
    assert rows[0]["dreamsim"] == pytest.approx(0, abs=1e-6) and math.isnan(rows[1]["dreamsim"])
    assert rows[2]["dreamsim"] == pytest.approx(rows[3]["dreamsim"], rel=1e-5)
    means = [np.mean([r["dreamsim"] for r in metric.compute([Sample(str(i), b, n) for i, (b, n) in
                                                             enumerate(zip(base, noisy[s]))])]) for s in noisy]
    assert means[0] < means[1] < means[2], means


def test_the_lora_merge_is_what_peft_computes(dreamsim_dir):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from editkit.eval.metrics.dreamsim_net import DINO_B16, build_vit

    state = torch.load(dreamsim_dir / "checkpoints" / "dino_vitbase16_pretrain.pth", weights_only=True)
    vit = build_vit(DINO_B16, state, "t")
    peft_vit = get_peft_model(vit, LoraConfig(r=RANK, lora_alpha=2, lora_dropout=0.3, target_modules=["qkv"]))
    adapter = load_file(dreamsim_dir / "ensemble_lora" / "adapter_model.safetensors")
    with torch.no_grad():
        for name, param in peft_vit.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.", "base_model.model.extractor_list.0.model.")
                param.copy_(adapter[key.replace(".default.weight", ".weight")])
    peft_vit.eval()
    ours = load_dreamsim(dreamsim_dir, CPU, "t").branches[0].vit
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        merged, adapted = ours.tokens(x, DEPTH - 1), peft_vit.tokens(x, DEPTH - 1)
    with peft_vit.disable_adapter(), torch.no_grad():
        plain = peft_vit.tokens(x, DEPTH - 1)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert (merged - plain).abs().max().item() > 1e-3  # the adapter changes the result


def _hf_vit(state: dict, folder):
    """transformers' ViTModel with the same weights, saved under the hub's key names (from_pretrained renames)."""
    import transformers

    hf = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
          "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        for part, chunk in zip(("query", "key", "value"), state[p + "attn.qkv.weight"].chunk(3)):
            hf[q + f"attention.attention.{part}.weight"] = chunk
        for part, chunk in zip(("query", "key", "value"), state[p + "attn.qkv.bias"].chunk(3)):
            hf[q + f"attention.attention.{part}.bias"] = chunk
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense")):
            for kind in ("weight", "bias"):
                hf[q + f"{theirs}.{kind}"] = state[p + f"{ours}.{kind}"]
    config = transformers.ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=1,
                                    intermediate_size=HIDDEN, image_size=PATCH * GRID, patch_size=PATCH,
                                    layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in hf.items()}, folder / "model.safetensors")
    model, info = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True,
                                                        attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _hf_clip(state: dict, act: str):
    """transformers' CLIP image tower with the same weights; DINO's patch bias folded into the positions."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=1,
                                           intermediate_size=HIDDEN, image_size=PATCH * GRID, patch_size=PATCH,
                                           projection_dim=PROJ, hidden_act=act, layer_norm_eps=1e-5)
    config._attn_implementation = "eager"
    model = transformers.CLIPVisionModelWithProjection(config)
    pos = state["pos_embed"][0].clone()
    pos[1:] += state["patch_embed.proj.bias"]
    v = "vision_model."
    hf = {v + "embeddings.class_embedding": state["cls_token"].reshape(-1),
          v + "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
          v + "embeddings.position_embedding.weight": pos,
          v + "pre_layrnorm.weight": state["pos_drop.weight"], v + "pre_layrnorm.bias": state["pos_drop.bias"],
          v + "post_layernorm.weight": state["norm.weight"], v + "post_layernorm.bias": state["norm.bias"],
          "visual_projection.weight": state["proj"].T}
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", f"{v}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), state[p + f"attn.qkv.{kind}"].chunk(3)):
                hf[q + f"self_attn.{part}.{kind}"] = chunk
            for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                                 ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                hf[q + f"{theirs}.{kind}"] = state[p + f"{ours}.{kind}"]
    model.load_state_dict(hf, strict=False)
    missing = set(model.state_dict()) - set(hf)
    assert not missing, missing
    return model.eval()


def test_the_branches_match_transformers_vit_and_clip_on_the_same_weights(tmp_path):
    """DINO: the CLS token of the last block's output, before the final norm; CLIP / OpenCLIP: the image
    embedding (final-normed CLS @ proj) with QuickGELU / GELU; each after its own mean/std."""
    from editkit.eval.metrics.dreamsim_net import IMAGENET, OPENAI_CLIP

    folder = write_dreamsim(tmp_path / "cache")
    ours = load_dreamsim(folder, CPU, "t")  # the LoRA is merged: compare with merged weights
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))

    def normed(mean_std):
        return (x - torch.tensor(mean_std[0]).view(1, 3, 1, 1)) / torch.tensor(mean_std[1]).view(1, 3, 1, 1)

    merged = [{k: v for k, v in b.vit.state_dict().items()} | {"proj": b.proj} for b in ours.branches]
    with torch.no_grad():
        dino = _hf_vit(merged[0], tmp_path / "hf_vit")(pixel_values=normed(IMAGENET), output_hidden_states=True)
        torch.testing.assert_close(ours.branches[0](x), dino.hidden_states[DEPTH][:, 0], rtol=1e-4, atol=1e-5)
        for branch, state, act in zip(ours.branches[1:], merged[1:], ("quick_gelu", "gelu")):
            clip = _hf_clip(state, act)(pixel_values=normed(OPENAI_CLIP)).image_embeds
            torch.testing.assert_close(branch(x), clip, rtol=1e-4, atol=1e-5)
        a, b = x, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
        e = torch.cat([br(a) for br in ours.branches], -1), torch.cat([br(b) for br in ours.branches], -1)
        centred = [v - v.mean(-1, keepdim=True) for v in e]
        torch.testing.assert_close(ours(a, b), 1 - F.cosine_similarity(*centred, dim=-1), rtol=1e-5, atol=1e-6)


def test_a_single_branch_cache_dir_is_the_dino_variant(tmp_path):
    folder = write_dreamsim(tmp_path / "single", "dino_vitb16")
    model = load_dreamsim(folder, CPU, "t")
    assert model.variant == "dino_vitb16" and len(model.branches) == 1
    x = torch.rand(1, 3, 32, 32)
    assert model.embed(x).shape == (1, DIM)


def test_dreamsim_missing_or_bad_files_are_one_line_errors(dreamsim_dir, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="ensemble_lora/") as err:
        load_dreamsim(empty, CPU, "--weights dreamsim=X")
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    partial = shutil.copytree(dreamsim_dir, tmp_path / "partial")
    (partial / "clip_vitb16_pretrain.pth.tar").unlink()
    with pytest.raises(UserError, match=r"has no clip_vitb16_pretrain\.pth\.tar"):
        load_dreamsim(partial, CPU, "t")
    bad = shutil.copytree(dreamsim_dir, tmp_path / "bad")
    save_file({"extractor_list.0.model.blocks.0.attn.qkv.weight": torch.zeros(1)},
              bad / "ensemble_lora" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="unexpected key"):
        load_dreamsim(bad, CPU, "t")


# ----- both metrics through `editkit eval` ------------------------------------------------------------


def test_eval_scores_lpips_and_dreamsim_lower_for_closer_predictions(lpips_dirs, dreamsim_dir, tmp_path):
    import csv

    from editkit.eval.runner import evaluate

    manifest, records = make_dataset(tmp_path / "data", n=4)
    close = make_predictions(tmp_path / "runs" / "close", records, noise=0.02)
    far = make_predictions(tmp_path / "runs" / "far", records, noise=0.2, seed=2)
    summary = evaluate([close, far], records, tmp_path / "out", ["lpips", "dreamsim"],
                       weights={"lpips": lpips_dirs["vgg"], "dreamsim": dreamsim_dir}, batch_size=4,
                       show_progress=False)
    assert not summary.get("unavailable")
    with (tmp_path / "out" / "per_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    for column in ("lpips", "dreamsim"):
        means = {run: np.mean([float(r[column]) for r in rows if r["run"] == run]) for run in ("close", "far")}
        assert 0 < means["close"] < means["far"], (column, means)


def test_cli_missing_weight_files_exit_2_with_one_line(tmp_path, capsys):
    manifest, records = make_dataset(tmp_path / "data", n=2)
    preds = make_predictions(tmp_path / "runs" / "r", records, noise=0.02)
    (tmp_path / "w").mkdir()
    for name, expected in (("lpips", "alexnet-owt-7be5be79.pth"), ("dreamsim", "ensemble_lora/")):
        code, _, err = run_cli(capsys, "eval", "--pred", preds, "--data", manifest, "--out", tmp_path / name,
                               "--metrics", name, "--weights", f"{name}={tmp_path / 'w'}")
        errors = [line for line in err.splitlines() if line.startswith("editkit: error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0] and str(tmp_path / "w") in errors[0], err


def test_cli_lpips_net_picks_the_backbone_and_enters_the_fingerprint(lpips_dirs, tmp_path, capsys):
    import csv
    import shutil

    manifest, records = make_dataset(tmp_path / "data", n=2)
    preds = make_predictions(tmp_path / "runs" / "r", records, noise=0.05)
    both = shutil.copytree(lpips_dirs["alex"], tmp_path / "both")
    shutil.copytree(lpips_dirs["squeeze"], both, dirs_exist_ok=True)
    out = tmp_path / "out"
    base = ["eval", "--pred", preds, "--data", manifest, "--out", out, "--metrics", "lpips",
            "--weights", f"lpips={both}"]
    code, _, err = run_cli(capsys, *base, "--lpips-net", "squeeze")
    assert code == 0, err
    with (out / "per_sample.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    metric = FEATURE_METRICS["lpips"]()
    metric.load(lpips_dirs["squeeze"], CPU)  # the squeeze-only folder: nothing else to choose
    from editkit.eval.sample import load_sample

    for record, expected in zip(records, metric.compute([load_sample(r, preds / f"{r.id}.png") for r in records])):
        assert float(rows[record.id]["lpips"]) == pytest.approx(expected["lpips"], rel=1e-5)
        assert float(rows[record.id]["lpips_out"]) == pytest.approx(expected["lpips_out"], rel=1e-5)
        assert 0 < expected["lpips_out"]  # make_predictions adds noise outside the mask too
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["metric_settings"]["lpips"] == {"net": "squeeze"}
    code, _, err = run_cli(capsys, *base)  # the default (alex first) would mix backbones in one folder
    assert code == 2 and "differs in: metric_settings" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, *base, "--lpips-net", "resnet")
    assert code == 2 and "--lpips-net resnet" in err and len(err.strip().splitlines()) == 1
