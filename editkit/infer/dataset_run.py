"""Edit a whole dataset: one output folder per CFG value, sharded by rank, resumable.

Layout: `<out>/cfg-<value>/<record id>.png` (PNG settings chunk included) and a run manifest
per CFG folder (`run.json`, or `run-rank<r>.json` when several processes share the folder).
Each process (torchrun / `accelerate launch`) takes every world-size-th record; an output that
exists is skipped, and outputs are written atomically, so a killed run restarted with the same
arguments finishes the same images it would have made uninterrupted.

Each record draws its noise from its own seed, `record_seed(seed, record.id)`: the blake2b hash
of "<seed>:<record id>" (8 bytes, big-endian, top bit cleared: 0..2**63-1). A record's image
therefore depends on the base seed and its id only, not on its place in the manifest, the shard
that runs it or the batch it lands in, so a resumed or resharded run makes the same images. The
PNG records the record's seed (`seed`, what `editkit edit --seed` takes to redo it) and the base
seed; the run manifest the rule. `same_seed=True` gives every record the base seed itself (the
behaviour before per-record seeds; folders made that way keep their fingerprint).

Resuming is safe only when the images on disk came from the same settings, so each CFG folder
keeps a fingerprint (`editkit.utils.fingerprint.claim_folder`) of everything that decides its
images: the sampling settings, the model, LoRA files and scales, and the records with their files.
A re-run with other ones is refused unless `overwrite=True`, which removes the old images first.
Every rank computes the same fingerprint from all the records; rank 0 writes it, and with
`overwrite` each rank removes only its own records' images (rank 0 also images of no record).

A record that cannot be used (missing or corrupt image, bad mask) stops the run with one line
naming it (`record.origin or record.id`); with `skip_bad=True` it is reported and the run goes
on (`editkit.data.bad_records`: the same semantics serve other record jobs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from editkit.data.bad_records import BadRecord, load_record, record_name
from editkit.errors import UserError
from editkit.infer import defaults
from editkit.infer.engine import MAX_SEED, EditRequest, Engine, check_cfg, check_mask_size, check_sampling, check_side
from editkit.infer.fusion import check_mode
from editkit.infer.outputs import save_png
from editkit.utils import dist
from editkit.utils.atomic import remove_stale_temp
from editkit.utils.fingerprint import claim_folder, folder_stamp, records_stamp
from editkit.utils.progress import make_progress
from editkit.utils.runinfo import write_run_manifest

log = logging.getLogger(__name__)
RUN_MANIFEST = "run.json"
SEED_RULE = "per-record: blake2b('<seed>:<record id>', 8 bytes) & (2**63-1)"
"""How each record's seed derives from the base seed (recorded in run manifests and fingerprints)."""


