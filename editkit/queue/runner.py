"""Run one job: `python -m editkit.queue.runner QUEUE_DIR JOB_ID GPUS`.

A worker starts this process in a session of its own. It claims the GPUs for the job (one
transaction, with its own pid, so a running job always names a live runner), tells the worker
"claimed" or "lost" on stdout, then runs the command in its own process group with
CUDA_VISIBLE_DEVICES set to exactly those GPUs and stdout/stderr appended to the job's logs
(the stderr log also gets a line at the start and the end of each attempt), waits, and records
the outcome. A worker killed meanwhile loses nothing: this process records it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from editkit.queue import procs
from editkit.queue.store import Job, Store, describe_exit, hostname


def job_environment(job: Job, gpus: list[int], base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment, the job's --env, and the queue's own variables."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(job.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env["EDITKIT_QUEUE_JOB_ID"] = str(job.id)
    return env


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))


def _tell_worker(message: str) -> None:
    """One line to the worker on the inherited pipe, then point stdout at /dev/null."""
    try:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _start(job: Job, gpus: list[int], out, err) -> subprocess.Popen | int:
    """Start the command in its own process group; an int is the exit code when it cannot start."""
    try:
        return subprocess.Popen(job.command, cwd=job.cwd, env=job_environment(job, gpus),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    except OSError as error:
        err.write(f"editkit queue: cannot start {job.command[0]!r} in {job.cwd}: {error.strerror}\n")
        return 127 if isinstance(error, FileNotFoundError) else 126


def _forward_signals(process: subprocess.Popen) -> None:
    """A signal to the runner ends the job's group (the runner stays to record it)."""
    def forward(signum, _frame):
        procs.signal_group(process.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)


def run(folder: str, job_id: int, gpus: list[int]) -> int:
    store = Store(folder)
    job = store.claim(job_id, gpus, hostname(), os.getpid(), procs.identity(os.getpid()))
    _tell_worker("claimed" if job else "lost")
    if job is None:
        return 3
    out_path, err_path = store.log_paths(job_id)
    with open(out_path, "a", buffering=1) as out, open(err_path, "a", buffering=1) as err:
        os.dup2(err.fileno(), 2)
        where = f"GPUs {','.join(map(str, gpus))}" if gpus else "no GPU"
        err.write(f"--- editkit queue: job {job_id} attempt {job.attempt} on {job.host}, {where}, "
                  f"{_stamp(job.started_at)} ---\n")
        process = _start(job, gpus, out, err)
        if isinstance(process, int):
            code = process
        else:
            _forward_signals(process)
            if store.set_process(job_id, job.attempt, process.pid, procs.identity(process.pid)):
                procs.end_group(process.pid, None, grace_s=10.0)
            code = process.wait()
        ended = time.time()
        err.write(f"--- editkit queue: job {job_id} attempt {job.attempt} ended with {describe_exit(code)}, "
                  f"{_stamp(ended)} ---\n")
    store.finish(job_id, job.attempt, code, now=ended)
    return 0


def main(argv: list[str]) -> int:
    folder, job_id, gpus = argv
    return run(folder, int(job_id), [int(g) for g in gpus.split(",") if g])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
