"""The training cache: per-record VLM embeddings and VAE latents, so training needs neither model.

Layout of a cache folder:
- `shards/r<rank>-<n>.safetensors`: tensors named `<record id>/<name>` (see editkit.train.samples)
  and `white/<w>x<h>` (white-image latents per bucket);
- `index-r<rank>.json`: what each rank wrote — shard sha256 checksums, and per record its shard,
  shape key (bucket, source sizes) and tensor names;
- `cache.json`: the run manifest (model, family, area, versions).
Every rank (torchrun / accelerate) encodes its share of the records and writes only its own
shards and index; a shard is written atomically and then the index, so a killed job loses at
most the shard in progress and a rerun skips every record already indexed. Readers verify each
shard's sha256 before using it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editkit.errors import UserError
from editkit.utils.atomic import atomic_path, write_json

INDEX_GLOB = "index-r*.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key_to_json(key) -> list:
    bucket, sources = key
    return [list(bucket), [list(s) for s in sources]]


def _key_from_json(value) -> tuple:
    bucket, sources = value
    return tuple(bucket), tuple(tuple(s) for s in sources)


class CacheWriter:
    """Appends encoded records to this rank's shards; resumable."""

    def __init__(self, out_dir: str | Path, rank: int = 0, shard_records: int = 64):
        self.out = Path(out_dir)
        self.rank = rank
        self.shard_records = shard_records
        self.index_path = self.out / f"index-r{rank}.json"
        self.index = json.loads(self.index_path.read_text()) if self.index_path.is_file() else {
            "rank": rank, "shards": {}, "records": {}, "white": {}}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_records: dict[str, dict] = {}
        self.pending_white: list[str] = []

    def done(self, record_id: str) -> bool:
        return record_id in self.index["records"] or record_id in self.pending_records

    def has_white(self, bucket) -> bool:
        name = f"{bucket[0]}x{bucket[1]}"
        return name in self.index["white"] or name in self.pending_white

    def add(self, record_id: str, key, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.pending[f"{record_id}/{name}"] = t.detach().to("cpu").contiguous()
        self.pending_records[record_id] = {"key": _key_to_json(key), "tensors": sorted(tensors)}
        if len(self.pending_records) >= self.shard_records:
            self.flush()

    def add_white(self, bucket, latents: torch.Tensor) -> None:
        name = f"{bucket[0]}x{bucket[1]}"
        self.pending[f"white/{name}"] = latents.detach().to("cpu").contiguous()
        self.pending_white.append(name)

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"r{self.rank}-{len(self.index['shards']):05d}.safetensors"
        path = self.out / "shards" / shard
        with atomic_path(path) as tmp:
            save_file(self.pending, str(tmp))
        self.index["shards"][shard] = sha256(path)
        for rid, meta in self.pending_records.items():
            self.index["records"][rid] = {"shard": shard, **meta}
        for name in self.pending_white:
            self.index["white"][name] = shard
        write_json(self.index_path, self.index, indent=None)
        self.pending, self.pending_records, self.pending_white = {}, {}, []


class CacheReader:
    """Reads records of one or more cache folders; each shard's checksum is verified on first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        indexes = sorted(self.folder.glob(INDEX_GLOB))
        if not indexes:
            raise UserError(f"{self.folder}: not a training cache (no index-r*.json); build one with `editkit cache`")
        self.shards: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self.white: dict[str, str] = {}
        for path in indexes:
            try:
                index = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise UserError(f"{path}: damaged cache index; rerun `editkit cache` with the same --out") from None
            self.shards.update(index["shards"])
            self.records.update(index["records"])
            self.white.update(index["white"])
        self.ids = sorted(self.records)
        self._verified: set[str] = set()
        self._handles: dict[str, object] = {}
        meta = self.folder / "cache.json"
        self.manifest = json.loads(meta.read_text()) if meta.is_file() else {}

    def key(self, record_id: str) -> tuple:
        return _key_from_json(self.records[record_id]["key"])

    def _open(self, shard: str):
        if shard not in self._verified:
            path = self.folder / "shards" / shard
            if not path.is_file():
                raise UserError(f"{path}: cache shard missing; rerun `editkit cache` with the same --out to rebuild it")
            if sha256(path) != self.shards[shard]:
                raise UserError(f"{path}: checksum mismatch (the shard is damaged); delete it and its "
                                f"index entry, or rebuild the cache with `editkit cache`")
            self._verified.add(shard)
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def get(self, record_id: str) -> dict[str, torch.Tensor]:
        meta = self.records[record_id]
        f = self._open(meta["shard"])
        return {name: f.get_tensor(f"{record_id}/{name}") for name in meta["tensors"]}

    def white_latents(self, bucket) -> torch.Tensor | None:
        name = f"{bucket[0]}x{bucket[1]}"
        if name not in self.white:
            return None
        return self._open(self.white[name]).get_tensor(f"white/{name}")

    def verify(self) -> dict:
        """Check every shard's checksum and that every indexed tensor is present."""
        for shard in self.shards:
            self._open(shard)
        for rid, meta in self.records.items():
            keys = set(self._open(meta["shard"]).keys())
            missing = [n for n in meta["tensors"] if f"{rid}/{n}" not in keys]
            if missing:
                raise UserError(f"{self.folder}: record {rid!r} lacks {missing[0]} in shard {meta['shard']}; "
                                "rebuild the cache")
        return {"records": len(self.records), "shards": len(self.shards), "white": sorted(self.white)}


def build_cache(model_spec: str, manifest: str | Path, out_dir: str | Path, area: int, multiple: int = 32,
                max_ratio: float = 4.0, family: str | None = None, dtype: str = "bf16", device: str | None = None,
                shard_records: int = 64, progress: bool = True, model=None, batch_size: int = 16,
                **model_kwargs) -> dict:
    """Encode every record of `manifest` (this rank's share) into `out_dir`; skips what is done.

    Records of one shape key (target bucket, source sizes) are encoded `batch_size` at a time
    (`editkit.train.samples.encode_records`: one VLM pass for all their texts, one VAE pass per
    latent kind); batch_size=1 is the one-record-at-a-time path. The tensors are the same either
    way within float rounding.
    """
    from editkit.data import read_manifest
    from editkit.data.images import make_buckets
    from editkit.models import load_model
    from editkit.train.samples import encode_records, sample_key, white_latents
    from editkit.utils.dist import process_device, rank, shard
    from editkit.utils.progress import make_progress
    from editkit.utils.runinfo import write_run_manifest

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a number of records of at least 1")
    out = Path(out_dir)
    records = read_manifest(manifest)
    if model is None:
        model = load_model(model_spec, family=family, dtype=dtype, device=process_device(device), **model_kwargs)
    if multiple % model.size_multiple:
        raise UserError(f"--multiple {multiple}: must be a multiple of {model.size_multiple} for this model")
    try:
        buckets = make_buckets(area, multiple, max_ratio)
    except ValueError as err:
        raise UserError(f"--area {area} / --multiple {multiple}: {err}") from None
    writer = CacheWriter(out, rank(), shard_records)
    if rank() == 0:
        write_run_manifest(out, "cache", {"model": str(model_spec), "manifest": str(manifest), "area": area,
                                          "multiple": multiple, "max_ratio": max_ratio},
                           name="cache.json", family=model.family.name, latent_channels=model.latent_channels)
    mine = shard(records)
    todo = [r for r in mine if not writer.done(r.id)]
    skipped = len(mine) - len(todo)
    groups: dict[tuple, list] = {}  # shape key -> its records, in manifest order
    for record in todo:
        groups.setdefault(sample_key(model, record, buckets), []).append(record)
    with make_progress("records", disable=not progress) as bar:
        task = bar.add_task(f"cache (rank {rank()}, {skipped} done before)", total=len(todo), status="")
        for key, group in groups.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                for record, tensors in zip(chunk, encode_records(model, chunk, key[0])):
                    writer.add(record.id, key, tensors)
                if not writer.has_white(key[0]):
                    writer.add_white(key[0], white_latents(model, key[0]))
                bar.advance(task, len(chunk))
    writer.flush()
    return {"records": len(todo), "skipped": skipped, "out": str(out)}
