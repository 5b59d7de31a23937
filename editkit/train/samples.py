"""One training sample: what the cache stores per record, and how samples become a batch.

`encode_records` runs the EditModel facade over records of one shape key (the cache encodes them
in batches); `encode_record` is its one-record case (online training). Batched and one-by-one
tensors are equal within float rounding, so both train on the same tensors. A sample is a flat
dict of tensors:
- `embeds.<variant>` (L, D): VLM embeddings of the instruction with the record's source images,
  variants `en`, `cn`, `empty` (empty text, for CFG dropout) and `inverse`, `inverse_cn`
  (the inverse instruction with the target image as the picture);
- `target` (C, h, w): normalised latents of the target resized to its bucket;
- `source.<j>` (C, h_j, w_j): each source image at the VAE view the engine uses (model.vae_size);
- `bridge_source` (C, h, w): the first source resized to the target bucket (the LBM start);
- `mask` (1, h, w): the edit-region mask area-averaged to the latent grid (if the record has one).
The latents of a pure white image per bucket (`white_latents`) feed the LBM sub stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from editkit.data.images import bucket_for, load_image, load_mask, oriented_size, resize_to_bucket
from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.infer.sampler import bridge_start

Size = tuple[int, int]


def sample_key(model, record: EditRecord, buckets: list[Size]) -> tuple[Size, tuple[Size, ...]]:
    """The shape key of a record: its target bucket and the VAE sizes of its sources."""
    if record.target is None:
        raise UserError(f"record {record.id}: has no target image; training needs source/target pairs")
    w, h = oriented_size(record.target)
    sources = []
    for p in record.sources:
        sw, sh = oriented_size(p)
        sources.append(tuple(model.vae_size(_Sized(sw, sh))))
    return bucket_for(w, h, buckets), tuple(sources)


@dataclass
class _Sized:
    width: int
    height: int


def _strip(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [embeds[i][mask[i].bool()].contiguous() for i in range(embeds.shape[0])]


def encode_record(model, record: EditRecord, bucket: Size) -> dict[str, torch.Tensor]:
    """All tensors of one record (see module docstring), through the EditModel facade."""
    return encode_records(model, [record], bucket)[0]


def _mask_latents(record: EditRecord, bucket: Size, latent_hw: tuple[int, int], device) -> torch.Tensor:
    w, h = bucket
    m = resize_to_bucket(load_mask(record.mask), bucket, Image.Resampling.NEAREST)
    pixels = torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(1, 1, h, w).float() / 255
    return F.interpolate(pixels.to(device), size=latent_hw, mode="area")[0]


@torch.no_grad()
def encode_records(model, records: list[EditRecord], bucket: Size) -> list[dict[str, torch.Tensor]]:
    """The tensors of each record, batched: one VAE pass per latent kind, one VLM pass for all texts.

    The records must share a shape key (`sample_key`: target bucket and source VAE sizes), as the
    cache groups them. The tensors equal one-record batches' within float rounding (padding the
    prompts of a batch to one length and batched convolutions change the summation order only);
    tests/test_cache_batched.py checks it.
    """
    if not records:
        return []
    w, h = bucket
    targets = [resize_to_bucket(load_image(r.target), bucket) for r in records]
    sources = [[load_image(p) for p in r.sources] for r in records]
    outs: list[dict[str, torch.Tensor]] = [{} for _ in records]

    def put(name: str, latents: torch.Tensor) -> None:
        for out, lat in zip(outs, latents):
            out[name] = lat.clone()

    put("target", model.encode_images(targets, w, h))
    n_src = {len(s) for s in sources}
    if len(n_src) != 1:
        raise ValueError("encode_records: the records must share a shape key (the same number of sources)")
    for j in range(n_src.pop()):
        sw, sh = model.vae_size(sources[0][j])
        put(f"source.{j}", model.encode_images([s[j] for s in sources], sw, sh))
    if sources[0]:
        put("bridge_source", bridge_start(model, [s[0] for s in sources], w, h))
    # every text of every record in one VLM pass: en, empty, cn with the sources; inverse(_cn) with the target
    prompts: list[tuple[int, str, str, list]] = []
    for i, r in enumerate(records):
        texts = {"en": r.instruction, "empty": ""}
        if r.instruction_cn:
            texts["cn"] = r.instruction_cn
        prompts += [(i, n, t, sources[i]) for n, t in texts.items()]
        prompts += [(i, n, t, [targets[i]]) for n, t in (("inverse", r.inverse_instruction),
                                                         ("inverse_cn", r.inverse_instruction_cn)) if t]
    embeds, mask = model.encode_prompt([p[2] for p in prompts], [p[3] for p in prompts])
    for (i, name, _, _), e in zip(prompts, _strip(embeds, mask)):
        outs[i][f"embeds.{name}"] = e
    latent_hw = tuple(outs[0]["target"].shape[-2:])
    for i, r in enumerate(records):
        if r.mask is not None:
            outs[i]["mask"] = _mask_latents(r, bucket, latent_hw, outs[i]["target"].device)
    return [{k: v.cpu() for k, v in out.items()} for out in outs]


@torch.no_grad()
def white_latents(model, bucket: Size) -> torch.Tensor:
    """Normalised latents (C, h, w) of a pure white image of the bucket's size (LBM sub stream)."""
    w, h = bucket
    return model.encode_images([Image.new("RGB", (w, h), (255, 255, 255))], w, h)[0].cpu()


