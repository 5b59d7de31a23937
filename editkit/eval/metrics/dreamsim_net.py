"""DreamSim (Fu et al. 2023) as the `dreamsim` package computes it, from the files of its cache_dir.

What the package does (dreamsim 0.2.0, `dreamsim(pretrained=True, cache_dir=DIR)`): images are resized
to 224x224 (bicubic) in [0, 1]; each branch normalises them with its own mean/std and embeds them:
- `dino_vitb16`: DINO ViT-B/16 (from torch hub: DIR/checkpoints/dino_vitbase16_pretrain.pth), the CLS
  token of the 12th block's output (before the final norm), 768 values; ImageNet mean/std;
- `clip_vitb16` / `clip_vitb32`: OpenAI CLIP's image tower converted to DINO's ViT layout
  (DIR/clip_vitb{16,32}_pretrain.pth.tar: {"state_dict": ViT keys + "proj"}), with `pos_drop` a
  LayerNorm (CLIP's ln_pre), QuickGELU, LayerNorm eps 1e-5; the embedding is the final-normed CLS @ proj
  (512 values); CLIP mean/std;
- `open_clip_vitb16` / `open_clip_vitb32`: the same for OpenCLIP (LAION-400M), with GELU.
The branches' embeddings are concatenated, centred (minus their mean) and scaled to unit length, and
the distance is 1 - cosine. The variant's LoRA adapter (peft, on every `qkv` of every branch; DIR/
{ensemble,dino_vitb16_single,...}_lora/) is merged into the weights: W + lora_alpha/r · B·A, which
is what peft computes for `bias="none"` adapters (dreamsim reads only r, lora_alpha, lora_dropout,
bias and target_modules from adapter_config.json).

Why a hand-written ViT rather than transformers' ViTModel / CLIPVisionModel: every DreamSim file is in
DINO's ViT layout (dreamsim converts CLIP and OpenCLIP into it), transformers' ViT module names
changed within 5.x (`attention.attention.query` became `attention.q_proj`), so a key conversion
would track transformers versions, and CLIP's patch convolution has no bias where DINO's layout
has one. The ViT below uses DINO's module names, so the files load as they are, and the reference's
arithmetic (attention as softmax(q·kᵀ·d^-½)·v). bench/perceptual_equality.py checks it against
the `dreamsim` package on the same weights.

The package's normalisation differs between 0.2.0 (divide by the norm, then centre) and the
repository's 0.2.1 (centre, then divide); the cosine of the two results is the same.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editkit.errors import UserError
from editkit.eval.metrics import weight_files

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HEAD_WIDTH = 64  # every ViT-S/B/L has 64-wide attention heads; the count is not in the state dict
DINO_LAYER = 11  # dreamsim's CLS feature: the output of block 11 (the last of ViT-B's 12)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x·sigmoid(1.702·x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float, act: type[nn.Module]):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), _Mlp(dim, hidden, act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class DinoLayoutViT(nn.Module):
    """A ViT with DINO's module names; `pos_drop` is CLIP's ln_pre (a LayerNorm) or nothing."""

    def __init__(self, dim: int, depth: int, patch: int, grid: int, hidden: int, eps: float,
                 act: type[nn.Module], ln_pre: bool):
        super().__init__()
        heads = max(1, dim // HEAD_WIDTH)
        self.patch, self.grid = patch, grid
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.pos_drop = nn.LayerNorm(dim, eps=eps) if ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden, eps, act) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    @property
    def image_size(self) -> int:
        return self.patch * self.grid

    def tokens(self, x: torch.Tensor, last_block: int) -> torch.Tensor:
        """The tokens after block `last_block` (0-based), before the final norm."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DreamSim branch expects {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        h = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = self.pos_drop(h)
        for block in self.blocks[:last_block + 1]:
            h = block(h)
        return h


@dataclass(frozen=True)
class Branch:
    """One backbone of a DreamSim variant: its file, layout and feature."""

    name: str  # dreamsim's model_type
    files: tuple[str, ...]  # candidates, relative to the cache_dir
    feature: str  # "cls" (DINO) or "embedding" (CLIP, OpenCLIP)
    mean_std: tuple
    act: type[nn.Module]
    eps: float


