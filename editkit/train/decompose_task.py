"""The `decompose` stage: train a Qwen-Image-Layered transformer to split an image into RGBA layers.

Data: the train split of the `editkit layers prep` folder `data.train[0].manifest`, keeping the
samples with `decompose.min_layers`..`max_layers` layers. Each sample is seen at the size the
decomposition runs at (`model.layer_size(composite, decompose.resolution)`: the composite's aspect
at about resolution² pixels), its composite and layers resized to it by the model's own
preprocessing, as `decompose` resizes its input.

Target, as `QwenImageLayeredPipeline` packs it (editkit.models.qwen_image_layered): N + 1 frames
of RGBA latents, frame 0 the composite, frames 1..N the layers bottom first, each packed 2x2 and
concatenated (`pack_layers`); the condition is the composite's packed latents after them (RoPE
frames from `layer_shapes`), the prompt the sample's description (`decompose.prompt`). Rectified
flow: x_σ = (1 − σ)·x0 + σ·ε, the transformer predicts ε − x0 over every frame. σ: with
`objective.timesteps.sampling: shifted` (the default) uniform values through the exponential shift
the layered sampler uses (mu = sqrt(condition tokens / 256)), otherwise as the edit stage draws
them. `objective.text_dropout` swaps a sample's prompt for the negative prompt " " (what true CFG
contrasts with at inference).

Batches hold samples of one layer count and one layer size (`group_key`), drawn by
editkit.layers.dataset.BucketBatchSampler (seeded, resumable, sharded by rank). The cache
(`decompose.cache`): every sample's prompt embedding and frame latents are encoded once before
the first step, in memory, or with a cache folder as one safetensors file per sample under
CACHE/<key>/, the key a digest of what the tensors are made from (model files, dtype, the prep
folder, resolution, prompt), so a changed input never reuses stale tensors and a re-run (or a
resumed run) reads what is there.

Validation: the loss on the first loop.val_samples samples of the val split with fixed noise.
Previews: those samples decomposed (loop.preview_steps, loop.preview_cfg), one row per sample:
the input | the predicted layers over a checkerboard | their recomposite, and under it the ground
truth's layers. Exports: the LoRA files (as the edit stage writes them) or the full transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.train.config import TrainConfig
from editkit.train.edit_task import EditTask, load_edit_model
from editkit.train.objectives import LossOutput, noisy_latents, weighted_mse
from editkit.train.samples import pad_embeds
from editkit.train.timesteps import exponential_shift, loss_weights, sample_sigmas
from editkit.train.trainable import setup_trainable

NEGATIVE_PROMPT = " "
"""What text dropout trains on: the negative prompt of true CFG at inference (the model card's)."""
ENCODE_BATCH = 8
"""Samples encoded together while the cache is built."""


@dataclass(frozen=True)
class LayeredItem:
    """One prepared sample as the stage trains on it."""

    id: str
    layers: list[Path]  # bottom first
    composite: Path
    size: tuple[int, int]  # (width, height) of the decomposition
    prompt: str

    @property
    def key(self) -> str:
        return group_key(len(self.layers), self.size)


def group_key(layers: int, size: tuple[int, int]) -> str:
    """Batches hold samples of one key: one layer count and one layer size."""
    return f"{layers}L-{size[0]}x{size[1]}"


def sample_prompt(descriptions: list[str], mode: str, text: str) -> str:
    """A sample's prompt: its layers' descriptions joined (mode "descriptions"; `text` when it has
    none) or `text` (mode "fixed")."""
    if mode == "descriptions":
        joined = "; ".join(d.strip() for d in descriptions if d.strip())
        if joined:
            return joined
    return text


def open_rgba(path: Path, root: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGBA")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__}); run `editkit layers validate "
                        f"{root}`") from None


def read_items(model, root: Path, split: str, cfg: TrainConfig) -> list[LayeredItem]:
    """The samples of one split that the stage trains (or validates) on."""
    from editkit.layers.records import read_prepared

    stage = cfg.decompose
    items = []
    for entry in read_prepared(root):
        if entry.split != split or not stage.min_layers <= len(entry.layers) <= stage.max_layers:
            continue
        with Image.open(root / entry.composite) as img:  # the header only: the size
            size = model.layer_size(img, stage.resolution)
        items.append(LayeredItem(entry.id, [root / p for p in entry.layers], root / entry.composite, size,
                                 sample_prompt(entry.descriptions, stage.prompt, stage.prompt_text)))
    return items


def encode_items(model, items: list[LayeredItem], root: Path) -> list[dict[str, torch.Tensor]]:
    """Per item {"embeds": (L, D) prompt embedding without padding, "latents": (N + 1, C, h, w)}: frame 0
    the composite (also the condition), then the layers bottom first. Items of one layer size share
    one VAE pass (encoding is per image: batching changes only rounding)."""
    out = []
    with torch.no_grad():
        embeds, mask = model.encode_descriptions([it.prompt for it in items])
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(items):
            by_size.setdefault(it.size, []).append(i)
        latents: dict[int, torch.Tensor] = {}
        for (width, height), members in by_size.items():
            images = [img for i in members for img in
                      (open_rgba(items[i].composite, root), *(open_rgba(p, root) for p in items[i].layers))]
            encoded = model.encode_latents(model.preprocess(images, width, height)).cpu()
            for i, part in zip(members, encoded.split([len(items[i].layers) + 1 for i in members])):
                latents[i] = part
        for i in range(len(items)):
            out.append({"embeds": embeds[i][mask[i].bool()].cpu(), "latents": latents[i].clone()})
    return out


class SampleCache:
    """Every item's tensors, encoded once: in memory, or as CACHE/<key>/<id>.safetensors files."""

    def __init__(self, model, items: list[LayeredItem], root: Path, folder: Path | None, identity: dict,
                 rank: int = 0, world: int = 1, progress: bool = True):
        from editkit.utils.fingerprint import digest

        self.folder = None if folder is None else Path(folder) / digest(identity)[:16]
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        if self.folder is not None:
            from editkit.utils.atomic import write_json

            write_json(self.folder / "key.json", identity)
        # on disk, every rank encodes its share first and then what the others have not written yet
        order = items if self.folder is None else [it for _, it in sorted(enumerate(items),
                                                                          key=lambda p: p[0] % world != rank)]
        todo = [it for it in order if not self._stored(it.id)]
        from editkit.utils.progress import make_progress

        with make_progress("sample", disable=not (progress and todo)) as bar:
            task = bar.add_task("decompose cache", total=len(todo), status="")
            for start in range(0, len(todo), ENCODE_BATCH):
                part = todo[start:start + ENCODE_BATCH]
                chunk = [it for it in part if not self._stored(it.id)]  # another rank may have written some
                if chunk:
                    for item, tensors in zip(chunk, encode_items(model, chunk, root)):
                        self._store(item.id, tensors)
                bar.advance(task, len(part))

    def _path(self, sample_id: str) -> Path:
        return self.folder / f"{sample_id.replace('/', '__')}.safetensors"

    def _stored(self, sample_id: str) -> bool:
        return sample_id in self.kept if self.folder is None else self._path(sample_id).is_file()

    def _store(self, sample_id: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            self.kept[sample_id] = tensors
            return
        from safetensors.torch import save_file

        from editkit.utils.atomic import atomic_path

        with atomic_path(self._path(sample_id)) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    def get(self, sample_id: str) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return self.kept[sample_id]
        from safetensors.torch import load_file

        path = self._path(sample_id)
        try:
            return load_file(str(path))
        except Exception as err:  # a damaged file: safetensors raises several types
            raise UserError(f"{path}: a damaged cache file ({err.__class__.__name__}); delete it and train again "
                            "(it is encoded anew)") from None


@dataclass
class LayeredBatch:
    """Samples of one layer count and size: latents (B, N + 1, C, h, w) and each prompt's (L_i, D)
    embedding (padded to one length in the loss, after text dropout)."""

    latents: torch.Tensor
    embeds: list[torch.Tensor]
    width: int
    height: int

    @property
    def layers(self) -> int:
        return self.latents.shape[1] - 1


def load_init_lora(transformer, path: str) -> None:
    """Start the LoRA from a file (an earlier curriculum phase's `final/pytorch_lora_weights.safetensors`,
    any layout): same target modules, rank and scale as train.lora, or a UserError."""
    from editkit.models.lora import load_lora, parse

    modules = parse(load_lora(path)[0], source=path)
    adapted = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(modules) != adapted:
        extra = sorted(set(modules) ^ adapted)[0]
        raise UserError(f"decompose.init_lora: {path} adapts other modules than train.lora.targets (e.g. {extra}); "
                        "give the targets that phase was trained with")
    with torch.no_grad():
        for name, mod in modules.items():
            layer = transformer.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.shape != mod.A.shape or b.shape != mod.B.shape:
                raise UserError(f"decompose.init_lora: {path} has rank {mod.rank} at {name}, train.lora.rank is "
                                f"{a.shape[0]}; give the rank that phase was trained with")
            if not math.isclose(mod.scale, layer.scaling["default"], rel_tol=1e-6):
                raise UserError(f"decompose.init_lora: {path} has LoRA scale {mod.scale:g} at {name} "
                                f"(alpha / rank), train.lora gives {layer.scaling['default']:g}; give that phase's "
                                "train.lora.alpha")
            a.copy_(mod.A)
            b.copy_(mod.B)


class DecomposeTask:
    """Model, data and loss of the decompose stage (an editkit.train.task.Task)."""

    # The LoRA / transformer exports are the edit stage's (same files, same layouts).
    export = EditTask.export
    export_gathered = EditTask.export_gathered
    lora_state_dict = EditTask.lora_state_dict
    _export_lora = EditTask._export_lora
    _export_bundle = EditTask._export_bundle

    @staticmethod
    def data_identity(cfg: TrainConfig) -> dict:
        """The prep folder by file stamps; the start LoRA by content."""
        from editkit.utils.fingerprint import file_digest, folder_stamp

        init = cfg.decompose.init_lora
        return {"data.train": [folder_stamp(d.manifest) for d in cfg.data.train],
                "decompose.init_lora": file_digest(init) if init else None}

    def __init__(self, cfg: TrainConfig, device, rank: int = 0, world: int = 1):
        from editkit.layers.dataset import BucketBatchSampler
        from editkit.layers.records import read_prepared

        self.cfg, self.stage = cfg, cfg.decompose
        self.root = Path(cfg.data.train[0].manifest)
        self.model = load_edit_model(cfg, device)
        if not callable(getattr(self.model, "decompose", None)):
            raise UserError(f"model {cfg.model}: a {self.model.family.name} model, which does not decompose images "
                            "into layers; the decompose stage trains a Qwen-Image-Layered model (e.g. "
                            "tiny:qwen-image-layered)")
        self.info = setup_trainable(self.model.transformer, cfg.train, self.model.family)
        if self.stage.init_lora:
            load_init_lora(self.model.transformer, self.stage.init_lora)
        self.items = read_items(self.model, self.root, "train", cfg)
        if not self.items:
            counts = sorted({len(e.layers) for e in read_prepared(self.root) if e.split == "train"})
            raise UserError(f"{self.root}: no train sample has {self.stage.min_layers} to {self.stage.max_layers} "
                            f"layers (its counts: {', '.join(map(str, counts)) or 'no train samples'}); change "
                            "decompose.min_layers / max_layers or prepare more samples")
        self.val = read_items(self.model, self.root, "val", cfg)[: cfg.loop.val_samples]
        if (cfg.loop.validate_every or cfg.loop.preview_every) and not self.val:
            raise UserError(f"loop.validate_every / preview_every: {self.root} has no val sample with "
                            f"{self.stage.min_layers} to {self.stage.max_layers} layers; prepare a val split with "
                            "`editkit layers prep --val-count N`, or set both to 0")
        self.sampler = BucketBatchSampler([it.key for it in self.items], cfg.data.batch_size, shuffle=True,
                                          seed=cfg.seed, rank=rank, world_size=world)
        identity = self.cache_identity()
        self.cache = SampleCache(self.model, self.items + self.val, self.root,
                                 Path(self.stage.cache) if self.stage.cache else None, identity, rank, world)
        with torch.no_grad():
            negative, mask = self.model.encode_descriptions([NEGATIVE_PROMPT])
        self.negative = negative[0][mask[0].bool()].cpu()
        self.info.update(samples=len(self.items), val_samples=len(self.val),
                         groups={key: len(members) for key, members in sorted(self.sampler.groups.items())})
        if not cfg.loop.preview_every:
            self.model = self.model.without_encoders()  # the cache replaces them; free the memory
        dtype = torch.float32 if cfg.train.trainable_dtype == "fp32" else torch.bfloat16
        for p in self.model.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
        self.module = self.model.transformer

    def cache_identity(self) -> dict:
        """What the cached tensors are made from (the transformer and training settings are not)."""
        from editkit.utils.fingerprint import folder_stamp

        s, cfg = self.stage, self.cfg
        return {"model": cfg.model, "model_files": folder_stamp(cfg.model), "family": self.model.family.name,
                "dtype": str(self.model.dtype), "data": str(self.root), "data_files": folder_stamp(self.root),
                "resolution": s.resolution, "prompt": s.prompt, "prompt_text": s.prompt_text, "version": 1}

    def set_module(self, module) -> None:
        self.module = module
        self.model = self.model.with_transformer(module)

    # ----- data ------------------------------------------------------------------------------

    def make_batch(self, items: list[LayeredItem]) -> LayeredBatch:
        tensors = [self.cache.get(it.id) for it in items]
        width, height = items[0].size
        return LayeredBatch(torch.stack([t["latents"] for t in tensors]), [t["embeds"] for t in tensors],
                            width, height)

    def next_batch(self, generator: torch.Generator) -> LayeredBatch:
        return self.make_batch([self.items[i] for i in self.sampler.next_batch()])

    # ----- loss ------------------------------------------------------------------------------

    def sigmas(self, n: int, generator: torch.Generator, condition_tokens: int) -> torch.Tensor:
        """σ per sample: the layered sampler's shift for `shifted`, else the edit stage's draw."""
        steps = self.cfg.objective.timesteps
        if steps.sampling == "shifted":
            u = 1.0 - torch.rand(n, generator=generator)
            return exponential_shift(u, math.sqrt(condition_tokens / 256))
        return sample_sigmas(steps, n, generator)

    def loss(self, batch: LayeredBatch, generator: torch.Generator, dropout: bool = True) -> LossOutput:
        model, obj = self.model, self.cfg.objective
        x0 = batch.latents.to(model.device).float()
        b = x0.shape[0]
        drop = torch.rand(b, generator=generator).tolist()
        chosen = [self.negative if dropout and d < obj.text_dropout else e for d, e in zip(drop, batch.embeds)]
        embeds, mask = pad_embeds(chosen)
        embeds, mask = embeds.to(model.device).float(), mask.to(model.device)
        cond = model.pack(x0[:, 0])
        sigmas = self.sigmas(b, generator, cond.shape[1])
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        x_t = noisy_latents(x0, noise, sigmas)
        shapes = [model.layer_shapes(batch.width, batch.height, batch.layers)] * b
        pred = model.predict(model.pack_layers(x_t), sigmas.to(x0.device), embeds, mask, shapes, cond)
        loss = weighted_mse(pred.float(), model.pack_layers(noise - x0),
                            sample_weights=loss_weights(obj.timesteps.weighting, sigmas))
        return LossOutput(loss, {"fm": loss.item()})

    def _val_groups(self) -> list[list[LayeredItem]]:
        groups: dict[str, list[LayeredItem]] = {}
        for it in self.val:
            groups.setdefault(it.key, []).append(it)
        size = self.cfg.data.batch_size
        return [g[k:k + size] for g in groups.values() for k in range(0, len(g), size)]

    @torch.no_grad()
    def validation_loss(self, seed: int) -> float | None:
        """Mean loss over the val samples with fixed noise and no text dropout."""
        if not self.val:
            return None
        g = torch.Generator().manual_seed(seed)
        total = 0.0
        for items in self._val_groups():
            total += self.loss(self.make_batch(items), g, dropout=False).loss.item() * len(items)
        return total / len(self.val)

    # ----- previews --------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self, path: Path, steps: int, cfg_scale: float) -> Path | None:
        """The val samples decomposed: a strip per sample (see the module docstring)."""
        from editkit.utils.atomic import atomic_path

        if not self.val:
            return None
        images = [open_rgba(it.composite, self.root) for it in self.val]
        layers = self.model.decompose(images, layers=[len(it.layers) for it in self.val], steps=steps,
                                      cfg=cfg_scale, seeds=0, prompts=[it.prompt for it in self.val],
                                      negative_prompt=NEGATIVE_PROMPT if cfg_scale > 1 else None,
                                      resolution=self.stage.resolution)
        truth = [[open_rgba(p, self.root) for p in it.layers] for it in self.val]
        grid = layer_strips(images, layers, truth)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        return path


def checkerboard(image: Image.Image, cell: int = 4) -> Image.Image:
    """An RGBA image over a grey checkerboard (RGB), so transparency shows."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    yy, xx = np.mgrid[: rgba.shape[0], : rgba.shape[1]]
    board = np.where((yy // cell + xx // cell) % 2, 0.85, 0.65)[..., None]
    shown = rgba[..., :3] * rgba[..., 3:] + board * (1 - rgba[..., 3:])
    return Image.fromarray(np.rint(shown * 255).astype(np.uint8), "RGB")


def layer_strips(inputs: list[Image.Image], predicted: list[list[Image.Image]],
                 truth: list[list[Image.Image]]) -> Image.Image:
    """Two rows per sample: input | predicted layers | their recomposite, then (under the layers)
    the ground-truth layers; tiles at the first sample's layer size, 2 px apart."""
    from editkit.layers.decompose import recomposite

    width, height = predicted[0][0].size
    cols = 2 + max(max(len(p) for p in predicted), max(len(t) for t in truth))
    step_x, step_y = width + 2, height + 2
    grid = Image.new("RGB", (cols * step_x, 2 * len(inputs) * step_y), "white")
    size = (width, height)

    def tile(image: Image.Image) -> Image.Image:
        return checkerboard(image if image.size == size else image.resize(size))

    for i, (image, pred, gt) in enumerate(zip(inputs, predicted, truth)):
        top, bottom = 2 * i * step_y, (2 * i + 1) * step_y
        grid.paste(tile(image), (0, top))
        for k, layer in enumerate(pred):
            grid.paste(tile(layer), ((k + 1) * step_x, top))
        grid.paste(tile(recomposite(pred)), ((cols - 1) * step_x, top))
        for k, layer in enumerate(gt):
            grid.paste(tile(layer), ((k + 1) * step_x, bottom))
    return grid
