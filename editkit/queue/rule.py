"""The start rule, as pure functions: which waiting jobs start now, on which GPUs, and why the
others wait.

A GPU is ready for a job when every sample of the last `window_s` seconds had at least the
job's free memory (default: 95% of the GPU's memory) and utilisation under its limit, and the
worker has watched it that long. Jobs are tried in queue order (priority, then age); a job
that cannot start does not hold back smaller ones behind it (backfill).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence

from editkit.queue.gpus import GpuSample
from editkit.queue.store import Job, describe_exit

DEFAULT_FREE_FRACTION = 0.95


def needed_free_gib(job: Job, sample: GpuSample) -> float:
    if job.min_free_gib is not None:
        return job.min_free_gib
    return DEFAULT_FREE_FRACTION * sample.total_gib


def sample_fits(job: Job, sample: GpuSample) -> bool:
    return sample.free_gib >= needed_free_gib(job, sample) and sample.util < job.max_util


class History:
    """Recent samples per GPU, as (time, sample), oldest first."""

    def __init__(self):
        self._samples: dict[int, deque[tuple[float, GpuSample]]] = {}

    def add(self, now: float, samples: Sequence[GpuSample]) -> None:
        for sample in samples:
            self._samples.setdefault(sample.index, deque()).append((now, sample))

    def prune(self, now: float, keep_s: float) -> None:
        """Drop samples older than keep_s, but keep the newest one older than that (it starts the window)."""
        for samples in self._samples.values():
            while len(samples) > 1 and samples[1][0] <= now - keep_s:
                samples.popleft()

    def latest(self, gpu: int) -> GpuSample | None:
        samples = self._samples.get(gpu)
        return samples[-1][1] if samples else None

    def ready_for(self, job: Job, gpu: int) -> float | None:
        """Seconds this GPU has fitted the job without a break (None when its latest sample does not)."""
        samples = self._samples.get(gpu)
        if not samples:
            return None
        start = None
        for when, sample in reversed(samples):
            if not sample_fits(job, sample):
                break
            start = when
        return None if start is None else samples[-1][0] - start


@dataclasses.dataclass(frozen=True)
class Decision:
    """Start `job` on `gpus`, or (gpus None) leave it waiting for `reason`."""

    job: Job
    gpus: list[int] | None
    reason: str


def plan(waiting: Sequence[Job], history: History, managed: Sequence[int], claimed: dict[int, int],
         cpu_free: int, now: float | None = None) -> list[Decision]:
    """What to do with each waiting job in this pass, in queue order."""
    now = time.time() if now is None else now
    taken = dict(claimed)
    decisions = []
    for job in waiting:
        if job.not_before > now:
            decisions.append(Decision(job, None, _backoff_reason(job)))
        elif job.gpus == 0:
            if cpu_free > 0:
                cpu_free -= 1
                decisions.append(Decision(job, [], "starting"))
            else:
                decisions.append(Decision(job, None, "waiting for a CPU slot (worker --cpu-jobs)"))
        else:
            decision = _gpu_decision(job, history, managed, taken)
            if decision.gpus:
                taken.update({gpu: job.id for gpu in decision.gpus})
            decisions.append(decision)
    return decisions


def _backoff_reason(job: Job) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(job.not_before))
    return f"retry {job.failures} of {job.retries} after {describe_exit(job.exit_code)}; starts after {at}"


def _gpu_decision(job: Job, history: History, managed: Sequence[int], taken: dict[int, int]) -> Decision:
    if job.gpus > len(managed):
        have = ",".join(map(str, managed)) or "none"
        return Decision(job, None, f"needs {job.gpus} GPU{'s' if job.gpus > 1 else ''}; this worker has "
                                   f"{len(managed)} (GPUs {have})")
    ready = [gpu for gpu in managed if gpu not in taken and _ready(job, history, gpu)]
    if len(ready) >= job.gpus:
        ready.sort(key=lambda gpu: (-history.latest(gpu).free_gib, gpu))
        return Decision(job, sorted(ready[:job.gpus]), "starting")
    blocker = _blocker(job, history, [g for g in managed if g not in ready], taken)
    prefix = f"{len(ready)} of {job.gpus} GPUs ready; " if job.gpus > 1 else ""
    return Decision(job, None, prefix + blocker)


def _ready(job: Job, history: History, gpu: int) -> bool:
    since = history.ready_for(job, gpu)
    return since is not None and since >= job.window_s


def _blocker(job: Job, history: History, others: Sequence[int], taken: dict[int, int]) -> str:
    """The most telling reason among the GPUs that are not ready: the one closest to ready."""
    free = [g for g in others if g not in taken]
    if not free:
        users = sorted({taken[g] for g in others})
        if len(others) == 1:
            return f"GPU {others[0]} is used by queue job {users[0]}"
        return f"GPUs {','.join(map(str, others))} are used by queue jobs {', '.join(map(str, users))}"
    unseen = [g for g in free if history.latest(g) is None]
    if unseen:
        return f"GPU {unseen[0]} not sampled yet"
    warming = [g for g in free if sample_fits(job, history.latest(g))]
    if warming:
        gpu = max(warming, key=lambda g: history.ready_for(job, g))
        return f"GPU {gpu} free for {history.ready_for(job, gpu):.0f} s of the {job.window_s:g} s window"
    gpu = max(free, key=lambda g: (history.latest(g).free_gib - needed_free_gib(job, history.latest(g)),
                                   -history.latest(g).util))
    sample = history.latest(gpu)
    need = needed_free_gib(job, sample)
    if sample.free_gib < need:
        return f"GPU {gpu} has {sample.free_gib:.1f} GiB free, needs {need:g}"
    return f"GPU {gpu} is {sample.util:.0f}% busy, needs under {job.max_util:g}%"