def record_seed(seed: int, record_id: str) -> int:
    """The noise seed of one record: a stable hash of the base seed and the record id, 0..2**63-1."""
    digest = hashlib.blake2b(f"{seed}:{record_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_SEED


@dataclass
class DatasetRunConfig:
    cfgs: Sequence[float] | None = None
    """Guidance scales, one output folder each (None: the model family's default)."""
    steps: int | None = None
    """None: the model family's default."""
    seed: int = 0
    """The base seed: each record samples with `record_seed(seed, record.id)`."""
    same_seed: bool = False
    """Every record with `seed` itself (as before per-record seeds)."""
    negative_prompt: str | None = defaults.NEGATIVE_PROMPT
    fusion: str = "off"
    feather: int = 8
    sampler: str = "flow"
    width: int | None = None
    height: int | None = None
    batch_size: int = 4
    window: int = 8
    """Records loaded at once (in batches), so requests of one shape can be grouped."""
    preset: str | None = None
    """The sampling preset (`editkit.models.lightning`) whose scheduler the engine's model samples with."""
    speed: dict = field(default_factory=dict)
    """The speed switches (`editkit.infer.speed.SpeedOptions.settings`), for the run manifest."""
    image_cfg: float | None = None
    """Image guidance of families that have one (None: the family's default)."""
    components: dict = field(default_factory=dict)
    """Model components taken from other folders (`load_model`'s `vae=`, `text_encoder=`): name -> folder."""

    def with_family_defaults(self, sampling) -> DatasetRunConfig:
        """The settings left open filled in from a family's `SamplingDefaults`."""
        return dataclasses.replace(self, cfgs=self.cfgs or [sampling.cfg],
                                   steps=sampling.steps if self.steps is None else self.steps,
                                   image_cfg=sampling.image_cfg if self.image_cfg is None else self.image_cfg)

    def check(self) -> DatasetRunConfig:
        """UserError for a setting no run can use (sizes against the model: `Engine.check_size`)."""
        if self.cfgs is not None and not self.cfgs:
            raise UserError("--cfg is empty; give at least one value, e.g. 4")
        folders = [cfg_folder(".", cfg).name for cfg in self.cfgs or ()]
        if len(set(folders)) < len(folders):
            raise UserError(f"--cfg lists a value twice ({', '.join(folders)}); give each value once")
        for cfg in self.cfgs or ():
            check_cfg(cfg)
        check_cfg(self.image_cfg, "--image-cfg")
        check_sampling(self.steps, self.seed, self.sampler, self.feather)
        check_mode(self.fusion)
        check_side(self.width, "--width")
        check_side(self.height, "--height")
        if self.batch_size < 1 or self.window < 1:
            raise UserError(f"--batch-size {self.batch_size}: use 1 or more requests per batch")
        return self

    def fingerprint(self, cfg: float) -> dict:
        """The settings that decide the images of one CFG folder (batching changes only rounding, the
        lossless speed switches only bf16 rounding). The preset, the lossy speed switches and the
        components from other folders (by their files' stamps) appear only when set, so folders made
        before they existed keep their fingerprint."""
        from editkit.infer.speed import SpeedOptions

        settings = {k: v for k, v in vars(self).items()
                    if k not in ("cfgs", "batch_size", "window", "preset", "speed", "same_seed", "components")
                    and not (k == "image_cfg" and v is None)}
        preset = {"preset": self.preset} if self.preset else {}
        components = {"components": {name: [folder, folder_stamp(folder)] for name, folder in self.components.items()}
                      } if self.components else {}
        return {**settings, **preset, **SpeedOptions(**self.speed).lossy(), **self.seed_settings(), **components,
                "true_cfg_scale": float(cfg)}

    def seed_settings(self) -> dict:
        """The seed rule, for fingerprints and run manifests (absent with `same_seed`: the old rule)."""
        return {} if self.same_seed else {"seeds": SEED_RULE}

    def seed_of(self, record) -> int:
        return self.seed if self.same_seed else record_seed(self.seed, record.id)


@dataclass
class DatasetRunResult:
    written: list[Path] = field(default_factory=list)
    skipped: int = 0
    without_mask: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    """Records left out with `skip_bad` (each once, whatever the number of CFG values)."""


def cfg_folder(out_dir: str | os.PathLike, cfg: float) -> Path:
    return Path(out_dir) / f"cfg-{float(cfg)}"


def output_path(folder: Path, record_id: str) -> Path:
    """`<folder>/<id>.png`; ids with '/' make subfolders, ids that would leave the folder are refused."""
    rel = PurePosixPath(f"{record_id}.png")
    if not record_id or rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"record id {record_id!r} cannot name an output file; use ids without '..' or a leading '/'")
    return folder.joinpath(*rel.parts)


def check_out_folder(out_dir: str | os.PathLike) -> Path:
    """The output folder of a run: a folder or a path to create, not an existing file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; infer writes a folder (cfg-<value>/<id>.png), give a folder path")
    return out_dir


def parse_cfgs(text: str) -> list[float]:
    """'2.5,4,5.5' -> [2.5, 4.0, 5.5]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--cfg {text!r}: write numbers separated by commas, e.g. 2.5,4,5.5") from None
    if not values:
        raise UserError("--cfg is empty; give at least one value, e.g. 4")
    return values


