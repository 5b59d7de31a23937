"""CLI commands of this area (registered by editkit.cli): `editkit queue submit | list | show |
logs | cancel | retry | clear | worker | watch`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from editkit.errors import UserError

MAX_JOB_ID = 2**63 - 1  # SQLite's INTEGER: a larger id would overflow in the query, not just miss

queue_app = typer.Typer(help="A job queue that waits for free GPUs (or sends jobs to Slurm).",
                        no_args_is_help=True)


def _queue_option():
    return typer.Option(None, "--queue", envvar="EDITKIT_QUEUE", show_envvar=True,
                        help="Queue folder (default: ~/.cache/editkit/queue).")


def _store(queue: Path | None):
    from editkit.queue.store import Store, default_folder

    return Store(queue or default_folder())


@queue_app.command("submit", context_settings={"allow_interspersed_args": False})
def submit_command(
    command: list[str] = typer.Argument(None, help="The command and its arguments (after --)."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs the job needs (0: a CPU job)."),
    min_free_gib: float = typer.Option(None, "--min-free-gib", help="Free memory each GPU needs [default: 95% of it]."),
    max_util: float = typer.Option(None, "--max-util", help="Utilisation each GPU must stay under, % [default: 10]."),
    window: float = typer.Option(None, "--window", help="Seconds the GPUs must stay free [default: 60]."),
    name: str = typer.Option(None, "--name", help="A name for list (default: the command)."),
    priority: int = typer.Option(0, "--priority", help="Higher starts first."),
    retries: int = typer.Option(0, "--retries", help="Re-run a failed job up to this many times."),
    backoff: float = typer.Option(30.0, "--backoff", help="Seconds before the first retry (doubles each time)."),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)."),
    cwd: Path = typer.Option(None, "--cwd", help="Folder to run in (default: the current one)."),
    on_orphan: str = typer.Option("requeue", "--on-orphan",
                                  help="requeue or fail: what a worker does on finding the job's process gone."),
    backend: str = typer.Option("local", "--backend", help="local (a worker on this machine) or slurm."),
    time_min: int = typer.Option(None, "--time", help="Slurm: time limit in minutes."),
    partition: str = typer.Option(None, "--partition", help="Slurm: partition."),
    slurm_args: list[str] = typer.Option([], "--slurm", help="Slurm: KEY=VALUE sbatch parameter, e.g. account=proj."),
    queue: Path = _queue_option(),
) -> None:
    """Queue a command: `editkit queue submit --gpus 2 -- python train.py --lr 1e-4`."""
    from editkit.queue import actions
    from editkit.queue.view import rule_text

    spec = actions.build_spec(
        command or [], gpus=gpus, min_free_gib=min_free_gib, max_util=max_util, window_s=window, name=name,
        priority=priority, retries=retries, backoff_s=backoff, env=env, cwd=cwd, on_orphan=on_orphan,
        backend=backend, time_min=time_min, partition=partition, slurm_args=slurm_args)
    store = _store(queue)
    job = actions.submit(store, spec)
    if job.backend == "slurm":
        typer.echo(f"job {job.id} ({job.name}) submitted to {job.slurm['cluster']} as job {job.backend_id}")
        return
    typer.echo(f"job {job.id} ({job.name}) queued: {rule_text(job)}")
    _worker_hint(store)


def _worker_hint(store) -> None:
    from editkit.queue import procs
    from editkit.queue.store import hostname

    if not store.workers(hostname(), procs.alive):
        typer.echo("no worker is running: start one with `editkit queue worker`", err=True)


def _table(store, states):
    from rich.console import Group

    from editkit.queue import actions, procs
    from editkit.queue.store import WAITING, hostname
    from editkit.queue.view import jobs_table, workers_line

    jobs = actions.refresh(store, store.jobs(states or None))
    waiting = any(j.state == WAITING and j.backend == "local" for j in jobs)
    return Group(jobs_table(jobs), workers_line(store.workers(hostname(), procs.alive), waiting))


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


@queue_app.command("list")
def list_command(
    state: list[str] = typer.Option([], "--state", help="Only jobs in this state (repeatable)."),
    queue: Path = _queue_option(),
) -> None:
    """Jobs with their state, GPUs, elapsed time and why they wait."""
    from editkit.queue.store import FINAL_STATES, RUNNING, WAITING

    known = (WAITING, RUNNING, *FINAL_STATES)
    for name in state:
        if name not in known:
            raise UserError(f"--state {name}: use one of {', '.join(known)}")
    _console().print(_table(_store(queue), state))


@queue_app.command("watch")
def watch_command(
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes."),
    count: int = typer.Option(0, "--count", help="Stop after this many refreshes (0: until Ctrl-C)."),
    queue: Path = _queue_option(),
) -> None:
    """`list`, refreshed in place (Ctrl-C to stop)."""
    from rich.live import Live

    store = _store(queue)
    shown = 0
    try:
        with Live(_table(store, []), console=_console(), auto_refresh=False) as live:
            while True:
                shown += 1
                if count and shown >= count:
                    break
                time.sleep(interval)
                live.update(_table(store, []), refresh=True)
    except KeyboardInterrupt:
        pass


@queue_app.command("show")
def show_command(job_id: int = typer.Argument(..., min=1, max=MAX_JOB_ID, help="Job id."), queue: Path = _queue_option()) -> None:
    """Everything recorded about one job."""
    from editkit.queue import actions
    from editkit.queue.view import show_lines

    store = _store(queue)
    job = actions.refresh(store, [store.get(job_id)])[0]
    for line in show_lines(job, actions.log_paths(store, job)):
        typer.echo(line)


@queue_app.command("logs")
def logs_command(
    job_id: int = typer.Argument(..., min=1, max=MAX_JOB_ID, help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    stream: str = typer.Option("both", "--stream", help="out, err or both (stderr goes to stderr)."),
    queue: Path = _queue_option(),
) -> None:
    """Print a job's stdout and stderr (all attempts, appended)."""
    from editkit.queue import actions

    if stream not in ("out", "err", "both"):
        raise UserError(f"--stream {stream}: use out, err or both")
    streams = ["out", "err"] if stream == "both" else [stream]
    try:
        actions.follow_logs(_store(queue), job_id, streams, follow)
    except KeyboardInterrupt:
        pass