def can_reverse(sample: dict[str, torch.Tensor]) -> bool:
    return "embeds.inverse" in sample and "bridge_source" in sample and "source.1" not in sample


def reverse_sample(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse edit of a one-source sample: the target becomes the condition, the source the target.

    The instruction is the inverse one (embedded with the target image as the picture); the
    condition latents are the target's at its bucket size (the engine would use the VAE view of the
    target — the same size when data.area equals the model's VAE area). Text dropout still uses
    the forward `embeds.empty`.
    """
    out = {"target": sample["bridge_source"], "source.0": sample["target"], "bridge_source": sample["target"],
           "embeds.en": sample["embeds.inverse"], "embeds.empty": sample["embeds.empty"]}
    if "embeds.inverse_cn" in sample:
        out["embeds.cn"] = sample["embeds.inverse_cn"]
    if "mask" in sample:
        out["mask"] = sample["mask"]
    return out


@dataclass
class TrainBatch:
    """A stacked batch of same-shape samples, conditioning dropout already applied."""

    target: torch.Tensor  # (B, C, h, w)
    sources: list[torch.Tensor]  # each (B, C, h_j, w_j)
    cond_sizes: list[Size]  # (width, height) of each source at the VAE view
    embeds: torch.Tensor  # (B, L, D)
    embeds_mask: torch.Tensor  # (B, L)
    width: int
    height: int
    bridge_source: torch.Tensor | None = None
    white: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (B, 1, h, w)

    def to(self, device) -> TrainBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainBatch(move(self.target), [move(s) for s in self.sources], self.cond_sizes, move(self.embeds),
                          move(self.embeds_mask), self.width, self.height, move(self.bridge_source),
                          move(self.white), move(self.mask))


def pad_embeds(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) embeddings to (B, L, D) with a (B, L) long mask."""
    length = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask


def collate(samples: list[dict[str, torch.Tensor]], bucket: Size, cond_sizes: list[Size],
            instruction: str = "en", cn_probability: float = 0.5, text_dropout: float = 0.0,
            image_dropout: float = 0.0, white: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> TrainBatch:
    """Stack samples; pick the instruction variant; drop text (-> `embeds.empty`) or images (-> zeros).

    The random choices come from `generator` in a fixed order (variant, text, image per sample).
    """
    chosen, keep_images = [], []
    for s in samples:
        r = torch.rand(3, generator=generator).tolist()
        variant = "en"
        if "embeds.cn" in s and (instruction == "cn" or (instruction == "mixed" and r[0] < cn_probability)):
            variant = "cn"
        chosen.append(s["embeds.empty"] if r[1] < text_dropout else s[f"embeds.{variant}"])
        keep_images.append(0.0 if r[2] < image_dropout else 1.0)
    embeds, mask = pad_embeds(chosen)
    keep = torch.tensor(keep_images).view(-1, 1, 1, 1)
    n_src = len(cond_sizes)
    sources = [torch.stack([s[f"source.{j}"] for s in samples]) * keep.to(samples[0]["target"].dtype)
               for j in range(n_src)]
    masks = None
    if any("mask" in s for s in samples):
        zeros = torch.zeros(1, *samples[0]["target"].shape[-2:])
        masks = torch.stack([s.get("mask", zeros) for s in samples])
    bridge = torch.stack([s["bridge_source"] for s in samples]) if n_src else None
    target = torch.stack([s["target"] for s in samples])
    return TrainBatch(target, sources, list(cond_sizes), embeds, mask, bucket[0], bucket[1], bridge,
                      None if white is None else white.unsqueeze(0).expand_as(target), masks)