DINO_B16 = Branch("dino_vitb16", ("checkpoints/dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth"),
                  "cls", IMAGENET, nn.GELU, 1e-6)
CLIP_B16 = Branch("clip_vitb16", ("clip_vitb16_pretrain.pth.tar",), "embedding", OPENAI_CLIP, QuickGELU, 1e-5)
CLIP_B32 = Branch("clip_vitb32", ("clip_vitb32_pretrain.pth.tar",), "embedding", OPENAI_CLIP, QuickGELU, 1e-5)
OPEN_CLIP_B16 = Branch("open_clip_vitb16", ("open_clip_vitb16_pretrain.pth.tar",), "embedding", OPENAI_CLIP,
                       nn.GELU, 1e-5)
OPEN_CLIP_B32 = Branch("open_clip_vitb32", ("open_clip_vitb32_pretrain.pth.tar",), "embedding", OPENAI_CLIP,
                       nn.GELU, 1e-5)

# dreamsim_type -> (LoRA folder, branches); the first whose LoRA folder is in the cache_dir is used
VARIANTS: dict[str, tuple[str, tuple[Branch, ...]]] = {
    "ensemble": ("ensemble_lora", (DINO_B16, CLIP_B16, OPEN_CLIP_B16)),
    "dino_vitb16": ("dino_vitb16_single_lora", (DINO_B16,)),
    "clip_vitb32": ("clip_vitb32_single_lora", (CLIP_B32,)),
    "open_clip_vitb32": ("open_clip_vitb32_single_lora", (OPEN_CLIP_B32,)),
}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class BranchModel(nn.Module):
    """One branch: its normalisation, ViT and feature (DINO's block-12 CLS, or CLIP's projected embedding)."""

    def __init__(self, branch: Branch, vit: DinoLayoutViT, proj: torch.Tensor | None):
        super().__init__()
        self.name, self.feature, self.vit = branch.name, branch.feature, vit
        mean, std = branch.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("proj", proj.float() if proj is not None else torch.zeros(0))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = (x01 - self.mean) / self.std
        if self.feature == "cls":
            return self.vit.tokens(x, min(DINO_LAYER, len(self.vit.blocks) - 1))[:, 0]
        return self.vit.norm(self.vit.tokens(x, len(self.vit.blocks) - 1)[:, 0]) @ self.proj


