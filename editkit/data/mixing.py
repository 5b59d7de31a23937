"""Batches drawn from several datasets by weight, stackable, identical on resume.

Each step:
1. the number of source images k is drawn from a generator seeded by (seed, step) only, so
   every rank gets the same k and batches stack across ranks (the model's sequence layout
   depends on k). P(k) is the user's source-count weights (`0=1,1=1,2=1,3=0`), or by default
   the weighted share of records with k sources;
2. this rank draws a dataset d with P(d | k) ∝ weight(d) · share of d's records with k sources
   (so, by default, datasets appear exactly in proportion to their weights);
3. it draws a bucket b (e.g. an image size) in proportion to the records of d with k sources
   in b, and takes the next `batch_size` records of group (d, k, b) from a shuffled order
   that is reshuffled at each pass.
Every random choice derives from (seed, step, rank) or (seed, rank, group, pass), so the state
is just the step and the group cursors; `load_state_dict({"step": n})` alone replays to step n.

`BucketBatchSampler` is the same machinery over one dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from editkit.data.folder import is_folder_dataset
from editkit.data.manifest import RUN_RECORDS, read_manifest
from editkit.data.records import EditRecord
from editkit.data.tools import parse_weights, plain_name, where
from editkit.errors import UserError
from editkit.utils import dist
from editkit.utils.progress import console

Group = tuple[str, int, Hashable]  # (dataset, source count, bucket)
_MANIFEST_EXTENSIONS = (".jsonl", ".json", ".csv")


def parse_dataset_weights(text: str) -> dict[str, float]:
    """'web=2,synth=1' -> {'web': 2.0, 'synth': 1.0} (the `data mix --weights` flag)."""
    return parse_weights(text, "--weights")


def parse_source_weights(text: str) -> dict[int, float]:
    """'0=1,1=1,2=1,3=0' -> {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0} (keys: number of source images)."""
    out = {}
    for key, value in parse_weights(text, "--source-weights").items():
        if not key.isdigit():
            raise UserError(f"--source-weights {text!r}: {key!r} is not a number of source images (0, 1, 2, ...)")
        out[int(key)] = value
    return out


def discover_datasets(root: str | os.PathLike, split: str = "train") -> dict[str, Path]:
    """name -> manifest for every sub-folder of root that holds a dataset.

    A sub-folder is a dataset if it is a folder layout, holds `<split>.jsonl/.json/.csv`, or holds
    exactly one manifest file.
    """
    root = Path(root)
    plain_name(split, "--split")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give a folder whose sub-folders are datasets")
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_folder_dataset(sub):
            found[sub.name] = sub
            continue
        named = [sub / f"{split}{ext}" for ext in _MANIFEST_EXTENSIONS if (sub / f"{split}{ext}").is_file()]
        manifests = [p for p in sub.iterdir() if p.suffix.lower() in _MANIFEST_EXTENSIONS and p.is_file()
                     and not p.name.startswith(".") and p.name not in RUN_RECORDS]
        if named:
            found[sub.name] = named[0]
        elif len(manifests) == 1:
            found[sub.name] = manifests[0]
    if not found:
        raise UserError(f"{root}: no dataset sub-folders (each needs a folder layout, {split}.jsonl or one manifest)")
    return found


def load_datasets(manifests: dict[str, Path], weights: dict[str, float] | None = None,
                  ) -> tuple[dict[str, list[EditRecord]], dict[str, float]]:
    """Read the datasets that have a positive weight (all, weight 1, when weights is None)."""
    if weights is None:
        weights = {name: 1.0 for name in manifests}
    unknown = sorted(set(weights) - set(manifests))
    if unknown:
        raise UserError(f"dataset weights name {', '.join(unknown)}, not among the datasets "
                        f"({', '.join(sorted(manifests))})")
    chosen = {name: w for name, w in weights.items() if w > 0}
    return {name: read_manifest(manifests[name]) for name in chosen}, chosen


def open_mixture(root: str | os.PathLike, batch_size: int, dataset_weights: str | dict[str, float] | None = None,
                 source_weights: str | dict[int, float] | None = None, seed: int = 0, split: str = "train",
                 bucket_of: Callable[[EditRecord], Hashable] | None = None, **kwargs: Any) -> MixingSampler:
    """One call from a folder of datasets and weight strings ('web=2,synth=1', '0=1,1=1,2=1,3=0')."""
    if isinstance(dataset_weights, str):
        dataset_weights = parse_dataset_weights(dataset_weights)
    if isinstance(source_weights, str):
        source_weights = parse_source_weights(source_weights)
    datasets, weights = load_datasets(discover_datasets(root, split), dataset_weights)
    return MixingSampler(datasets, batch_size, weights, source_weights, seed=seed, bucket_of=bucket_of, **kwargs)


def _stable_hash(value: Any) -> int:
    """Seed material that is the same in every process (Python's hash() is salted per process)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return zlib.crc32(repr(value).encode("utf-8"))


class MixingSampler:
    """Index batches for this rank over several datasets; see the module docstring for the law."""

    def __init__(self, datasets: dict[str, list[EditRecord]], batch_size: int,
                 dataset_weights: dict[str, float] | None = None, source_weights: dict[int, float] | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 bucket_of: Callable[[EditRecord], Hashable] | None = None):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise UserError(f"sampler seed must be a non-negative integer, got {seed}")
        self.batch_size, self.seed = batch_size, seed
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        weights = {name: 1.0 for name in datasets} if dataset_weights is None else dict(dataset_weights)
        unknown = sorted(set(weights) - set(datasets))
        if unknown:
            raise UserError(f"dataset weights name unknown datasets: {', '.join(unknown)}")
        self.names = sorted(n for n, w in weights.items() if w > 0)  # unlisted or zero: excluded
        if not self.names:
            raise UserError("every dataset has weight 0; give at least one a positive weight")
        total = sum(weights[n] for n in self.names)
        self.dataset_weights = {n: weights[n] / total for n in self.names}

        self.records: list[EditRecord] = []
        self.groups: dict[Group, list[int]] = {}
        for name in self.names:
            if not datasets[name]:
                raise UserError(f"dataset {name!r} has no records")
            for record in datasets[name]:
                key = (name, len(record.sources), bucket_of(record) if bucket_of else None)
                self.groups.setdefault(key, []).append(len(self.records))
                self.records.append(record)
        self._dataset_of = {i: g[0] for g, idx in self.groups.items() for i in idx}
        self._set_count_law(source_weights)
        self.step = 0
        self.cursors: dict[Group, tuple[int, int]] = {}  # group -> (pass, position)
        self._orders: dict[Group, tuple[int, np.ndarray]] = {}  # group -> (pass, shuffled order)

    def _set_count_law(self, source_weights: dict[int, float] | None) -> None:
        share: dict[tuple[str, int], int] = {}
        for (name, k, _), idx in self.groups.items():
            share[(name, k)] = share.get((name, k), 0) + len(idx)
        sizes = {n: sum(v for (m, _), v in share.items() if m == n) for n in self.names}
        # mass[k][d] = weight(d) * share of d's records with k sources
        mass: dict[int, dict[str, float]] = {}
        for (name, k), count in share.items():
            mass.setdefault(k, {})[name] = self.dataset_weights[name] * count / sizes[name]
        if source_weights is None:
            count_law = {k: sum(m.values()) for k, m in mass.items()}
        else:
            count_law = {k: w for k, w in source_weights.items() if w > 0 and k in mass}
            missing = sorted(k for k, w in source_weights.items() if w > 0 and k not in mass)
            if missing:
                console.print(f"no records with {missing} source images: those counts are not drawn", markup=False)
            if not count_law:
                raise UserError(f"no records have a source-image count with positive weight {source_weights}")
        self.counts = sorted(count_law)
        total = sum(count_law.values())
        self.count_probs = np.array([count_law[k] / total for k in self.counts])
        self.dataset_probs = {}
        for k in self.counts:
            names = sorted(mass[k])
            weights = np.array([mass[k][n] for n in names])
            self.dataset_probs[k] = (names, weights / weights.sum())
        by_pair: dict[tuple[str, int], list[Group]] = {}
        for group in self.groups:
            by_pair.setdefault(group[:2], []).append(group)
        self.bucket_probs: dict[tuple[str, int], tuple[list[Group], np.ndarray]] = {}
        for pair, groups in by_pair.items():
            sizes = np.array([len(self.groups[g]) for g in groups], dtype=float)
            self.bucket_probs[pair] = (groups, sizes / sizes.sum())

    # -- drawing ---------------------------------------------------------------------------
    def _rng(self, *key: Any) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, *(_stable_hash(k) for k in key)]))

    def count_at(self, step: int) -> int:
        """The source-image count of `step` (the same on every rank)."""
        return self.counts[int(self._rng("count", step).choice(len(self.counts), p=self.count_probs))]

    def next_batch(self) -> list[int]:
        """Indices into `self.records` for this rank's next batch (one dataset, one k, one bucket)."""
        step = self.step
        k = self.count_at(step)
        rng = self._rng("rank", step, self.rank)
        names, probs = self.dataset_probs[k]
        name = names[int(rng.choice(len(names), p=probs))]
        groups, probs = self.bucket_probs[(name, k)]
        group = groups[int(rng.choice(len(groups), p=probs))]
        batch = [self._take(group) for _ in range(self.batch_size)]
        self.step += 1
        return batch

    def _take(self, group: Group) -> int:
        members = self.groups[group]
        epoch, pos = self.cursors.get(group, (0, 0))
        if pos >= len(members):
            epoch, pos = epoch + 1, 0
        cached = self._orders.get(group)
        if cached is None or cached[0] != epoch:
            cached = (epoch, self._rng("order", self.rank, group, epoch).permutation(len(members)))
            self._orders[group] = cached
        self.cursors[group] = (epoch, pos + 1)
        return members[int(cached[1][pos])]

    def next_records(self) -> list[EditRecord]:
        return [self.records[i] for i in self.next_batch()]

    def dataset_of(self, index: int) -> str:
        return self._dataset_of[index]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def __len__(self) -> int:
        """Steps per epoch: steps for all ranks together to draw about every record once."""
        return max(1, math.ceil(len(self.records) / (self.batch_size * self.world_size)))

    # -- resume ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        spec = {"seed": self.seed, "batch": self.batch_size, "rank": self.rank, "world": self.world_size,
                "weights": self.dataset_weights, "counts": self.counts, "count_probs": self.count_probs.tolist(),
                "groups": sorted((repr(g), len(v)) for g, v in self.groups.items())}
        return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": self.fingerprint(),
                "cursors": [[repr(g), e, p] for g, (e, p) in sorted(self.cursors.items(), key=lambda x: repr(x[0]))]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. With cursors from the same set-up they are used directly;
        otherwise (a bare {"step": n}, or changed data) the draws are replayed up to step n."""
        step = int(state["step"])
        same = state.get("fingerprint") == self.fingerprint() and "cursors" in state
        if same:
            by_repr = {repr(g): g for g in self.groups}
            self.cursors = {by_repr[r]: (int(e), int(p)) for r, e, p in state["cursors"]}
            self.step = step
            return
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint():
            console.print("sampler set-up changed since the checkpoint (data, weights, batch or world size): "
                          f"replaying {step} steps with the new set-up", markup=False)
        self.skip_to(step)

    def skip_to(self, step: int) -> None:
        """Replay draws from the start up to `step` (fast: no data is read)."""
        self.step, self.cursors = 0, {}
        while self.step < step:
            self.next_batch()


class BucketBatchSampler(MixingSampler):
    """Stackable batches over one record list: grouped by (source count, bucket), resumable."""

    def __init__(self, records: list[EditRecord], batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, bucket_of: Callable[[EditRecord], Hashable] | None = None,
                 source_weights: dict[int, float] | None = None):
        super().__init__({"data": records}, batch_size, seed=seed, rank=rank, world_size=world_size,
                         bucket_of=bucket_of, source_weights=source_weights)


@dataclass(frozen=True)
class MixturePreview:
    """How often a sampler's batches came from each dataset and source-image count (`preview_mixture`)."""

    steps: int
    records: int  # records in the mixture
    dataset_shares: dict[str, float]  # share of batches per dataset (every dataset of the mixture)
    dataset_weights: dict[str, float]  # the normalised weights, to compare with
    count_shares: dict[int, float]  # share of batches per source-image count (every count drawn from)


