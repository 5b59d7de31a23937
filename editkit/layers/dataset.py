"""The component dataset over a folder written by `layers prep`, batched one bucket at a time.

An item is one component of one sample together with that sample's composite:
{"component": (4, H, W), "composite": (4, H, W), "id": "<sample>/compXXX"}, float32 in [-1, 1]
(straight alpha: value / 127.5 - 1 for each of R, G, B, A). With `include_composites`, each
sample adds one more item whose component *is* its composite (id "<sample>/composite"), so a VAE
also sees the flattened images. An epoch is every item of the split once.

`BucketBatchSampler` groups items by bucket, so every batch stacks: each epoch it shuffles the
items within each bucket (seeded by (seed, epoch)), cuts them into batches and shuffles the
batch order. The same seed gives the same batches on any machine. Iterating it (as a
DataLoader does) yields one epoch and moves on to the next; a training stage that resumes
exactly draws with `next_batch()` and keeps `state_dict()` in its checkpoint (a DataLoader's
workers read the sampler ahead, so its position runs ahead of the batches consumed).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from editkit.errors import UserError
from editkit.layers.records import SPLITS, read_prepared


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An image as a (4, H, W) float32 RGBA tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGBA"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


class ComponentDataset(Dataset):
    """One item per component (and optionally per composite) of the samples of one split."""

    def __init__(self, root: str | Path, split: str = "train", include_composites: bool = False):
        if split not in SPLITS:
            raise UserError(f"split {split!r}: use one of {', '.join(SPLITS)}")
        self.root = Path(root)
        self.entries = [e for e in read_prepared(self.root) if e.split == split]
        if not self.entries:
            raise UserError(f"{self.root}: has no {split} samples; prepare some with `editkit layers prep "
                            f"--{split}-count N`")
        self.items: list[tuple[int, int]] = []  # (entry index, component index; -1 = the composite)
        for i, entry in enumerate(self.entries):
            self.items += [(i, k) for k in range(len(entry.layers))]
            if include_composites:
                self.items.append((i, -1))
        self.buckets = [self.entries[i].bucket for i, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, rel: str) -> torch.Tensor:
        path = self.root / rel
        try:
            with Image.open(path) as img:
                return to_tensor(img)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot be read ({err.__class__.__name__}); run `editkit layers validate "
                            f"{self.root}`") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, k = self.items[index]
        entry = self.entries[i]
        composite = self._load(entry.composite)
        component = composite if k < 0 else self._load(entry.layers[k])
        return {"component": component, "composite": composite,
                "id": f"{entry.id}/{'composite' if k < 0 else f'comp{k:03d}'}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one bucket: {"component": (B,4,H,W), "composite": (B,4,H,W), "ids": [...]}."""
    return {"component": torch.stack([it["component"] for it in items]),
            "composite": torch.stack([it["composite"] for it in items]),
            "ids": [it["id"] for it in items]}


class BucketBatchSampler(Sampler):
    """Batches of item indices from one bucket each, deterministic for (seed, epoch); resumable."""

    def __init__(self, buckets: list[str], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.groups: dict[str, list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            self.groups[bucket].append(index)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # the next batch is batches(epoch)[position]
        if not self.batches(0):
            raise UserError(f"no batch for rank {rank} of {world_size}: too few items for batches of {batch_size} "
                            f"(drop_last={drop_last}); lower the batch size or prepare more samples")

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in sorted(self.groups):
            items = list(self.groups[bucket])
            if self.shuffle:
                items = [items[i] for i in rng.permutation(len(items))]
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size  # every rank steps equally often
        return batches[self.rank:usable:self.world_size]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self):
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def next_batch(self) -> list[int]:
        """The next batch, moving on to the next epoch after the last one."""
        batches = self.batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        self.position += 1
        return batches[self.position - 1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def component_dataloader(root: str | Path, split: str = "train", batch_size: int = 4, num_workers: int = 0,
                         shuffle: bool = True, seed: int = 0, include_composites: bool = False,
                         drop_last: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader of one-bucket batches over ROOT's `split` (see the module docstring)."""
    dataset = ComponentDataset(root, split, include_composites)
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle, seed, drop_last, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
