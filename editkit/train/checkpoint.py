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
rank first; the main process adds the rest and renames it. What a killed save leaves behind
(`.tmp-*`, `.staging-step-*`) is removed when the run starts again (`remove_stale_temp`).
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
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT
from editkit.utils.fingerprint import file_digest

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
        sums = {name: file_digest(tmp / name) for name in _NEEDED if name != "state.json"}
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, "sha256": sums}, indent=2, default=str))
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


# what a run writes into its output folder (besides config.yaml, rewritten at every start)
RUN_OUTPUTS = ("checkpoints", "final", "previews", "tensorboard", "wandb", "metrics.csv", "run.json", FINGERPRINT)
_TEMP_GLOBS = ((".", ".tmp-*"), ("checkpoints", ".tmp-*"), ("checkpoints", ".staging-step-*"), ("previews", ".tmp-*"))


def earlier_outputs(run_dir: str | Path) -> list[str]:
    """The names of RUN_OUTPUTS that run_dir already holds."""
    return [name for name in RUN_OUTPUTS if (Path(run_dir) / name).exists()]


def clear_outputs(run_dir: str | Path) -> None:
    """Delete a previous run's outputs (RUN_OUTPUTS and temporary files) from run_dir, nothing else."""
    run_dir = Path(run_dir)
    remove_stale_temp(run_dir)
    for name in earlier_outputs(run_dir):
        _remove(run_dir / name)


def remove_stale_temp(run_dir: str | Path) -> None:
    """Drop what a run killed while writing left behind: temporary checkpoint, final/, metrics and
    preview files (`.tmp-*`) and the staging folders of sharded saves."""
    run_dir = Path(run_dir)
    for folder, pattern in _TEMP_GLOBS:
        for stale in (run_dir / folder).glob(pattern):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_NEEDED = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def read_state(path: str | Path) -> dict:
    """state.json of a complete checkpoint folder (step, sampler, fingerprint, ...)."""
    path = Path(path)
    missing = [n for n in _NEEDED if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)}); pick another step")
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError too
        raise UserError(f"{path / 'state.json'}: damaged checkpoint state; resume from another step "
                        "(--resume PATH/step-NNNNNN) or start again with --overwrite") from None
    return state


def load_checkpoint(path: str | Path) -> dict:
    """All parts of a checkpoint folder (tensors on the CPU), each checked against the sha256 that
    state.json recorded when it was written (a flipped byte would otherwise resume silently)."""
    path = Path(path)
    state = read_state(path)
    for name, expected in state.get("sha256", {}).items():
        if file_digest(path / name) != expected:
            raise _damaged(path / name)
    loaders = {"trainable": ("trainable.safetensors", lambda f: load_file(str(f))),
               "optimizer": ("optimizer.pt", _torch_load), "scheduler": ("scheduler.pt", _torch_load),
               "rng": ("rng.pt", _torch_load)}
    out = {"state": state}
    for key, (name, load) in loaders.items():
        try:
            out[key] = load(path / name)
        except Exception:  # any reader error of a damaged file (SafetensorError, pickle/zip errors, OSError)
            raise _damaged(path / name) from None
    return out


def _torch_load(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _damaged(path: Path) -> UserError:
    return UserError(f"{path}: damaged checkpoint file; resume from another step (--resume "
                     f"{path.parent.parent}/step-NNNNNN) or start again with --overwrite")


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
