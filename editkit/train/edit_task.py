"""The `edit` stage: train the transformer of an EditModel (LoRA or full) with flow matching or LBM.

Samples come from caches (`editkit cache`) or are encoded online from manifests; both go through
`editkit.train.samples.encode_record`, so they are the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.train.config import DataConfig, TrainConfig
from editkit.train.objectives import LossOutput, flow_matching_loss, lbm_loss
from editkit.train.samples import (
    TrainBatch,
    can_reverse,
    collate,
    encode_record,
    reverse_sample,
    sample_key,
    white_latents,
)
from editkit.train.trainable import setup_trainable

LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "lora_comfyui.safetensors",
              "diffsynth": "lora_diffsynth.safetensors"}


def read_records(manifest: str, fields: dict[str, str] | None = None) -> list[EditRecord]:
    """A training manifest's records; errors that suggest `--field` also say how a config sets it."""
    from editkit.data import read_manifest

    try:
        return read_manifest(manifest, fields=fields or None)
    except UserError as err:
        if "--field" not in str(err):
            raise
        raise UserError(f"{err}; in a training config: data.fields: {{NAME: COLUMN}}, "
                        "e.g. data.fields: {prompt: caption}") from None


def open_cache(folder: str, data: DataConfig):
    """A cache's reader, refused when the cache was built with another --area / --multiple than
    data.area / data.multiple (its buckets would not be the ones the config names)."""
    from editkit.train.cache import CacheReader

    reader = CacheReader(folder)
    built = reader.manifest.get("config", {})
    for option, key in (("--area", "area"), ("--multiple", "multiple")):
        if key in built and built[key] != getattr(data, key):
            wanted = getattr(data, key)
            raise UserError(f"{folder}: cache built with {option} {built[key]} but data.{key} is {wanted}; "
                            f"set data.{key}: {built[key]}, or rebuild the cache with {option} {wanted}")
    return reader


class _CachedSource:
    def __init__(self, folder: str, data: DataConfig):
        self.name = Path(folder).name
        self.reader = open_cache(folder, data)
        self.ids = self.reader.ids
        if not self.ids:
            raise UserError(f"{folder}: the cache holds no records; run `editkit cache` first")
        self.keys = [self.reader.key(i) for i in self.ids]
        # stand-in records for the mixing sampler: the id and the number of source images
        self.records = [EditRecord(id=i, instruction="", sources=[Path()] * len(k[1]))
                        for i, k in zip(self.ids, self.keys)]

    def get(self, i: int) -> dict[str, torch.Tensor]:
        return self.reader.get(self.ids[i])

    def white(self, bucket, model) -> torch.Tensor:
        w = self.reader.white_latents(bucket)
        return w if w is not None else white_latents(model, bucket)


class _OnlineSource:
    def __init__(self, manifest: str, model, buckets, name: str | None = None, keep: bool = False,
                 fields: dict[str, str] | None = None):
        """keep=True holds encoded samples in memory (the few fixed validation records)."""
        self.name = name or Path(manifest).stem
        self._kept: dict[int, dict[str, torch.Tensor]] | None = {} if keep else None
        self.records = [r for r in read_records(manifest, fields) if r.target is not None]
        if not self.records:
            raise UserError(f"{manifest}: no records with a target image; training needs source/target pairs")
        self.model = model
        self.keys = [sample_key(model, r, buckets) for r in self.records]
        self._white: dict = {}

    def get(self, i: int) -> dict[str, torch.Tensor]:
        if self._kept is None:
            return encode_record(self.model, self.records[i], self.keys[i][0])
        if i not in self._kept:
            self._kept[i] = encode_record(self.model, self.records[i], self.keys[i][0])
        return self._kept[i]

    def white(self, bucket, model) -> torch.Tensor:
        if bucket not in self._white:
            self._white[bucket] = white_latents(model, bucket)
        return self._white[bucket]


