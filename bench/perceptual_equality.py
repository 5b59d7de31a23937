"""editkit's LPIPS and DreamSim against the reference packages (`lpips`, `dreamsim`) on the same weights.

Random weights are written in the reference layouts (torchvision's AlexNet / VGG16 / SqueezeNet 1.1
checkpoints under a torch hub folder and the lpips v0.1 heads; the files of a dreamsim cache_dir: DINO's hub checkpoint,
the CLIP / OpenCLIP ViTs in DINO's layout, peft LoRA adapters), each reference package loads them
its own way, editkit loads the same folders (`--weights lpips=DIR`, `--weights dreamsim=DIR`), and
both score the same random images: as tensors, and end to end from PIL images (the package's own
image conversion against editkit's metric; for LPIPS also `lpips_out`, the package on both images with
an edit region zero-filled, as PIE-Bench computes its background LPIPS). Prints the largest absolute
difference of each check and exits 1 if any exceeds --tolerance (1e-5). TF32 is off, so both sides compute in float32.

Needs torch, torchvision, lpips, dreamsim and their imports (open_clip_torch, timm, ftfy, wcwidth,
scipy, peft). On the GPU machine, from the repository root (wheels in .whl/perceptual/):
    source bench/gpu_setup.sh
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/perceptual/*.whl
    python3 bench/perceptual_equality.py --device cuda
dreamsim loads DINO through torch.hub.load('facebookresearch/dino:main'); the machine is offline, so
the hub cache gets a stand-in hubconf that does what DINO's does for dino_vitb16 (vit_base(16,
num_classes=0) of DINO's vision_transformer, which dreamsim ships a copy of, loaded strictly from
<hub>/checkpoints/dino_vitbase16_pretrain.pth); --dino-repo DIR uses a checkout of DINO instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HUBCONF = '''"""Stand-in for facebookresearch/dino's hubconf.py, written by bench/perceptual_equality.py."""
import os

import torch
from dreamsim.feature_extraction.vision_transformer import vit_base


def dino_vitb16(pretrained=True, **kwargs):
    model = vit_base(patch_size=16, num_classes=0, **kwargs)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "dino_vitbase16_pretrain.pth")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model
