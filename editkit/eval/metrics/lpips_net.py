"""LPIPS v0.1 (Zhang et al. 2018) as the `lpips` package computes it, on torch.nn alone.

Why hand-written trunks: both LPIPS implementations (the `lpips` package, torchmetrics') take their
AlexNet / VGG16 / SqueezeNet 1.1 from torchvision, and PyPI's torchvision wheel is built against CUDA
torch and fails to import beside editkit's CPU torch. The trunks below are only the convolution stacks that LPIPS
taps (torchvision's `features`), laid out with torchvision's module indices so that its state dicts
(`features.0.weight`, ...; the `classifier.*` keys are ignored) load as they are. Their widths are
read from the state dict, so a width-reduced file (the tests') builds a matching smaller network.

The distance (inputs in [-1, 1], as the package's `LPIPS.forward` without `normalize`): each image
is shifted and scaled by the package's ScalingLayer constants, the trunk's tapped ReLU outputs (five
for AlexNet and VGG16; seven for SqueezeNet: the first ReLU and the outputs of Fire modules 4, 7, 9, 10,
11, 12) are unit-normalised along channels (eps 1e-10), the squared differences are weighted per
channel by a 1x1 convolution without bias (the "linear heads", the package's
`weights/v0.1/{alex,vgg,squeeze}.pth`: `lin{k}.model.1.weight`, shape (1, C_k, 1, 1)), averaged over
space and summed over the layers.
bench/perceptual_equality.py compares it with the `lpips` package on the same weights.

It stays differentiable in its inputs (the RGBA-VAE stage's perceptual loss); its weights are frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editkit.errors import UserError
from editkit.eval.metrics import weight_files

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
RELU, CONV, POOL, CEIL_POOL, FIRE = "relu", "conv", "pool", "ceil_pool", "fire"
NETS = ("alex", "vgg", "squeeze")


def _vgg16_layers() -> tuple:
    layers: list = []
    for block, convs in enumerate((2, 2, 3, 3, 3)):
        if block:
            layers.append((POOL, 2, 2))
        layers += [(CONV, 1, 1), (RELU,)] * convs
    return tuple(layers)


class Fire(nn.Module):
    """torchvision's SqueezeNet Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands side by side (each ReLU)."""

    def __init__(self, channels: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


@dataclass(frozen=True)
class Trunk:
    """One LPIPS backbone: torchvision's `features` up to the last tapped layer, and its files."""

    name: str  # the lpips package's `net=` name
    title: str
    # per torchvision index: (CONV, stride, padding), (RELU,), (POOL or CEIL_POOL, kernel, stride), (FIRE,);
    # the widths come from the state dict
    layers: tuple
    taps: tuple[int, ...]  # indices whose outputs LPIPS compares
    backbone_files: tuple[str, ...]
    heads_files: tuple[str, ...]


ALEX = Trunk("alex", "AlexNet", ((CONV, 4, 2), (RELU,), (POOL, 3, 2), (CONV, 1, 2), (RELU,), (POOL, 3, 2),
                                 (CONV, 1, 1), (RELU,), (CONV, 1, 1), (RELU,), (CONV, 1, 1), (RELU,)),
             (1, 4, 7, 9, 11),
             ("alexnet-owt-7be5be79.pth", "checkpoints/alexnet-owt-7be5be79.pth", "alexnet.safetensors"),
             ("alex.pth", "alex.safetensors"))
VGG = Trunk("vgg", "VGG16", _vgg16_layers(), (3, 8, 15, 22, 29),
            ("vgg16-397923af.pth", "checkpoints/vgg16-397923af.pth", "vgg16.safetensors"),
            ("vgg.pth", "vgg.safetensors"))
SQUEEZE = Trunk("squeeze", "SqueezeNet 1.1", ((CONV, 2, 0), (RELU,), (CEIL_POOL, 3, 2), (FIRE,), (FIRE,),
                                               (CEIL_POOL, 3, 2), (FIRE,), (FIRE,), (CEIL_POOL, 3, 2),
                                               (FIRE,), (FIRE,), (FIRE,), (FIRE,)),
                (1, 4, 7, 9, 10, 11, 12),
                ("squeezenet1_1-b8a52dc0.pth", "checkpoints/squeezenet1_1-b8a52dc0.pth", "squeezenet1_1.safetensors"),
                ("squeeze.pth", "squeeze.safetensors"))
# Without a chosen net, the first whose backbone file is in the folder is used (AlexNet: lpips' default).
TRUNKS = (ALEX, VGG, SQUEEZE)


def trunk_named(net: str, label: str = "LPIPS net") -> Trunk:
    """The trunk of an lpips `net=` name (alex, vgg, squeeze); `label` starts the error (the flag or field)."""
    for trunk in TRUNKS:
        if trunk.name == net:
            return trunk
    raise UserError(f"{label} {net}: unknown LPIPS backbone; choose one of {', '.join(NETS)}")


def _fire(state: dict, index: int, channels: int, trunk: Trunk, label: str) -> Fire:
    """A Fire module sized from `features.{index}.{squeeze,expand1x1,expand3x3}.weight`."""
    def weight(part: str, inputs: int, kernel: int) -> torch.Tensor:
        w = state.get(f"features.{index}.{part}.weight")
        if w is None or w.ndim != 4 or w.shape[1] != inputs or w.shape[-1] != kernel:
            raise UserError(f"{label}: no features.{index}.{part}.weight ({kernel}x{kernel}, {inputs} input "
                            f"channels): not torchvision's {trunk.title} state dict")
        return w

    squeeze = weight("squeeze", channels, 1).shape[0]
    return Fire(channels, squeeze, weight("expand1x1", squeeze, 1).shape[0], weight("expand3x3", squeeze, 3).shape[0])


def build_features(trunk: Trunk, state: dict, label: str) -> nn.Sequential:
    """torchvision's `features` Sequential for `trunk`, sized from and loaded with `state`."""
    modules, channels = [], 3
    for index, spec in enumerate(trunk.layers):
        if spec[0] == CONV:
            weight = state.get(f"features.{index}.weight")
            if weight is None or weight.ndim != 4 or weight.shape[1] != channels:
                raise UserError(f"{label}: no features.{index}.weight with {channels} input channels: not "
                                f"torchvision's {trunk.title} state dict")
            modules.append(nn.Conv2d(channels, weight.shape[0], weight.shape[-1], stride=spec[1], padding=spec[2]))
            channels = weight.shape[0]
        elif spec[0] == FIRE:
            modules.append(_fire(state, index, channels, trunk, label))
            channels = modules[-1].out_channels
        elif spec[0] == RELU:
            modules.append(nn.ReLU())
        else:
            modules.append(nn.MaxPool2d(spec[1], spec[2], ceil_mode=spec[0] == CEIL_POOL))
    features = nn.Sequential(*modules)
    wanted = {k[len("features."):]: v for k, v in state.items()
              if k.startswith("features.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) < len(modules)}
    try:
        features.load_state_dict(wanted)
    except RuntimeError as err:
        raise UserError(f"{label}: does not fit torchvision's {trunk.title} layout "
                        f"({str(err).splitlines()[0]})") from err
    return features


def tap_channels(features: nn.Sequential, trunk: Trunk) -> list[int]:
    """The channel count at each tap: the output width of the last convolution or Fire module up to it."""
    return [next(m.out_channels for m in reversed(features[:i + 1]) if hasattr(m, "out_channels"))
            for i in trunk.taps]


def read_heads(state: dict, channels: list[int], label: str) -> list[torch.Tensor]:
    """The linear heads `lin{k}.model.{1|0}.weight` (1, C_k, 1, 1): with or without the dropout module before."""
    found = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d+)\.model\.[01]\.weight", key)
        if match:
            found[int(match.group(1))] = value
    heads = []
    for k, c in enumerate(channels):
        head = found.get(k)
        if head is None or tuple(head.shape) != (1, c, 1, 1):
            got = "missing" if head is None else f"shape {tuple(head.shape)}"
            raise UserError(f"{label}: linear head lin{k} is {got}, the backbone needs (1, {c}, 1, 1): "
                            "the heads file belongs to another backbone")
        heads.append(head.float())
    return heads


class Lpips(nn.Module):
    """LPIPS v0.1: `forward(x, y)` with (B, 3, H, W) images in [-1, 1] -> (B,) distances."""

    def __init__(self, trunk: Trunk, features: nn.Sequential, heads: list[torch.Tensor]):
        super().__init__()
        self.trunk_name, self.taps = trunk.name, trunk.taps
        self.features = features
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        for k, head in enumerate(heads):
            self.register_buffer(f"head{k}", head)
        self.requires_grad_(False)
        self.eval()

    def tapped(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for index, module in enumerate(self.features):
            h = module(h)
            if index in self.taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for k, (a, b) in enumerate(zip(self.tapped(x), self.tapped(y))):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            total = total + F.conv2d((a - b) ** 2, getattr(self, f"head{k}")).mean(dim=(2, 3), keepdim=True)
        return total.reshape(-1)


def _heads_file(folder: Path, trunk: Trunk, backbone: Path, label: str) -> Path:
    return weight_files.require(folder, trunk.heads_files, label,
                                f"the LPIPS v0.1 linear heads for {backbone.name} (the lpips "
                                f"package's lpips/weights/v0.1/{trunk.heads_files[0]})")


def locate(folder: Path, label: str, net: str | None = None) -> tuple[Trunk, Path, Path]:
    """The backbone `net` (None: the first the folder holds, AlexNet, VGG16, SqueezeNet), its file and its
    heads file."""
    if net is not None:
        trunk = trunk_named(net)
        backbone = weight_files.require(folder, trunk.backbone_files, label,
                                        f"torchvision's {trunk.title} checkpoint (LPIPS net '{net}')")
        return trunk, backbone, _heads_file(folder, trunk, backbone, label)
    for trunk in TRUNKS:
        backbone = weight_files.find(folder, trunk.backbone_files)
        if backbone is not None:
            return trunk, backbone, _heads_file(folder, trunk, backbone, label)
    raise UserError(f"{label}: {folder} has no LPIPS backbone: put {ALEX.backbone_files[0]} (torchvision's "
                    f"AlexNet) and {ALEX.heads_files[0]} (the lpips package's v0.1 heads) there, or "
                    f"{VGG.backbone_files[0]} and {VGG.heads_files[0]}, or {SQUEEZE.backbone_files[0]} and "
                    f"{SQUEEZE.heads_files[0]}; see docs/eval.md")


def load_lpips(folder: Path, device, label: str, net: str | None = None) -> Lpips:
    """The frozen LPIPS network of the files in `folder` (backbone `net`, or the first found: see `locate`);
    `label` starts each error (the flag or field)."""
    folder = Path(folder)
    trunk, backbone, heads = locate(folder, label, net)
    features = build_features(trunk, weight_files.load_tensors(backbone, label), f"{label} ({backbone})")
    head_weights = read_heads(weight_files.load_tensors(heads, label), tap_channels(features, trunk),
                              f"{label} ({heads})")
    return Lpips(trunk, features, head_weights).to(device)