class _Mixture:
    """editkit.data.mixing.MixingSampler over the sources; yields (source, local indices) batches."""

    def __init__(self, sampler, by_name: dict):
        self.sampler, self.by_name = sampler, by_name
        self.local = {name: {r.id: i for i, r in enumerate(src.records)} for name, src in by_name.items()}

    def next_items(self):
        indices = self.sampler.next_batch()
        name = self.sampler.dataset_of(indices[0])
        return self.by_name[name], [self.local[name][self.sampler.records[i].id] for i in indices]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def mixing_sampler(sources: list, weights: list[float], batch_size: int, seed: int, rank: int, world: int):
    """The data area's multi-dataset sampler, grouping records by shape key (bucket, source sizes)."""
    from editkit.data.mixing import MixingSampler

    by_name = {}
    for i, src in enumerate(sources):
        name = src.name if src.name not in by_name else f"{src.name}-{i}"
        by_name[name] = src
    keys = {(name, r.id): k for name, src in by_name.items() for r, k in zip(src.records, src.keys)}
    records = {name: src.records for name, src in by_name.items()}
    owner = {id(r): name for name, src in by_name.items() for r in src.records}
    sampler = MixingSampler(records, batch_size, dict(zip(by_name, weights)), seed=seed, rank=rank,
                            world_size=world, bucket_of=lambda r: keys[(owner[id(r)], r.id)])
    return _Mixture(sampler, by_name)


def load_edit_model(cfg: TrainConfig, device):
    """Frozen parts in bf16 under bf16 mixed precision; a fully fine-tuned transformer in fp32.

    A tiny model is always the canonical one (load_model's default seed), so what is trained
    applies to `load_model("tiny")` whatever the training seed.
    """
    from editkit.models import load_model

    model = load_model(cfg.model, family=cfg.family, transformer=cfg.transformer, vae=cfg.vae_folder,
                       text_encoder=cfg.text_encoder_folder,
                       dtype="bf16" if cfg.loop.mixed_precision == "bf16" else "fp32", device=str(device))
    if not model.family.trainable:
        raise UserError(f"model {cfg.model}: family {model.family.name} is for editing and evaluation only; "
                        "editkit trains the flow-matching families (see docs/models.md)")
    if cfg.train.mode == "full" and cfg.train.trainable_dtype == "fp32":
        torch.nn.Module.to(model.transformer, dtype=torch.float32)
    return model


def manifest_identity(cfg: TrainConfig) -> dict:
    """`data.train` by content: each manifest's records with their files' stamps (edit and vae stages)."""
    from editkit.utils.fingerprint import records_stamp

    return {"data.train": [{**d.model_dump(), "manifest": records_stamp(read_records(d.manifest, cfg.data.fields))}
                           for d in cfg.data.train]}