'''
LPIPS_FILES = {"alex": ("alexnet", "alexnet-owt-7be5be79.pth"), "vgg": ("vgg16", "vgg16-397923af.pth"),
               "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")}
DREAMSIM_BACKBONES = {  # dreamsim model_type -> (file, patch size); DINO's is the torch hub checkpoint
    "dino_vitb16": ("checkpoints/dino_vitbase16_pretrain.pth", 16),
    "clip_vitb16": ("clip_vitb16_pretrain.pth.tar", 16),
    "open_clip_vitb16": ("open_clip_vitb16_pretrain.pth.tar", 16),
    "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", 32),
    "open_clip_vitb32": ("open_clip_vitb32_pretrain.pth.tar", 32),
}
ADAPTER_AS_BIN = {"dino_vitb16"}  # these variants' LoRA is written as adapter_model.bin (older peft's file)


class Report:
    def __init__(self, tolerance: float):
        self.tolerance, self.failed = tolerance, []

    def check(self, name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        ours, ref = ours.detach().double().cpu().reshape(-1), ref.detach().double().cpu().reshape(-1)
        if ours.shape != ref.shape:
            self.failed.append(name)
            print(f"{name:48s} FAIL shapes {tuple(ours.shape)} vs {tuple(ref.shape)}")
            return
        diff = (ours - ref).abs().max().item()
        ok = diff <= self.tolerance
        if not ok:
            self.failed.append(name)
        print(f"{name:48s} max|diff| {diff:.3e}  ({'ok' if ok else 'FAIL'}; values {ref.min():.4f}..{ref.max():.4f})")

    def same(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """A guard: the reference really holds the weights written (no silent fallback)."""
        if not torch.equal(a.detach().cpu().float(), b.detach().cpu().float()):
            self.failed.append(name)
            print(f"{name:48s} FAIL: the reference did not load the written weights")


def randomize(module: torch.nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Random weights that keep a ViT's activations in range: norms near 1, small matrices and biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def random_images(gen: torch.Generator, sizes) -> list[Image.Image]:
    out = []
    for w, h in sizes:
        yy, xx = np.mgrid[:h, :w]
        base = 0.5 + 0.4 * np.sin(xx[..., None] / (3 + 5 * torch.rand(3, generator=gen).numpy()) + yy[..., None] / 7)
        noise = torch.rand(h, w, 3, generator=gen).numpy() * 0.3
        out.append(Image.fromarray((np.clip(base + noise - 0.15, 0, 1) * 255).round().astype(np.uint8)))
    return out


def samples_of(preds, targets):
    from editkit.eval.sample import Sample

    return [Sample(str(i), p, t) for i, (p, t) in enumerate(zip(preds, targets))]


# ----- LPIPS ---------------------------------------------------------------------------------------


def tapped_widths(net: str, trunk: torch.nn.Module) -> list[int]:
    """The channels of the outputs the lpips package taps, read from torchvision's module: the
    convolutions before AlexNet's / VGG16's tapped ReLUs; SqueezeNet's stem convolution, then Fires
    4, 7, 9, 10, 11, 12 (each its two expands side by side)."""
    if net == "squeeze":
        fires = [trunk.features[i] for i in (4, 7, 9, 10, 11, 12)]
        return [trunk.features[0].out_channels] + [f.expand1x1.out_channels + f.expand3x3.out_channels for f in fires]
    convs = [m.out_channels for m in trunk.features if isinstance(m, torch.nn.Conv2d)]
    return [convs[c] for c in {"alex": [0, 1, 2, 3, 4], "vgg": [1, 3, 6, 9, 12]}[net]]


def check_lpips(net: str, work: Path, device: torch.device, gen: torch.Generator, report: Report) -> None:
    import lpips
    import torchvision

    from editkit.eval.metrics.lpips_net import load_lpips
    from editkit.eval.metrics.perceptual import LpipsMetric
    from editkit.eval.sample import Sample

    folder = work / f"lpips_{net}"
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    arch, hub_name = LPIPS_FILES[net]
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    trunk = getattr(torchvision.models, arch)()  # torchvision's default (random) initialisation
    torch.save(trunk.state_dict(), folder / "checkpoints" / hub_name)
    widths = tapped_widths(net, trunk)
    heads = {f"lin{k}.model.1.weight": 0.2 * torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(widths)}
    torch.save(heads, folder / f"{net}.pth")

    torch.hub.set_dir(str(folder))  # torchvision's pretrained=True reads <hub>/checkpoints/<hub_name>
    ref = lpips.LPIPS(net=net, version="0.1", model_path=str(folder / f"{net}.pth"), verbose=False).to(device)
    report.same(f"lpips {net}: reference trunk", ref.net.slice1[0].weight, trunk.features[0].weight)
    last = len(widths) - 1
    report.same(f"lpips {net}: reference heads", getattr(ref, f"lin{last}").model[1].weight,
                heads[f"lin{last}.model.1.weight"])
    ours = load_lpips(folder, device, "bench", net)
    assert ours.trunk_name == net, (ours.trunk_name, net)

    with torch.no_grad():
        for shape in ((4, 3, 64, 64), (2, 3, 97, 131)):
            x = torch.rand(shape, generator=gen).to(device) * 2 - 1
            y = (x + 0.3 * torch.randn(shape, generator=gen).to(device)).clamp(-1, 1)
            report.check(f"lpips {net}: tensors {shape[2]}x{shape[3]}", ours(x, y), ref(x, y))
        preds = random_images(gen, [(80, 64), (131, 97), (64, 64)])
        targets = random_images(gen, [(80, 64), (131, 97), (64, 64)])
        metric = LpipsMetric(net=net)
        metric.load(folder, device)
        mine = torch.tensor([row["lpips"] for row in metric.compute(samples_of(preds, targets))])
        theirs = torch.cat([ref(lpips.im2tensor(np.asarray(p)).to(device), lpips.im2tensor(np.asarray(t)).to(device))
                            .reshape(-1) for p, t in zip(preds, targets)])
        report.check(f"lpips {net}: metric from PIL images", mine, theirs)
        masks = [np.zeros((t.height, t.width), dtype=bool) for t in targets]  # PIE-Bench's lpips_unedit_part:
        for m in masks:  # the edit region zero-filled in both images
            m[m.shape[0] // 4: m.shape[0] * 3 // 4, m.shape[1] // 3:] = True
        rows = metric.compute([Sample(str(i), p, t, m) for i, (p, t, m) in enumerate(zip(preds, targets, masks))])
        keep = [(1 - m)[..., None].astype(np.uint8) for m in masks]
        theirs = torch.cat([ref(lpips.im2tensor(np.asarray(p) * k).to(device), lpips.im2tensor(np.asarray(t) * k)
                                .to(device)).reshape(-1) for p, t, k in zip(preds, targets, keep)])
        report.check(f"lpips {net}: lpips_out from PIL images", torch.tensor([r["lpips_out"] for r in rows]), theirs)


# ----- DreamSim ------------------------------------------------------------------------------------


def write_backbone(model_type: str, folder: Path, gen: torch.Generator, dino_repo: Path | None) -> None:
    from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base

    file, patch = DREAMSIM_BACKBONES[model_type]
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    vit = vit_base(patch_size=patch, num_classes=0)
    if model_type == "dino_vitb16":
        randomize(vit, gen, std=0.04)
        torch.save(vit.state_dict(), path)
        head = DINOHead(768, 2048)  # only loaded by dreamsim (its projection is unused for the CLS feature)
        randomize(head, gen)
        student = {f"module.head.{k}": v for k, v in head.state_dict().items()}
        student["module.head.last_layer.weight"] = head.last_layer.weight.detach().clone()
        torch.save({"student": student}, folder / "dino_vitb16_pretrain.pth")
        hub_repo = folder / "facebookresearch_dino_main"
        if dino_repo is not None:
            shutil.copytree(dino_repo, hub_repo, dirs_exist_ok=True)
        else:
            hub_repo.mkdir(exist_ok=True)
            (hub_repo / "hubconf.py").write_text(HUBCONF)
        return
    vit.pos_drop = torch.nn.LayerNorm(768)  # CLIP's ln_pre, as dreamsim's converted checkpoints have it
    randomize(vit, gen, std=0.04)
    state = dict(vit.state_dict())
    state["proj"] = 0.04 * torch.randn(768, 512, generator=gen)
    torch.save({"state_dict": state}, path)


def write_lora(variant: str, folder: Path, device: torch.device, gen: torch.Generator) -> Path:
    """A random LoRA on every qkv, saved by peft from dreamsim's own PerceptualModel."""
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    base = PerceptualModel(**dreamsim_args["model_config"][variant], device=str(device), load_dir=str(folder),
                           normalize_embeds=True)
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.3, bias="none",
                                                 target_modules=["qkv"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    out = folder / ("ensemble_lora" if variant == "ensemble" else f"{variant}_single_lora")
    peft_model.save_pretrained(str(out))
    if variant in ADAPTER_AS_BIN and (out / "adapter_model.safetensors").is_file():
        torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")
        (out / "adapter_model.safetensors").unlink()
    return out


def check_dreamsim(variant: str, work: Path, device: torch.device, gen: torch.Generator, report: Report,
                   dino_repo: Path | None) -> None:
    from dreamsim import dreamsim
    from dreamsim.config import dreamsim_args
    from peft import get_peft_model_state_dict

    from editkit.eval.metrics.dreamsim_net import load_dreamsim
    from editkit.eval.metrics.perceptual import DreamSimMetric
    from editkit.eval.metrics.weight_files import load_tensors

    folder = work / f"dreamsim_{variant}"  # one cache_dir per variant: editkit uses the first variant it finds
    folder.mkdir(parents=True, exist_ok=True)
    for model_type in dreamsim_args["model_config"][variant]["model_type"].split(","):
        write_backbone(model_type, folder, gen, dino_repo)
    lora_dir = write_lora(variant, folder, device, gen)

    ref, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder), dreamsim_type=variant)
    written = {k: v for k, v in get_peft_model_state_dict(ref).items() if "lora_B" in k}
    adapter = next(lora_dir.glob("adapter_model.*"))
    saved = load_tensors(adapter, "bench")
    key = sorted(written)[-1]
    report.same(f"dreamsim {variant}: reference LoRA", written[key], saved[key])
    ours = load_dreamsim(folder, device, "bench")
    assert ours.variant == variant, (ours.variant, variant)

    with torch.no_grad():
        x = torch.rand(4, 3, 224, 224, generator=gen).to(device)
        y = (x + 0.2 * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1)
        report.check(f"dreamsim {variant}: tensors 224x224", ours(x, y), ref(x, y))
        sizes = [(300, 200), (224, 224), (97, 150)]
        preds, targets = random_images(gen, sizes), random_images(gen, sizes)
        metric = DreamSimMetric()
        metric.load(folder, device)
        mine = torch.tensor([row["dreamsim"] for row in metric.compute(samples_of(preds, targets))])
        theirs = ref(torch.cat([preprocess(p) for p in preds]).to(device),
                     torch.cat([preprocess(t) for t in targets]).to(device))
        report.check(f"dreamsim {variant}: metric from PIL images", mine, theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--only", choices=("lpips", "dreamsim"))
    parser.add_argument("--nets", default=",".join(LPIPS_FILES), help="LPIPS backbones (default: %(default)s)")
    parser.add_argument("--variants", default="ensemble,dino_vitb16,clip_vitb32,open_clip_vitb32")
    parser.add_argument("--work", type=Path, help="folder for the weight files (default: a temporary one)")
    parser.add_argument("--dino-repo", type=Path, help="a checkout of facebookresearch/dino for torch.hub")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)

    from importlib.metadata import PackageNotFoundError, version

    import torchvision

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cuda = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, lpips {installed('lpips')}, "
          f"dreamsim {installed('dreamsim')}, peft {installed('peft')}, device {device}{cuda}")
    report = Report(args.tolerance)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.only != "dreamsim":
            for net in args.nets.split(","):
                check_lpips(net, work, device, gen, report)
        if args.only != "lpips":
            for variant in args.variants.split(","):
                check_dreamsim(variant, work, device, gen, report, args.dino_repo)
    print("FAILED: " + ", ".join(report.failed) if report.failed else f"all within {args.tolerance:g}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
