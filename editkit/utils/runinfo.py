"""The manifest every job writes beside its outputs: what ran, with which config, versions, seed."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from importlib import metadata
from pathlib import Path

from editkit.utils.atomic import write_json

_PACKAGES = ("editkit", "torch", "diffusers", "transformers", "peft", "accelerate")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_run_manifest(out_dir: str | Path, job: str, config: dict, seed: int | None = None,
                       name: str = "run.json", **extra) -> Path:
    path = Path(out_dir) / name
    write_json(path, {
        "job": job,
        "argv": sys.argv,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "versions": versions(),
        **extra,
    })
    return path
