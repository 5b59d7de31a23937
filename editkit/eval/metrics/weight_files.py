"""Finding and reading the checkpoint files of a `--weights NAME=DIR` folder (LPIPS, DreamSim).

Files are read with safetensors, or with `torch.load(weights_only=True, map_location="cpu")`:
the `lpips` package's heads were saved from CUDA tensors and do not load on a CPU machine
without the map_location.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editkit.errors import UserError


def find(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` (paths relative to `folder`) that is a file, or None."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def require(folder: Path, names: tuple[str, ...], label: str, what: str) -> Path:
    """`find`, or a UserError naming the folder and the file expected."""
    found = find(folder, names)
    if found is None:
        also = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
        raise UserError(f"{label}: {folder} has no {names[0]}{also}: {what}; see docs/eval.md")
    return found


def load_tensors(path: Path, label: str) -> dict:
    """A checkpoint file's contents: a dict (of tensors, or nested dicts of tensors for .pth.tar files)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip and safetensors raise many types
        raise UserError(f"{label}: cannot read {path} ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); replace the file") from err
    if not isinstance(data, dict):
        raise UserError(f"{label}: {path} holds a {type(data).__name__}, not a state dict; replace the file")
    return data