class DreamSim(nn.Module):
    """`forward(a, b)` with (B, 3, S, S) images in [0, 1] (S = `image_size`) -> (B,) distances."""

    def __init__(self, variant: str, branches: list[BranchModel]):
        super().__init__()
        self.variant = variant
        self.branches = nn.ModuleList(branches)
        self.requires_grad_(False)
        self.eval()

    @property
    def image_size(self) -> int:
        return self.branches[0].vit.image_size

    def embed(self, x01: torch.Tensor) -> torch.Tensor:
        e = torch.cat([branch(x01) for branch in self.branches], dim=-1)
        e = e - e.mean(dim=-1, keepdim=True)
        return e / e.norm(dim=-1, keepdim=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(self.embed(a), self.embed(b), dim=-1)


# ----- loading -----------------------------------------------------------------------------------


def build_vit(branch: Branch, state: dict, label: str) -> DinoLayoutViT:
    """The ViT of `state` (DINO's layout), its sizes read from the tensors."""
    try:
        dim = state["pos_embed"].shape[-1]
        positions = state["pos_embed"].shape[1] - 1
        patch = state["patch_embed.proj.weight"].shape[-1]
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as err:
        raise UserError(f"{label}: not a ViT state dict in DINO's layout (no {err}); see docs/eval.md") from err
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise UserError(f"{label}: pos_embed has {positions} patch positions, not a square grid")
    vit = DinoLayoutViT(dim, depth, patch, grid, hidden, branch.eps, branch.act, ln_pre="pos_drop.weight" in state)
    try:
        vit.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{label}: does not fit DINO's ViT layout ({str(err).splitlines()[0]})") from err
    return vit


def read_adapter(folder: Path, label: str) -> tuple[float, dict]:
    """(lora_alpha / r, {(branch index, module path): (A, B)}) of a peft LoRA folder on the branches' `qkv`."""
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
        scaling = float(config["lora_alpha"]) / float(config["r"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
        raise UserError(f"{label}: {config_path} is missing or lacks r / lora_alpha ({err.__class__.__name__}); "
                        "it is the adapter_config.json dreamsim ships beside the adapter weights") from err
    if config.get("bias", "none") != "none":
        raise UserError(f"{label}: {config_path}: bias={config['bias']!r}; only bias='none' adapters (dreamsim's) "
                        "are supported")
    path = weight_files.require(folder, ADAPTER_FILES, label, "the LoRA weights dreamsim ships")
    pairs: dict = {}
    for key, value in weight_files.load_tensors(path, label).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?extractor_list\.(\d+)\.model\.(.+)\.lora_([AB])(?:\.\w+)?"
                             r"\.weight", key)
        if not match:
            raise UserError(f"{label}: {path}: unexpected key {key} (expected "
                            "extractor_list.N.model.<module>.lora_A/B.weight)")
        index, module, which = int(match.group(1)), match.group(2), match.group(3)
        pairs.setdefault((index, module), {})[which] = value
    if any(len(p) != 2 for p in pairs.values()):
        raise UserError(f"{label}: {path}: a LoRA module lacks its lora_A or lora_B weight")
    return scaling, {k: (p["A"], p["B"]) for k, p in pairs.items()}


def merge_lora(state: dict, lora: dict, index: int, scaling: float, label: str) -> dict:
    """`state` with branch `index`'s LoRA updates added to the weights they adapt (in float64, then cast)."""
    state = dict(state)
    for (i, module), (a, b) in lora.items():
        if i != index:
            continue
        key = f"{module}.weight"
        if key not in state or tuple(state[key].shape) != (b.shape[0], a.shape[1]):
            raise UserError(f"{label}: the LoRA adapter adapts {module}, which branch {index} lacks or has "
                            "another shape")
        weight = state[key]
        state[key] = (weight.double() + scaling * (b.double() @ a.double())).to(weight.dtype)
    return state


def locate(folder: Path, label: str) -> tuple[str, Path]:
    """The variant the folder holds (the first of VARIANTS whose LoRA folder is there) and that folder."""
    for variant, (lora_dir, _) in VARIANTS.items():
        if (folder / lora_dir).is_dir():
            return variant, folder / lora_dir
    names = ", ".join(f"{lora}/" for lora, _ in VARIANTS.values())
    raise UserError(f"{label}: {folder} has no DreamSim LoRA folder ({names}): pass the cache_dir that "
                    "dreamsim(pretrained=True, cache_dir=DIR) filled; see docs/eval.md")


def load_dreamsim(folder: Path, device, label: str) -> DreamSim:
    """The frozen DreamSim model of dreamsim's cache_dir `folder`; `label` starts each error."""
    folder = Path(folder)
    variant, lora_dir = locate(folder, label)
    branches = VARIANTS[variant][1]
    paths = [weight_files.require(folder, b.files, label, f"the {b.name} backbone of DreamSim's {variant}")
             for b in branches]
    scaling, lora = read_adapter(lora_dir, label)
    if lora and max(i for i, _ in lora) >= len(branches):
        raise UserError(f"{label}: {lora_dir} adapts {1 + max(i for i, _ in lora)} branches, {variant} has "
                        f"{len(branches)}")
    models = []
    for index, (branch, path) in enumerate(zip(branches, paths)):
        data = weight_files.load_tensors(path, label)
        state = dict(data["state_dict"] if isinstance(data.get("state_dict"), dict) else data)
        proj = state.pop("proj", None)
        if (branch.feature == "embedding") != (proj is not None):
            raise UserError(f"{label}: {path} {'lacks' if proj is None else 'has'} a `proj` tensor: not a "
                            f"{branch.name} file")
        vit = build_vit(branch, merge_lora(state, lora, index, scaling, f"{label} ({lora_dir})"), f"{label} ({path})")
        models.append(BranchModel(branch, vit, proj))
    if len({m.vit.image_size for m in models}) != 1:
        raise UserError(f"{label}: {folder}: the {variant} backbones take different image sizes")
    return DreamSim(variant, models).to(device)
