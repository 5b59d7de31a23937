"""How the queue looks: the `list`/`watch` table and the `show` page."""

from __future__ import annotations

import shlex
import time

from rich.table import Table

from editkit.queue.store import DONE, RUNNING, WAITING, Job, WorkerRow, describe_exit

_STYLE = {WAITING: "yellow", RUNNING: "cyan", DONE: "green", "failed": "red", "cancelled": "magenta"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def stamp(when: float | None) -> str:
    return "-" if when is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def gpus_text(job: Job) -> str:
    if job.state != WAITING and job.gpu_ids:
        return ",".join(map(str, job.gpu_ids))
    return "cpu" if job.gpus == 0 else f"need {job.gpus}"


def elapsed_text(job: Job, now: float) -> str:
    if job.state == RUNNING and job.started_at:
        return duration(now - job.started_at)
    if job.state == WAITING:
        return "waited " + duration(now - job.submitted_at)
    if job.started_at and job.ended_at:
        return duration(job.ended_at - job.started_at)
    return "-"


def detail_text(job: Job) -> str:
    if job.state == WAITING:
        return f"waiting: {job.reason or 'no worker has looked at it yet'}"
    if job.state == RUNNING and job.backend == "slurm":
        return f"on {job.host or '?'}, {job.slurm.get('cluster')} job {job.backend_id}"
    if job.state == RUNNING:
        return f"attempt {job.attempt} on {job.host}"
    if job.state == DONE:
        return describe_exit(job.exit_code)
    return job.reason or describe_exit(job.exit_code)


def jobs_table(jobs: list[Job], now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "STATE", "GPUS", "ELAPSED", "DETAIL"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        table.add_row(str(job.id), job.name, f"[{_STYLE.get(job.state, '')}]{job.state}[/]", gpus_text(job),
                      elapsed_text(job, now), detail_text(job))
    return table


def workers_line(workers: list[WorkerRow], has_local_waiting: bool) -> str:
    if not workers:
        hint = "; start one with `editkit queue worker`" if has_local_waiting else ""
        return f"no worker is running{hint}"
    parts = [f"{w.host}:{w.pid} (GPUs {','.join(map(str, w.gpus)) or 'none'})" for w in workers]
    return f"{len(workers)} worker{'s' if len(workers) > 1 else ''}: " + ", ".join(parts)


def rule_text(job: Job) -> str:
    if job.gpus == 0:
        return "CPU job (no GPU)"
    if job.backend == "slurm":
        return f"{job.gpus} GPU{'s' if job.gpus > 1 else ''} from Slurm"
    free = f"{job.min_free_gib:g} GiB" if job.min_free_gib is not None else "95% of memory"
    return (f"{job.gpus} GPU{'s' if job.gpus > 1 else ''} with >= {free} free and < {job.max_util:g}% busy "
            f"for {job.window_s:g} s")


def show_lines(job: Job, logs: tuple | None) -> list[str]:
    lines = [
        ("name", job.name), ("state", job.state), ("detail", detail_text(job)),
        ("command", shlex.join(job.command)), ("cwd", job.cwd),
        ("env", " ".join(f"{k}={v}" for k, v in job.env.items()) or "-"),
        ("backend", job.backend + (f" ({job.slurm.get('cluster')} job {job.backend_id})" if job.backend_id else "")),
        ("rule", rule_text(job)), ("priority", str(job.priority)),
        ("attempts", f"{job.attempt} (failures {job.failures} of {job.retries} retries)"),
        ("on orphan", job.on_orphan), ("submitted", stamp(job.submitted_at)), ("started", stamp(job.started_at)),
        ("ended", stamp(job.ended_at)),
        ("exit code", "-" if job.exit_code is None else str(job.exit_code)),
        ("gpus used", ",".join(map(str, job.gpu_ids)) if job.gpu_ids else "-"),
        ("host", job.host or "-"), ("pid", str(job.pid) if job.pid else "-"),
    ]
    if logs:
        lines += [("stdout", str(logs[0])), ("stderr", str(logs[1]))]
    return [f"{key + ':':<11}{value}" for key, value in lines]
