"""Reading GPUs: free memory and utilisation per GPU, through NVML or a fake backend.

The fake backend reads a JSON file named by $EDITKIT_QUEUE_FAKE_GPUS on every sample, so a
test (or a dry run) can make GPUs busy or free by rewriting the file, also for a worker that
runs in another process. The file is either one snapshot

    {"gpus": [{"free_gib": 3.1, "total_gib": 80, "util": 97}, ...]}

or a timeline whose latest entry with `at` (Unix time) <= now applies

    {"timeline": [{"at": 0, "gpus": [...]}, {"at": 1767225600, "gpus": [...]}]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Protocol

from editkit.errors import UserError

FAKE_ENV = "EDITKIT_QUEUE_FAKE_GPUS"
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class GpuSample:
    index: int
    free_gib: float
    total_gib: float
    util: float


class GpuBackend(Protocol):
    def count(self) -> int: ...

    def sample(self) -> list[GpuSample]: ...


class NvmlBackend:
    """The machine's GPUs through NVML (nvidia-ml-py); needs the NVIDIA driver."""

    def __init__(self, option: str = "--gpus"):
        try:
            import pynvml
        except ImportError:
            raise UserError(f"{option}: GPU jobs need nvidia-ml-py (pip install nvidia-ml-py); "
                            "use --gpus 0 for a CPU job") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise UserError(f"{option}: NVML is not available on this machine ({err}); GPU jobs need "
                            "the NVIDIA driver: use --gpus 0 for a CPU job, or --backend slurm") from None
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def count(self) -> int:
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        samples = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            samples.append(GpuSample(index, memory.free / GIB, memory.total / GIB, float(util)))
        return samples


class FakeBackend:
    """GPUs described by a JSON file, re-read on every sample (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._count = len(self._snapshot(time.time()))

    def _snapshot(self, now: float) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{FAKE_ENV}={self.path}: cannot read the fake GPU file ({err})") from None
        if "timeline" not in data:
            return data["gpus"]
        current = [step for step in data["timeline"] if step.get("at", 0) <= now]
        return (current[-1] if current else data["timeline"][0])["gpus"]

    def count(self) -> int:
        return self._count

    def sample(self) -> list[GpuSample]:
        return [GpuSample(i, float(g["free_gib"]), float(g.get("total_gib", g["free_gib"])),
                          float(g.get("util", 0.0)))
                for i, g in enumerate(self._snapshot(time.time()))]


def open_backend(option: str = "--gpus") -> GpuBackend:
    """The fake backend when $EDITKIT_QUEUE_FAKE_GPUS is set, else NVML (UserError if absent)."""
    if os.environ.get(FAKE_ENV):
        return FakeBackend(os.environ[FAKE_ENV])
    return NvmlBackend(option)
