"""Training checkpoints: full state, written atomically, the last K kept, `latest` found again.

A checkpoint folder `checkpoints/step-000123/` holds
- `trainable.safetensors`: the trainable weights (LoRA or full), names as in the unwrapped model;
- `optimizer.pt`, `scheduler.pt`: their state dicts (torch.save; read with weights_only=True);
- `rng.pt`: the RNG states of every rank (python, numpy, torch CPU/CUDA, the trainer's generator);
- `state.json`: step, the data sampler's position and anything else the trainer records;
- `optimizer_shards/` (sharded runs only, FSDP2 / DeepSpeed): every rank's part of the optimiser
  state, written by all ranks (editkit.train.sharded); `optimizer.pt` is then empty.
The folder is written beside its final name and renamed (utils.atomic), so a killed run leaves
only complete checkpoints. Sharded runs fill the staging folder `.staging-step-NNNNNN` from every
rank first; the main process adds the rest and renames it.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from editkit.errors import UserError
from editkit.utils.atomic import atomic_dir, replace_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def step_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, rng_states: list[dict], state: dict, keep_last: int,
                    extra_files: dict[str, callable] | None = None, staging: Path | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    extra_files maps a file name to a function that writes it given its path (LoRA exports).
    staging: a folder (staging_dir) other ranks have already written their parts into.
    """
    dest = Path(root) / f"step-{step:06d}"
    with (_staged(staging, dest) if staging is not None else atomic_dir(dest)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    for old in step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def staging_dir(root: str | Path, step: int) -> Path:
    """Where every rank of a sharded run writes its part of checkpoint `step` before the rename."""
    return Path(root) / f".staging-step-{step:06d}"


def empty_dir(path: Path) -> None:
    """Make `path` an empty folder (the main process, before the ranks write into a staging folder)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


@contextlib.contextmanager
def _staged(staging: Path, dest: Path):
    try:
        yield staging
        replace_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(root: str | Path) -> None:
    """Drop what a run killed while saving left behind."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob(".staging-step-*"):
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path) -> dict:
    """All parts of a checkpoint folder (tensors on the CPU)."""
    path = Path(path)
    needed = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)}); pick another step")
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
        "rng": torch.load(path / "rng.pt", weights_only=True, map_location="cpu"),
        "state": json.loads((path / "state.json").read_text()),
    }


def resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    """`--resume latest` (None if there is nothing yet), or an explicit checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoints)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found; give a step-NNNNNN folder or 'latest'")
    return path