class EditTask:
    """Model, data and loss of the edit stage (an editkit.train.task.Task); the loop
    (editkit.train.trainer) drives it."""

    data_identity = staticmethod(manifest_identity)

    def __init__(self, cfg: TrainConfig, device, rank: int = 0, world: int = 1):
        from editkit.data.images import make_buckets

        self.cfg = cfg
        self.model = load_edit_model(cfg, device)
        if cfg.data.multiple % self.model.size_multiple:
            raise UserError(f"data.multiple={cfg.data.multiple}: must be a multiple of {self.model.size_multiple} "
                            "for this model (VAE downsampling x 2x2 packing)")
        buckets = make_buckets(cfg.data.area, cfg.data.multiple, cfg.data.max_ratio)
        fields = cfg.data.fields
        if cfg.data.cache:
            self.sources = [_CachedSource(c, cfg.data) for c in cfg.data.cache]
            weights = cfg.data.cache_weights or [1.0] * len(self.sources)
        else:
            self.sources = [_OnlineSource(d.manifest, self.model, buckets, d.name, fields=fields)
                            for d in cfg.data.train]
            weights = [d.weight for d in cfg.data.train]
        self.sampler = mixing_sampler(self.sources, weights, cfg.data.batch_size, cfg.seed, rank, world)
        self.val = _OnlineSource(cfg.data.val, self.model, buckets, keep=True, fields=fields) if cfg.data.val else None
        self.info = setup_trainable(self.model.transformer, cfg.train, self.model.family)
        from editkit.models import rope_frames

        self.model = rope_frames.view(self.model, cfg.train.rope_frames)
        if cfg.data.cache and not self._needs_encoders():
            self.model = self.model.without_encoders()  # the cache replaces them; free the memory
        dtype = torch.float32 if cfg.train.trainable_dtype == "fp32" else torch.bfloat16
        for p in self.model.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
        if cfg.train.compile:
            from editkit.models import accel

            accel.apply_accel(self.model, accel.Accel(split_lengths=False))
        self.module = self.model.transformer

    def _needs_encoders(self) -> bool:
        """Cached training needs the VLM and VAE only for validation, previews and the LBM pixel loss."""
        cfg = self.cfg
        return bool(cfg.data.val) or (cfg.objective.kind == "lbm" and cfg.objective.lbm.pixel_loss_weight > 0)

    def set_module(self, module) -> None:
        """The transformer the loss runs through (the accelerate-wrapped one while training)."""
        self.module = module
        self.model = self.model.with_transformer(module)

    # ----- data ------------------------------------------------------------------------------

    def make_batch(self, source, indices: list[int], generator: torch.Generator,
                   dropout: bool = True) -> TrainBatch:
        bucket, cond_sizes = source.keys[indices[0]]
        obj, data = self.cfg.objective, self.cfg.data
        needs_white = obj.kind == "lbm" and obj.lbm.sub_stream_weight > 0
        samples = [source.get(i) for i in indices]
        if dropout and data.inverse_probability > 0 and float(torch.rand(1, generator=generator)) < \
                data.inverse_probability and all(can_reverse(s) for s in samples):
            samples, cond_sizes = [reverse_sample(s) for s in samples], [bucket]
        return collate(samples, bucket, list(cond_sizes), data.instruction,
                       data.cn_probability, obj.text_dropout if dropout else 0.0,
                       obj.image_dropout if dropout else 0.0,
                       source.white(bucket, self.model) if needs_white else None, generator)

    def next_batch(self, generator: torch.Generator) -> TrainBatch:
        source, indices = self.sampler.next_items()
        return self.make_batch(source, indices, generator)

    # ----- loss ------------------------------------------------------------------------------

    def loss(self, batch: TrainBatch, generator: torch.Generator) -> LossOutput:
        model, obj = self.model, self.cfg.objective
        batch = batch.to(model.device)
        target = batch.target.float()
        h, w = target.shape[-2:]
        cond = torch.cat([model.pack(s.float()) for s in batch.sources], dim=1) if batch.sources else None
        shapes = [model.img_shapes(batch.width, batch.height, batch.cond_sizes)] * target.shape[0]
        embeds = batch.embeds.float()

        def predict(x_t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            packed = model.predict(model.pack(x_t), sigmas.to(x_t.device), embeds, batch.embeds_mask, shapes, cond)
            return model.unpack(packed.float(), h, w)

        if obj.kind == "flow_matching":
            return flow_matching_loss(predict, target, obj, generator, image_seq_len=h * w // 4,
                                      shift=dict(model.scheduler.config), mask=batch.mask)
        if batch.bridge_source is None:
            raise UserError("objective.kind=lbm needs records with a source image (the bridge starts there)")
        decode = model.decode_latents if obj.lbm.pixel_loss_weight > 0 else None
        return lbm_loss(predict, batch.bridge_source.float(), target, obj, generator,
                        white=None if batch.white is None else batch.white.float(), mask=batch.mask, decode=decode)

    @torch.no_grad()
    def validation_loss(self, seed: int) -> float | None:
        """Mean loss over the validation records, with fixed noise (same value for the same weights)."""
        if self.val is None:
            return None
        g = torch.Generator().manual_seed(seed)
        groups: dict = {}
        for i, key in enumerate(self.val.keys):
            groups.setdefault(key, []).append(i)
        losses = []
        for indices in groups.values():
            for j in range(0, len(indices), self.cfg.data.batch_size):
                part = indices[j:j + self.cfg.data.batch_size]
                losses += [self.loss(self.make_batch(self.val, part, g, dropout=False), g).loss.item()] * len(part)
        return sum(losses) / len(losses)

    # ----- previews and exports --------------------------------------------------------------

    @torch.no_grad()
    def preview(self, path: Path, steps: int, cfg_scale: float) -> Path | None:
        """An image grid (sources | target | prediction per row) on the first validation records."""
        from PIL import Image

        from editkit.data.images import load_image, resize_to_bucket
        from editkit.infer.sampler import bridge_start, sample, sample_bridge

        if self.val is None:
            return None
        model, rows = self.model, []
        for record, key in list(zip(self.val.records, self.val.keys))[: self.cfg.loop.val_samples]:
            (w, h), _ = key
            images = [load_image(p) for p in record.sources]
            target = resize_to_bucket(load_image(record.target), (w, h))
            inputs = model.prepare([record.instruction], [images], w, h, [" "] if cfg_scale > 1 else None)
            if self.cfg.objective.kind == "lbm":
                start = model.pack(bridge_start(model, images[:1], w, h))
                packed = sample_bridge(model, inputs, start, steps, self.cfg.objective.lbm.bridge_noise, seeds=0)
            else:
                packed = sample(model, inputs, steps, cfg_scale, seeds=0)
            pred = model.to_pil(model.decode_packed(packed, w, h))[0]
            rows.append([*(im.resize((w, h)) for im in images), target, pred])
        cols = max(len(r) for r in rows)
        tile_w = max(im.width for r in rows for im in r)
        tile_h = max(im.height for r in rows for im in r)
        grid = Image.new("RGB", (cols * (tile_w + 2), len(rows) * (tile_h + 2)), "white")
        for y, row in enumerate(rows):
            for x, im in enumerate(row):
                grid.paste(im, ((cols - len(row) + x) * (tile_w + 2), y * (tile_h + 2)))
        path.parent.mkdir(parents=True, exist_ok=True)
        from editkit.utils.atomic import atomic_path

        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        return path

    def lora_state_dict(self, transformer) -> dict[str, torch.Tensor]:
        """The adapter in PEFT layout with one `alpha` per module (so every export keeps the scale)."""
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(transformer)
        config = transformer.peft_config["default"]
        for name in {k.rsplit(".lora_", 1)[0] for k in sd}:
            sd[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
        return sd

    def export(self, transformer, folder: Path, step: int) -> list[Path]:
        """Weights in deployable form: LoRA files in three layouts, or the full transformer folder."""
        if self.cfg.train.mode == "full":
            transformer.save_pretrained(folder / "transformer")
            return [folder / "transformer"]
        extra = {n: p for n, p in transformer.named_parameters() if p.requires_grad and ".lora_" not in n}
        return self._export_lora(self.lora_state_dict(transformer), extra, folder, step)

    def export_gathered(self, trainable: dict[str, torch.Tensor], folder: Path, step: int) -> list[Path] | None:
        """export() from the gathered trainable weights of a sharded run (FSDP2 / DeepSpeed), whose
        module holds only shards. LoRA runs only: a full transformer needs its frozen weights too."""
        if self.cfg.train.mode == "full":
            return None
        lora = self.cfg.train.lora
        alpha = float(lora.alpha if lora.alpha is not None else lora.rank)
        sd = {k.replace(".default.", "."): v for k, v in trainable.items() if ".lora_" in k}  # peft's adapter name
        for name in {k.rsplit(".lora_", 1)[0] for k in sd}:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        extra = {k: v for k, v in trainable.items() if ".lora_" not in k}
        return self._export_lora(sd, extra, folder, step)

    def _export_lora(self, sd: dict, extra: dict, folder: Path, step: int) -> list[Path]:
        from editkit.models.lora import save_lora

        meta = {"base_model": self.cfg.model, "family": self.model.family.name, "step": step}
        paths = [save_lora(folder / name, sd, layout, meta) for layout, name in LORA_FILES.items()]
        bundled = self.info.get("extra_modules") or {}
        if bundled:
            paths.append(self._export_bundle(sd, extra, folder, meta))
        owned = {p for spec in bundled.values() for p in spec["params"]}
        extra = {n: p.detach().cpu().contiguous() for n, p in extra.items() if n not in owned}
        if extra:  # modules unfrozen with train.unfreeze, under their transformer names
            from safetensors.torch import save_file

            save_file(extra, str(folder / "unfrozen_modules.safetensors"))
            paths.append(folder / "unfrozen_modules.safetensors")
        return paths

    def _export_bundle(self, sd: dict, trained: dict, folder: Path, meta: dict) -> Path:
        """The LoRA and the train.extra_modules as one adapter bundle (editkit.models.adapter_bundle)."""
        from editkit.models import adapter_bundle as ab
        from editkit.models.lora import convert
        from editkit.train.config import trajectory_settings
        from editkit.utils.fingerprint import digest

        extras = {name: ab.ExtraModule(spec["kind"], {ab.bundle_param(name, spec["kind"], p): trained[p]
                                                     for p in spec["params"]})
                  for name, spec in self.info["extra_modules"].items()}
        bundle = ab.Bundle(lora=convert(sd, "diffusers"), extras=extras,
                           meta={**meta, "rope_frames": self.cfg.train.rope_frames,
                                 "config_digest": digest(trajectory_settings(self.cfg))})
        return ab.save_bundle(folder / ab.BUNDLE_FILE, bundle)