def run_dataset(engine: Engine, records: Sequence, out_dir: str | os.PathLike, config: DatasetRunConfig,
                show_progress: bool = True, on_saved: Callable[[Path], None] | None = None,
                overwrite: bool = False, skip_bad: bool = False) -> DatasetRunResult:
    """Edit this process's share of `records` at every CFG value of `config`; see the module docstring."""
    out_dir = check_out_folder(out_dir)
    records = list(records)
    if not records:
        raise UserError("no records to edit: the manifest is empty")
    config = config.with_family_defaults(engine.model.family.sampling).check()
    engine.check_size(config.width, config.height)
    mine = dist.shard(records)
    inputs = {**engine.fingerprint(), "records": records_stamp(records)}
    folders = {cfg: cfg_folder(out_dir, cfg) for cfg in config.cfgs}
    for cfg, folder in folders.items():  # every folder is checked before any is touched
        claim_folder(folder, "infer", {**config.fingerprint(cfg), **inputs}, overwrite=overwrite,
                     write=dist.rank() == 0)
    result = DatasetRunResult()
    todo = []
    for cfg, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear_outputs(folder, mine, records)
        _write_manifest(engine, folder, cfg, config, len(records))
        for record in mine:
            path = output_path(folder, record.id)
            remove_stale_temp(path)
            if path.exists():
                result.skipped += 1
            else:
                todo.append((cfg, record, path))
    if result.skipped:
        log.info("skipping %d finished output(s) in %s", result.skipped, out_dir)

    window = config.window * config.batch_size
    bad_ids: set[str] = set()
    with make_progress("img", disable=not show_progress) as progress:
        task = progress.add_task(f"infer rank {dist.rank()}/{dist.world_size()}", total=len(todo),
                                 status=f"skipped {result.skipped}" if result.skipped else "")
        for start in range(0, len(todo), window):
            chunk, requests = [], []
            for cfg, record, path in todo[start:start + window]:
                request = None
                if record.id not in bad_ids:  # a bad record is reported once, not once per CFG value
                    takes_mask = engine.takes_mask()
                    request = load_record(record, lambda: _request(record, cfg, config, result, takes_mask),
                                          skip_bad, result.bad)
                if request is None:
                    bad_ids.add(record.id)
                    progress.advance(task)
                    continue
                chunk.append((record, path))
                requests.append(request)
            for batch in engine.group(requests, config.batch_size):
                images = engine.edit([requests[i] for i in batch], max_batch=config.batch_size)
                for i, image in zip(batch, images):
                    record, path = chunk[i]
                    save_png(path, image, {**engine.settings(requests[i]), "id": record.id, "base_seed": config.seed})
                    result.written.append(path)
                    progress.advance(task)
                    if on_saved is not None:
                        on_saved(path)
    if result.without_mask:
        log.warning("%d request(s) had no mask: saved without %s fusion", result.without_mask, config.fusion)
    if result.bad:
        for cfg, folder in folders.items():
            _write_manifest(engine, folder, cfg, config, len(records), result.bad)
    return result


def _request(record, cfg: float, config: DatasetRunConfig, result: DatasetRunResult,
             takes_mask: bool = False) -> EditRequest:
    """The checked request of one record at one CFG value (its images loaded; UserError if it cannot be);
    `takes_mask`: the model reads the record's mask itself (Flux Fill), not only for fusion."""
    from editkit.data.images import load_image, load_mask

    use_mask = record.mask is not None and (config.fusion != "off" or takes_mask)
    images = [load_image(p, "keep") for p in record.sources]  # the engine gives them the model's mode
    mask = load_mask(record.mask) if use_mask else None
    if mask is not None and images:
        check_mask_size(mask.size, images[0].size, f"mask {record.mask}")
    if config.fusion != "off" and not use_mask:
        result.without_mask += 1
    return EditRequest(
        prompt=record.instruction, images=images, negative_prompt=config.negative_prompt, true_cfg_scale=cfg,
        steps=config.steps, seed=config.seed_of(record), width=config.width, height=config.height,
        sampler=config.sampler,
        feather=config.feather, fusion=config.fusion if use_mask else "off", mask=mask, image_cfg=config.image_cfg,
        label=f"record {record_name(record)}").check()


def _manifest_name(rank: int, world: int) -> str:
    return RUN_MANIFEST if world == 1 else f"run-rank{rank}.json"


def _clear_outputs(folder: Path, mine: Sequence, records: Sequence) -> None:
    """Remove this rank's records' images and run manifest; rank 0 also images of no record and the
    manifests of ranks this run does not have. No two ranks remove the same file."""
    for record in mine:
        output_path(folder, record.id).unlink(missing_ok=True)
    (folder / _manifest_name(dist.rank(), dist.world_size())).unlink(missing_ok=True)
    if dist.rank() != 0:
        return
    expected = {output_path(folder, r.id) for r in records}
    for png in folder.rglob("*.png"):
        if png not in expected and not png.name.startswith(".tmp-"):
            png.unlink()
    manifests = {_manifest_name(r, dist.world_size()) for r in range(dist.world_size())}
    for old in [folder / RUN_MANIFEST, *folder.glob("run-rank*.json")]:
        if old.name not in manifests:
            old.unlink(missing_ok=True)


def _write_manifest(engine: Engine, folder: Path, cfg: float, config: DatasetRunConfig, total: int,
                    bad: Sequence[BadRecord] = ()) -> None:
    settings = {**{k: v for k, v in vars(config).items() if k != "cfgs"}, **config.seed_settings()}
    extra = {"bad_records": [{"record": b.name, "problem": b.problem} for b in bad]} if bad else {}
    write_run_manifest(folder, "infer", {**settings, "true_cfg_scale": cfg, "model": engine.model_name,
                                         "transformer": engine.transformer_name,
                                         "family": engine.model.family.name,
                                         "lora": [[s.path, s.scale] for s in engine.loras],
                                         **engine.adapter_settings()},
                       seed=config.seed, name=_manifest_name(dist.rank(), dist.world_size()), records=total,
                       rank=dist.rank(), world_size=dist.world_size(), **extra)
