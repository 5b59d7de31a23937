"""Edit a whole dataset: one output folder per CFG value, sharded by rank, resumable.

Layout: `<out>/cfg-<value>/<record id>.png` (PNG settings chunk included) and a run manifest
per CFG folder (`run.json`, or `run-rank<r>.json` when several processes share the folder).
Each process (torchrun / `accelerate launch`) takes every world-size-th record; an output that
exists is skipped, and outputs are written atomically, so a killed run restarted with the same
arguments finishes the same images it would have made uninterrupted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from editkit.errors import UserError
from editkit.infer.engine import EditRequest, Engine
from editkit.infer.outputs import save_png
from editkit.utils import dist
from editkit.utils.progress import make_progress
from editkit.utils.runinfo import write_run_manifest

log = logging.getLogger(__name__)


@dataclass
class DatasetRunConfig:
    cfgs: Sequence[float] = (4.0,)
    steps: int = 40
    seed: int = 0
    negative_prompt: str | None = " "
    fusion: str = "off"
    feather: int = 8
    sampler: str = "flow"
    width: int | None = None
    height: int | None = None
    batch_size: int = 4
    window: int = 8
    """Records loaded at once (in batches), so requests of one shape can be grouped."""


@dataclass
class DatasetRunResult:
    written: list[Path] = field(default_factory=list)
    skipped: int = 0
    without_mask: int = 0


def cfg_folder(out_dir: str | os.PathLike, cfg: float) -> Path:
    return Path(out_dir) / f"cfg-{float(cfg)}"


def output_path(folder: Path, record_id: str) -> Path:
    """`<folder>/<id>.png`; ids with '/' make subfolders, ids that would leave the folder are refused."""
    rel = PurePosixPath(f"{record_id}.png")
    if not record_id or rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"record id {record_id!r} cannot name an output file; use ids without '..' or a leading '/'")
    return folder.joinpath(*rel.parts)


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
                show_progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> DatasetRunResult:
    """Edit this process's share of `records` at every CFG value of `config`; see the module docstring."""
    from editkit.data.images import load_image, load_mask

    out_dir = Path(out_dir)
    mine = dist.shard(list(records))
    result = DatasetRunResult()
    todo = []
    for cfg in config.cfgs:
        folder = cfg_folder(out_dir, cfg)
        folder.mkdir(parents=True, exist_ok=True)
        _write_manifest(engine, folder, cfg, config, len(records))
        for record in mine:
            path = output_path(folder, record.id)
            _remove_stale_temp_files(path)
            if path.exists():
                result.skipped += 1
            else:
                todo.append((cfg, record, path))
    if result.skipped:
        log.info("skipping %d finished output(s) in %s", result.skipped, out_dir)

    def request(cfg, record) -> EditRequest:
        use_mask = config.fusion != "off" and record.mask is not None
        if config.fusion != "off" and not use_mask:
            result.without_mask += 1
        return EditRequest(
            prompt=record.instruction, images=[load_image(p) for p in record.sources],
            negative_prompt=config.negative_prompt, true_cfg_scale=cfg, steps=config.steps, seed=config.seed,
            width=config.width, height=config.height, sampler=config.sampler, feather=config.feather,
            fusion=config.fusion if use_mask else "off", mask=load_mask(record.mask) if use_mask else None)

    window = max(1, config.window) * max(1, config.batch_size)
    with make_progress("img", disable=not show_progress) as progress:
        task = progress.add_task(f"infer rank {dist.rank()}/{dist.world_size()}", total=len(todo),
                                 status=f"skipped {result.skipped}" if result.skipped else "")
        for start in range(0, len(todo), window):
            chunk = todo[start:start + window]
            requests = [request(cfg, record) for cfg, record, _ in chunk]
            for batch in engine.group(requests, config.batch_size):
                images = engine.edit([requests[i] for i in batch], max_batch=config.batch_size)
                for i, image in zip(batch, images):
                    cfg, record, path = chunk[i]
                    save_png(path, image, {**engine.settings(requests[i]), "id": record.id})
                    result.written.append(path)
                    progress.advance(task)
                    if on_saved is not None:
                        on_saved(path)
    if result.without_mask:
        log.warning("%d request(s) had no mask: saved without %s fusion", result.without_mask, config.fusion)
    return result


def _remove_stale_temp_files(path: Path) -> None:
    """Drop what a killed write of `path` left behind (only this process writes this record's files)."""
    for stale in path.parent.glob(f".tmp-{path.name}.????????{path.suffix}"):  # atomic_path's mkstemp name
        stale.unlink(missing_ok=True)


def _write_manifest(engine: Engine, folder: Path, cfg: float, config: DatasetRunConfig, total: int) -> None:
    name = "run.json" if dist.world_size() == 1 else f"run-rank{dist.rank()}.json"
    settings = {k: v for k, v in vars(config).items() if k != "cfgs"}
    write_run_manifest(folder, "infer", {**settings, "true_cfg_scale": cfg, "model": engine.model_name,
                                         "family": engine.model.family.name,
                                         "lora": [[s.path, s.scale] for s in engine.loras]},
                       seed=config.seed, name=name, records=total, rank=dist.rank(), world_size=dist.world_size())
