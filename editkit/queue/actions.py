"""What the queue commands do, as library functions: submit, cancel, retry, follow logs."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from editkit.errors import UserError
from editkit.queue import procs
from editkit.queue.store import BACKENDS, FAILED, FINAL_STATES, ON_ORPHAN, RUNNING, Job, JobSpec, Store, hostname


def parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    """KEY=VALUE strings (repeated option) as a dict."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{option} {pair!r}: write KEY=VALUE")
        values[key] = value
    return values


def parse_gpu_list(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]; 'none' or '' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--gpus {text}: write GPU indices separated by commas, e.g. 0,1,2,3 (or none)") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text}: GPU indices must be distinct and >= 0")
    return gpus


def _check_program(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    program = command[0]
    if "/" in program:
        found = (cwd / program).is_file()
    else:
        found = shutil.which(program, path=env.get("PATH", os.environ.get("PATH"))) is not None
    if not found:
        raise UserError(f"command {program!r} not found (cwd {cwd}); check the spelling, or give its path")


def build_spec(command: list[str], *, gpus: int, min_free_gib: float | None, max_util: float | None,
               window_s: float | None, name: str | None, priority: int, retries: int, backoff_s: float,
               env: Sequence[str], cwd: Path | None, on_orphan: str, backend: str, time_min: int | None,
               partition: str | None, slurm_args: Sequence[str]) -> JobSpec:
    """Check submit's options and make the job's record (one UserError per mistake)."""
    if not command:
        raise UserError("editkit queue submit: give the command after --, e.g. `-- python train.py`")
    checks = [(gpus < 0, "--gpus: give 0 or more"), (retries < 0, "--retries: give 0 or more"),
              (backoff_s < 0, "--backoff: give 0 or more seconds"),
              (window_s is not None and window_s < 0, "--window: give 0 or more seconds"),
              (max_util is not None and not 0 < max_util <= 100, "--max-util: give a percentage in (0, 100]"),
              (min_free_gib is not None and min_free_gib < 0, "--min-free-gib: give 0 or more GiB"),
              (on_orphan not in ON_ORPHAN, f"--on-orphan {on_orphan}: use one of {', '.join(ON_ORPHAN)}"),
              (backend not in BACKENDS, f"--backend {backend}: use one of {', '.join(BACKENDS)}")]
    for bad, message in checks:
        if bad:
            raise UserError(message)
    cwd = (cwd or Path.cwd()).resolve()
    if not cwd.is_dir():
        raise UserError(f"--cwd {cwd}: no such folder")
    env_values = parse_pairs(env, "--env")
    slurm = _slurm_options(backend, time_min, partition, slurm_args, min_free_gib, max_util, window_s, retries)
    if backend == "local":
        _check_program(command, cwd, env_values)
    return JobSpec(command=list(command), cwd=str(cwd), name=name or " ".join(command)[:40], env=env_values,
                   gpus=gpus, min_free_gib=min_free_gib, max_util=10.0 if max_util is None else max_util,
                   window_s=60.0 if window_s is None else window_s, priority=priority, retries=retries,
                   backoff_s=backoff_s, on_orphan=on_orphan, backend=backend, slurm=slurm)


def _slurm_options(backend, time_min, partition, slurm_args, min_free_gib, max_util, window_s, retries) -> dict:
    if backend == "local":
        for value, flag in ((time_min, "--time"), (partition, "--partition"), (slurm_args, "--slurm")):
            if value:
                raise UserError(f"{flag} is for --backend slurm; a local job waits for free GPUs instead")
        return {}
    for value, flag in ((min_free_gib, "--min-free-gib"), (max_util, "--max-util"), (window_s, "--window")):
        if value is not None:
            raise UserError(f"{flag} is for the local backend; Slurm allocates whole GPUs")
    if retries:
        raise UserError("--retries is for the local backend; re-submit a failed Slurm job with "
                        "`editkit queue retry ID`")
    if not time_min or time_min <= 0:
        raise UserError("--backend slurm needs --time MINUTES (the job's Slurm time limit)")
    from editkit.queue.slurm import cluster

    return {"cluster": cluster(), "time_min": time_min, "partition": partition,
            "extra": parse_pairs(slurm_args, "--slurm")}


def check_gpus_exist(gpus: int) -> None:
    """A local GPU job on a machine without NVML (or with fewer GPUs) is a mistake at submit time."""
    from editkit.queue.gpus import open_backend

    count = open_backend("--gpus").count()
    if gpus > count:
        raise UserError(f"--gpus {gpus}: this machine has {count} GPU{'s' if count != 1 else ''}")


def submit(store: Store, spec: JobSpec) -> Job:
    if spec.backend == "local" and spec.gpus:
        check_gpus_exist(spec.gpus)
    job_id = store.submit(spec)
    if spec.backend == "slurm":
        _send_to_slurm(store, job_id)
    return store.get(job_id)


def _send_to_slurm(store: Store, job_id: int) -> None:
    """sbatch the job; if the cluster refuses it, the job is failed with the reason (and re-raised)."""
    from editkit.queue import slurm

    try:
        slurm.submit(store, store.get(job_id))
    except UserError as err:
        store.update_backend(job_id, state=FAILED, reason=str(err), ended_at=time.time())
        raise


def cancel(store: Store, job_id: int, grace_s: float, wait_s: float = 60.0) -> Job:
    """Cancel a job: a waiting one at once, a running one by ending its process group."""
    job = store.get(job_id)
    if job.state in FINAL_STATES:
        return job
    if job.backend == "slurm":
        from editkit.queue import slurm

        slurm.cancel(store, job, grace_s)
        return store.get(job_id)
    job = store.request_cancel(job_id)
    if job.state != RUNNING:
        return job
    if job.host != hostname():
        raise UserError(f"job {job_id} runs on {job.host}; run `editkit queue cancel {job_id}` there")
    if job.pid:
        procs.end_group(job.pid, job.pid_ident, grace_s)
    deadline = time.monotonic() + grace_s + wait_s
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.state != RUNNING or not procs.alive(job.runner_pid, job.runner_ident):
            break
        if job.pid and procs.group_alive(job.pid, job.pid_ident):
            procs.end_group(job.pid, job.pid_ident, grace_s)
        time.sleep(0.05)
    store.mark_cancelled(job_id, "cancelled while running")
    return store.get(job_id)


def retry(store: Store, job_id: int) -> Job:
    if store.retry(job_id).backend == "slurm":
        _send_to_slurm(store, job_id)
    return store.get(job_id)


def log_paths(store: Store, job: Job) -> tuple[Path, Path] | None:
    if job.backend == "slurm":
        from editkit.queue import slurm

        return slurm.log_paths(store, job)
    return store.log_paths(job.id)


def refresh(store: Store, jobs: list[Job]) -> list[Job]:
    """Jobs with the Slurm ones brought up to date."""
    if any(j.backend == "slurm" and j.state not in FINAL_STATES for j in jobs):
        from editkit.queue import slurm

        slurm.refresh(store, jobs)
        return [store.get(j.id) for j in jobs]
    return jobs


def follow_logs(store: Store, job_id: int, streams: Sequence[str], follow: bool, poll_s: float = 0.5) -> None:
    """Copy the job's logs to stdout/stderr; with follow, keep copying until the job has ended."""
    outputs = {"out": sys.stdout, "err": sys.stderr}
    offsets = {name: 0 for name in streams}
    while True:
        job = refresh(store, [store.get(job_id)])[0]
        paths = log_paths(store, job)
        if paths:
            for name in streams:
                offsets[name] = _copy_new(paths[0 if name == "out" else 1], offsets[name], outputs[name])
        if not follow or job.state in FINAL_STATES:
            if follow and paths:  # what was written between the last read and the end
                for name in streams:
                    _copy_new(paths[0 if name == "out" else 1], offsets[name], outputs[name])
            return
        time.sleep(poll_s)


def _copy_new(path: Path, offset: int, output) -> int:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return offset
    if data:
        output.write(data.decode("utf-8", errors="replace"))
        output.flush()
    return offset + len(data)


def clear(store: Store, states: Sequence[str]) -> list[int]:
    if not states:
        raise UserError("editkit queue clear: say what to clear: --done, --failed and/or --cancelled")
    return store.clear(states)