@queue_app.command("cancel")
def cancel_command(
    job_ids: list[int] = typer.Argument(..., min=1, max=MAX_JOB_ID, help="Job ids."),
    grace: float = typer.Option(10.0, "--grace", help="Seconds between SIGTERM and SIGKILL of a running job."),
    queue: Path = _queue_option(),
) -> None:
    """Cancel jobs: a waiting one leaves the queue, a running one's process group is ended."""
    from editkit.queue import actions

    store = _store(queue)
    for job_id in job_ids:
        before = store.get(job_id).state
        job = actions.cancel(store, job_id, grace)
        typer.echo(f"job {job_id}: {job.state}" + (f" (was {before})" if before != job.state else ""))


@queue_app.command("retry")
def retry_command(job_id: int = typer.Argument(..., min=1, max=MAX_JOB_ID, help="Job id."), queue: Path = _queue_option()) -> None:
    """Queue a finished (failed, cancelled or done) job again, with a fresh retry budget."""
    from editkit.queue import actions

    job = actions.retry(_store(queue), job_id)
    typer.echo(f"job {job.id} ({job.name}) queued again")


@queue_app.command("clear")
def clear_command(
    done: bool = typer.Option(False, "--done", help="Remove done jobs."),
    failed: bool = typer.Option(False, "--failed", help="Remove failed jobs."),
    cancelled: bool = typer.Option(False, "--cancelled", help="Remove cancelled jobs."),
    queue: Path = _queue_option(),
) -> None:
    """Remove finished jobs and their logs from the queue."""
    from editkit.queue import actions

    states = [s for s, on in (("done", done), ("failed", failed), ("cancelled", cancelled)) if on]
    ids = actions.clear(_store(queue), states)
    typer.echo(f"removed {len(ids)} job{'s' if len(ids) != 1 else ''}" + (f": {', '.join(map(str, ids))}" if ids else ""))


@queue_app.command("worker")
def worker_command(
    gpus: str = typer.Option(None, "--gpus", help="GPUs this worker may use, e.g. 0,1,2,3 (default: all; none: CPU jobs only)."),
    poll: float = typer.Option(5.0, "--poll", help="Seconds between GPU samples."),
    cpu_jobs: int = typer.Option(1, "--cpu-jobs", help="CPU jobs (--gpus 0) to run at once."),
    on_orphan: str = typer.Option(None, "--on-orphan", help="requeue or fail, for every job (default: each job's choice)."),
    grace: float = typer.Option(10.0, "--grace", help="Seconds between SIGTERM and SIGKILL when ending leftovers."),
    exit_when_empty: bool = typer.Option(False, "--exit-when-empty", help="Stop when nothing waits or runs."),
    queue: Path = _queue_option(),
) -> None:
    """Run queued jobs on this machine when their GPUs are free (stop with Ctrl-C; running jobs go on)."""
    from editkit.queue.store import ON_ORPHAN
    from editkit.queue.worker import Worker

    if on_orphan is not None and on_orphan not in ON_ORPHAN:
        raise UserError(f"--on-orphan {on_orphan}: use one of {', '.join(ON_ORPHAN)}")
    if poll <= 0 or cpu_jobs < 0:
        raise UserError("--poll must be > 0 and --cpu-jobs >= 0")
    backend, managed = _worker_gpus(gpus)
    Worker(_store(queue), backend, managed, poll_s=poll, cpu_jobs=cpu_jobs, on_orphan=on_orphan,
           exit_when_empty=exit_when_empty, grace_s=grace, say=lambda line: typer.echo(line)).run()


def _worker_gpus(option: str | None):
    """(backend, GPU indices) from --gpus: all GPUs by default, none without NVML."""
    from editkit.queue.actions import parse_gpu_list
    from editkit.queue.gpus import open_backend

    if option is None:
        try:
            backend = open_backend("--gpus")
        except UserError:
            typer.echo("editkit queue worker: no GPU found through NVML; running CPU jobs (--gpus 0) only", err=True)
            return None, []
        return backend, list(range(backend.count()))
    managed = parse_gpu_list(option)
    if not managed:
        return None, []
    backend = open_backend("--gpus")
    missing = [g for g in managed if g >= backend.count()]
    if missing:
        raise UserError(f"--gpus {option}: GPU {missing[0]} does not exist; this machine has {backend.count()} "
                        f"(0-{backend.count() - 1})")
    return backend, managed


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.add_typer(queue_app, name="queue")
