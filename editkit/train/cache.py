"""The training cache: per-record VLM embeddings and VAE latents, so training needs neither model.

Layout of a cache folder:
- `shards/r<rank>-<n>.safetensors`: tensors named `<record id>/<name>` (see editkit.train.samples)
  and `white/<w>x<h>` (white-image latents per bucket);
- `index-r<rank>.json`: what each rank wrote — shard sha256 checksums, and per record its shard,
  shape key (bucket, source sizes) and tensor names;
- `cache.json`: the run manifest (model, manifest, area and the other options, versions);
- `fingerprint.json` (editkit.utils.fingerprint): what the tensors were made from — the model
  folder, family, dtype, area, multiple, max_ratio, view sizes, the records and their files. A
  re-run with anything else is refused unless `--overwrite` (which rebuilds the cache).
Every rank (torchrun / accelerate) encodes its share of the records and writes only its own
shards and index; a shard is written atomically and then the index, so a killed job loses at
most the shard in progress and a rerun skips every record already indexed. Readers verify each
shard's sha256 before using it; `--repair` drops the records of bad shards from the indexes and
encodes them again.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from editkit.errors import UserError
from editkit.utils.atomic import atomic_path, write_json
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT_FILE
from editkit.utils.fingerprint import claim_folder, digest, folder_stamp, records_stamp

INDEX_GLOB = "index-r*.json"
CLI_DEFAULTS = {"area": 1024 * 1024, "multiple": 32, "max_ratio": 4.0, "dtype": "bf16"}
"""`editkit cache` option defaults: `fix_command` leaves these out of the command it prints."""
_CLI_FLAGS = (("area", "--area"), ("multiple", "--multiple"), ("max_ratio", "--max-ratio"), ("family", "--family"),
              ("dtype", "--dtype"), ("vae_image_size", "--vae-image-size"), ("vlm_image_size", "--vlm-image-size"))


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


def _empty_index(rank: int) -> dict:
    return {"rank": rank, "shards": {}, "records": {}, "white": {}}


def _is_record_meta(meta) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("shard"), str) and isinstance(meta.get("tensors"), list) \
        and "key" in meta


def read_index(path: Path) -> dict | None:
    """The index at `path`, or None when it is damaged (not JSON, or not shaped like an index)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or not all(isinstance(index.get(k), dict) for k in ("shards", "records", "white")):
        return None
    return index if all(_is_record_meta(m) for m in index["records"].values()) else None