def preview_mixture(sampler: MixingSampler, steps: int) -> MixturePreview:
    """Draw `steps` batches from `sampler` (advancing it) and count where they came from
    (`editkit data mix`, to check a mixture before training)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    datasets: Counter = Counter()
    counts: Counter = Counter()
    for _ in range(steps):
        first = sampler.next_batch()[0]  # a batch is one dataset and one source count
        datasets[sampler.dataset_of(first)] += 1
        counts[len(sampler.records[first].sources)] += 1
    return MixturePreview(steps, len(sampler.records), {name: datasets[name] / steps for name in sampler.names},
                          dict(sampler.dataset_weights), {k: counts[k] / steps for k in sampler.counts})


def bucket_by_image_size(buckets: list[tuple[int, int]]) -> Callable[[EditRecord], tuple[int, int]]:
    """A `bucket_of` for the samplers: the bucket of the record's target (or first source) size.

    Sizes come from `oriented_size` (no pixel decoding for most files); records without images
    go to bucket None.
    """
    from editkit.data.images import bucket_for, oriented_size

    def bucket_of(record: EditRecord):
        path = record.target or (record.sources[0] if record.sources else None)
        if path is None:
            return None
        try:
            size = oriented_size(path)
        except UserError as err:
            raise UserError(f"{where(record)}: {err} (run `editkit data validate`)") from None
        return bucket_for(*size, buckets)

    return bucket_of