def fix_command(folder: Path, flag: str = "--repair") -> str:
    """The `editkit cache` command that built `folder` (from its cache.json), with `flag` added."""
    try:
        config = json.loads((Path(folder) / "cache.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        config = None
    config = config if isinstance(config, dict) else {}
    args = ["editkit", "cache", "--model", str(config.get("model", "MODEL")),
            "--data", str(config.get("manifest", "MANIFEST")), "--out", str(folder)]
    for key, option in _CLI_FLAGS:
        value = config.get(key)
        if value is not None and value != CLI_DEFAULTS.get(key):
            args += [option, str(value)]
    fields = config.get("fields")
    for name, column in (fields.items() if isinstance(fields, dict) else ()):
        args += ["--field", f"{name}={column}"]
    return shlex.join([*args, flag])


def shard_problems(folder: Path, index: dict) -> dict[str, str]:
    """Every bad shard of one index -> why: missing, checksum mismatch, unreadable, or lacking tensors the
    index names (a shard named by records but not listed counts as missing)."""
    wanted: dict[str, list[str]] = {}
    for rid, meta in index["records"].items():
        wanted.setdefault(meta["shard"], []).extend(f"{rid}/{n}" for n in meta["tensors"])
    for name, shard in index["white"].items():
        wanted.setdefault(shard, []).append(f"white/{name}")
    bad = {}
    for shard in sorted(set(index["shards"]) | set(wanted)):
        path = Path(folder) / "shards" / shard
        if shard not in index["shards"] or not path.is_file():
            bad[shard] = "missing"
        elif sha256(path) != index["shards"][shard]:
            bad[shard] = "checksum mismatch"
        else:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
            except (SafetensorError, OSError) as err:
                bad[shard] = f"unreadable ({str(err).splitlines()[0] if str(err) else err.__class__.__name__})"
                continue
            lacking = [k for k in wanted.get(shard, []) if k not in keys]
            if lacking:
                bad[shard] = f"lacks {len(lacking)} indexed tensor(s), e.g. {lacking[0]}"
    return bad


def drop_shards(folder: Path, index: dict, bad) -> None:
    """Remove the `bad` shards (files and index entries) with the records they held."""
    index["records"] = {rid: m for rid, m in index["records"].items() if m["shard"] not in bad}
    index["shards"] = {s: c for s, c in index["shards"].items() if s not in bad}
    index["white"] = {n: s for n, s in index["white"].items() if s not in bad}
    for shard in bad:
        (Path(folder) / "shards" / shard).unlink(missing_ok=True)


def index_rank(path: Path) -> int | None:
    """The rank of an `index-r<rank>.json` file (None for another name)."""
    number = path.stem[len("index-r"):]
    return int(number) if number.isdigit() else None


def clear_rank(folder: Path, rank: int) -> None:
    """Delete one rank's index and shards."""
    (Path(folder) / f"index-r{rank}.json").unlink(missing_ok=True)
    for shard in (Path(folder) / "shards").glob(f"r{rank}-*.safetensors"):
        shard.unlink()


def _damaged_index(path: Path, folder: Path) -> UserError:
    return UserError(f"{path}: damaged cache index (not a valid index JSON); re-encode its records with "
                     f"`{fix_command(folder)}`, or rebuild the cache with --overwrite")


class CacheWriter:
    """Appends encoded records to this rank's shards; resumable.

    A damaged index is refused, or with `repair` its records are given up (its shards deleted: without
    their checksums they cannot be trusted) so that they are encoded again.
    """

    def __init__(self, out_dir: str | Path, rank: int = 0, shard_records: int = 64, repair: bool = False):
        self.out = Path(out_dir)
        self.rank = rank
        self.shard_records = shard_records
        self.index_path = self.out / f"index-r{rank}.json"
        self.index_was_damaged = False
        self.index = self._load(repair)
        self.elsewhere: set[str] = set()  # record ids in other ranks' indexes (done there)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_records: dict[str, dict] = {}
        self.pending_white: list[str] = []

    def _load(self, repair: bool) -> dict:
        if not self.index_path.is_file():
            return _empty_index(self.rank)
        index = read_index(self.index_path)
        if index is not None:
            return index
        if not repair:
            raise _damaged_index(self.index_path, self.out)
        clear_rank(self.out, self.rank)
        self.index_was_damaged = True
        return _empty_index(self.rank)

    def drop_bad_shards(self) -> dict[str, str]:
        """Give up this rank's bad shards (see `shard_problems`) and their records, so they are encoded again."""
        bad = shard_problems(self.out, self.index)
        if bad:
            drop_shards(self.out, self.index, bad)
            write_json(self.index_path, self.index, indent=None)
        return bad

    def done(self, record_id: str) -> bool:
        return record_id in self.index["records"] or record_id in self.pending_records or record_id in self.elsewhere

    def buckets_without_white(self, white_elsewhere=(), also=()) -> list[tuple[int, int]]:
        """Buckets of this rank's records (and of the record metas `also`) whose white latents no index
        holds (e.g. lost with a repaired shard)."""
        have = {*self.index["white"], *self.pending_white, *white_elsewhere}
        metas = [*self.index["records"].values(), *self.pending_records.values(), *also]
        return sorted({tuple(m["key"][0]) for m in metas} - {tuple(map(int, n.split("x"))) for n in have})

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

    def _next_shard(self) -> str:
        """One past the highest shard number in the index (a repair leaves gaps; a name is never reused live)."""
        numbers = [int(s.rsplit("-", 1)[1].split(".")[0]) for s in self.index["shards"]]
        return f"r{self.rank}-{max(numbers, default=-1) + 1:05d}.safetensors"

    def flush(self) -> None:
        if not self.pending:
            return
        shard = self._next_shard()
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


def _read_cache_json(folder: Path) -> dict:
    path = folder / "cache.json"
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: damaged (not the JSON `editkit cache` writes); run `editkit cache` again with the "
                        "options the cache was built with and --repair, which rewrites it")
    return manifest


class CacheReader:
    """Reads records of one or more cache folders; each shard's checksum is verified on first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        paths = sorted(self.folder.glob(INDEX_GLOB))
        if not paths:
            raise UserError(f"{self.folder}: not a training cache (no index-r*.json); build one with `editkit cache`")
        self.shards: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self.white: dict[str, str] = {}
        self.indexes: dict[Path, dict] = {}
        for path in paths:
            index = read_index(path)
            if index is None:
                raise _damaged_index(path, self.folder)
            self.indexes[path] = index
            self.shards.update(index["shards"])
            self.records.update(index["records"])
            self.white.update(index["white"])
        self.ids = sorted(self.records)
        self._verified: set[str] = set()
        self._handles: dict[str, object] = {}
        self.manifest = _read_cache_json(self.folder)

    def key(self, record_id: str) -> tuple:
        return _key_from_json(self.records[record_id]["key"])

    def _open(self, shard: str):
        if shard not in self._verified:
            path = self.folder / "shards" / shard
            if not path.is_file():
                raise UserError(f"{path}: cache shard missing; re-encode its records with `{fix_command(self.folder)}`")
            if sha256(path) != self.shards[shard]:
                raise UserError(f"{path}: checksum mismatch (the shard is damaged); re-encode its records with "
                                f"`{fix_command(self.folder)}`")
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

    def problems(self) -> list[dict]:
        """Every bad shard of every index: {index, shard, reason, records (ids it held)}."""
        found = []
        for path, index in self.indexes.items():
            for shard, reason in shard_problems(self.folder, index).items():
                ids = sorted(rid for rid, meta in index["records"].items() if meta["shard"] == shard)
                found.append({"index": path.name, "shard": shard, "reason": reason, "records": ids})
        return found

    def verify(self) -> dict:
        """Check every shard's checksum and that every indexed tensor is present; a UserError names the
        first problem, how many there are, and the command that repairs them."""
        found = self.problems()
        if found:
            first = found[0]
            more = f" (and {len(found) - 1} more bad shard(s))" if len(found) > 1 else ""
            raise UserError(f"{self.folder / 'shards' / first['shard']}: {first['reason']}{more}; re-encode their "
                            f"records with `{fix_command(self.folder)}`")
        return {"records": len(self.records), "shards": len(self.shards), "white": sorted(self.white)}


def cache_inputs(model_spec, model, records, family: str | None, dtype: str, area: int, multiple: int,
                 max_ratio: float, model_kwargs: dict) -> dict:
    """What the cached tensors depend on (editkit.utils.fingerprint): the model folder and how it is loaded
    (a model passed in: its family, dtype and view sizes), the buckets, and the records with their files
    and every text that is encoded."""
    from editkit.models.loading import COMPONENT_OPTIONS

    if model is None:  # components from other folders (vae=, text_encoder=) by content
        encoder = {"family": family, "dtype": dtype,
                   "options": {k: folder_stamp(v) if k in COMPONENT_OPTIONS else v
                               for k, v in sorted(model_kwargs.items()) if v is not None}}
    else:
        encoder = {"family": model.family.name, "dtype": str(model.dtype),
                   "views": [model.vae_image_area, model.vlm_image_area]}
    texts = [[r.id, r.instruction_cn, r.inverse_instruction, r.inverse_instruction_cn] for r in records]
    return {"model": folder_stamp(model_spec), **encoder, "area": area, "multiple": multiple,
            "max_ratio": max_ratio, "records": records_stamp(records), "texts": digest({"texts": texts})}


def claim_cache(out: Path, inputs: dict, overwrite: bool, write: bool) -> None:
    """Refuse a folder holding a cache of other inputs (or one without a fingerprint) unless `overwrite`.

    With `overwrite` and `write`, this rank's shards and index are deleted (rank 0 also deletes those of
    ranks beyond this job's world size): each process clears only its own files, so ranks need not wait
    for each other.
    """
    from editkit.utils.dist import rank, world_size

    if not overwrite and not (out / FINGERPRINT_FILE).is_file() and any(out.glob(INDEX_GLOB)):
        raise UserError(f"{out}: holds a cache without {FINGERPRINT_FILE} (made by an older editkit); pass "
                        "--overwrite to rebuild it, or choose a new --out")
    if overwrite and write:
        clear_rank(out, rank())
        if rank() == 0:
            for number in map(index_rank, out.glob(INDEX_GLOB)):
                if number is not None and number >= world_size():
                    clear_rank(out, number)
    claim_folder(out, "cache", inputs, overwrite=overwrite, write=write)


def _other_indexes(out: Path, repair: bool) -> tuple[dict[Path, dict], dict[Path, dict[str, str]]]:
    """The readable indexes of other ranks; rank 0 with `repair` also mends those of ranks beyond this
    job's world size (a cache built by more processes). Returns them and, per mended index, the shards
    it dropped (the index name for a damaged one)."""
    from editkit.utils.dist import rank, world_size

    others, dropped = {}, {}
    for path in sorted(out.glob(INDEX_GLOB)):
        number = index_rank(path)
        if number is None or number == rank():
            continue
        index = read_index(path)
        mine = repair and rank() == 0 and number >= world_size()
        if index is None and mine:
            clear_rank(out, number)
            dropped[path] = {path.name: "damaged index"}
            continue
        if index is None:
            continue
        if mine:
            bad = shard_problems(out, index)
            if bad:
                drop_shards(out, index, bad)
                write_json(path, index, indent=None)
                dropped[path] = bad
        others[path] = index
    return others, dropped


def _load(record, load, skip_bad: bool, bad: list, writer: CacheWriter):
    """`load()` for one record with the shared semantics (editkit.data.bad_records.load_record): a UserError
    stops the run with one line naming the record — after the writer keeps what is encoded, so a re-run
    resumes — or, with `skip_bad`, the record goes to `bad` and None is returned."""
    from editkit.data.bad_records import load_record

    try:
        return load_record(record, load, skip_bad, bad)
    except UserError:
        writer.flush()
        raise


def _encoded(model, chunk, bucket, skip_bad: bool, bad: list, writer: CacheWriter):
    """(record, tensors) of a chunk encoded together; when some record's files fail, one by one."""
    from editkit.train.samples import encode_records

    try:
        yield from zip(chunk, encode_records(model, chunk, bucket))
        return
    except UserError:
        pass  # find which record fails
    for record in chunk:
        tensors = _load(record, lambda: encode_records(model, [record], bucket)[0], skip_bad, bad, writer)
        if tensors is not None:
            yield record, tensors


def build_cache(model_spec: str, manifest: str | Path, out_dir: str | Path, area: int, multiple: int = 32,
                max_ratio: float = 4.0, family: str | None = None, dtype: str = "bf16", device: str | None = None,
                shard_records: int = 64, progress: bool = True, model=None, batch_size: int = 16,
                fields: dict[str, str] | None = None, overwrite: bool = False, repair: bool = False,
                skip_bad: bool = False, speed=None, **model_kwargs) -> dict:
    """Encode every record of `manifest` (this rank's share) into `out_dir`; skips what is done.

    Records of one shape key (target bucket, source sizes) are encoded `batch_size` at a time
    (`editkit.train.samples.encode_records`: one VLM pass for all their texts, one VAE pass per
    latent kind); batch_size=1 is the one-record-at-a-time path. The tensors are the same either
    way within float rounding.

    A folder holding a cache of other inputs (`cache_inputs`) is refused; `overwrite` rebuilds it.
    `repair` drops the records of bad shards (and of a damaged index) and encodes exactly those
    again. A record whose images cannot be read stops the run with one line naming it (finished
    shards are kept); with `skip_bad` it is left out and listed in the result's "bad".

    `speed` (`editkit.infer.speed.SpeedOptions`) applies what concerns the VLM and VAE (offload) to
    the model this loads; it does not change the tensors, so it is not in the fingerprint.
    """
    from editkit.data import read_manifest
    from editkit.data.images import make_buckets
    from editkit.models import load_model
    from editkit.train.samples import sample_key, white_latents
    from editkit.utils.dist import rank, resolve_device, shard
    from editkit.utils.progress import make_progress
    from editkit.utils.runinfo import write_run_manifest

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a number of records of at least 1")
    if overwrite and repair:
        raise UserError("--repair and --overwrite: --repair mends this cache, --overwrite rebuilds it; give one")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the cache")
    device = resolve_device(device) if model is None else device
    records = read_manifest(manifest, fields=fields)
    try:
        buckets = make_buckets(area, multiple, max_ratio)
    except ValueError as err:
        raise UserError(f"--area {area} / --multiple {multiple}: {err}") from None
    inputs = cache_inputs(model_spec, model, records, family, dtype, area, multiple, max_ratio, model_kwargs)
    claim_cache(out, inputs, overwrite, write=False)  # refuse before the (slow) model load
    if model is None:
        from editkit.models import accel

        model = load_model(model_spec, family=family, dtype=dtype, device=device, **model_kwargs)
        if speed is not None and speed.offload is not None:  # nothing else applies to the VLM and VAE
            accel.apply_accel(model, speed.encoder_accel())
    if multiple % model.size_multiple:
        raise UserError(f"--multiple {multiple}: must be a multiple of {model.size_multiple} for this model")
    claim_cache(out, inputs, overwrite, write=True)
    writer = CacheWriter(out, rank(), shard_records, repair=repair)
    repaired = writer.drop_bad_shards() if repair else {}
    if writer.index_was_damaged:
        repaired[writer.index_path.name] = "damaged index"
    others, mended = _other_indexes(out, repair) if not overwrite else ({}, {})
    for bad_shards in mended.values():
        repaired.update(bad_shards)
    writer.elsewhere = {rid for index in others.values() for rid in index["records"]}
    if rank() == 0:
        write_run_manifest(out, "cache", {"model": str(model_spec), "manifest": str(manifest), "area": area,
                                          "multiple": multiple, "max_ratio": max_ratio, "family": family,
                                          "dtype": dtype, "fields": fields or {}, **model_kwargs,
                                          **({"offload": speed.offload} if speed is not None else {})},
                           name="cache.json", family=model.family.name, latent_channels=model.latent_channels)
    mine = shard(records)
    todo = [r for r in mine if not writer.done(r.id)]
    skipped = len(mine) - len(todo)
    bad: list = []  # editkit.data.bad_records.BadRecord of the records left out (skip_bad)
    groups: dict[tuple, list] = {}  # shape key -> its records, in manifest order
    for record in todo:
        key = _load(record, lambda: sample_key(model, record, buckets), skip_bad, bad, writer)
        if key is not None:
            groups.setdefault(key, []).append(record)
    encoded = 0
    with make_progress("records", disable=not progress) as bar:
        task = bar.add_task(f"cache (rank {rank()}, {skipped} done before)", total=sum(map(len, groups.values())),
                            status="")
        for key, group in groups.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                for record, tensors in _encoded(model, chunk, key[0], skip_bad, bad, writer):
                    writer.add(record.id, key, tensors)
                    encoded += 1
                bar.advance(task, len(chunk))
        white_elsewhere = {name for index in others.values() for name in index["white"]}
        also = [meta for path in mended if path in others for meta in others[path]["records"].values()]
        for bucket in writer.buckets_without_white(white_elsewhere, also):
            writer.add_white(bucket, white_latents(model, bucket))
    writer.flush()
    return {"records": encoded, "skipped": skipped, "bad": bad, "repaired": repaired, "out": str(out)}
