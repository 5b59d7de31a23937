"""`--backend slurm`: the same jobs, sent to a Slurm cluster through submitit.

submit() turns a queue job into an sbatch job (GPU count, time limit, partition, extra
`--slurm KEY=VALUE` parameters; logs in the queue's slurm/<id>/ folder). On the node,
run_command() runs the command in its own process group and keeps a small status.json (start,
end, exit code, GPUs) beside the logs; refresh() reads that file, and asks the cluster (sacct)
only about jobs that have not finished there. $EDITKIT_QUEUE_SUBMITIT_CLUSTER picks another
submitit executor: "local" runs the Slurm path on this machine (tests, dry runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from editkit.errors import UserError
from editkit.queue import procs
from editkit.queue.store import CANCELLED, DONE, FAILED, FINAL_STATES, RUNNING, WAITING, Job, Store, describe_exit
from editkit.utils.atomic import write_json

CLUSTER_ENV = "EDITKIT_QUEUE_SUBMITIT_CLUSTER"
STATUS, CANCEL_MARK = "status.json", "cancelled"
_ACTIVE = {"PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


def cluster() -> str:
    return os.environ.get(CLUSTER_ENV, "slurm")


def executor_parameters(job: Job) -> dict:
    """submitit AutoExecutor parameters of a job (`--slurm KEY=VALUE` become slurm_KEY)."""
    params = {"name": job.name[:64] or f"editkit-{job.id}", "timeout_min": int(job.slurm["time_min"]),
              "gpus_per_node": job.gpus, "tasks_per_node": 1, "nodes": 1}
    if job.slurm.get("partition"):
        params["slurm_partition"] = job.slurm["partition"]
    for key, value in job.slurm.get("extra", {}).items():
        params[f"slurm_{key}"] = int(value) if str(value).isdigit() else value
    return params


def _executor(folder: Path, job: Job):
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=job.slurm.get("cluster", cluster()))
    except RuntimeError as err:
        raise UserError(f"--backend slurm: no Slurm here ({err}); submit from a Slurm login node, "
                        "or use --backend local") from None
    try:
        executor.update_parameters(**executor_parameters(job))
    except (NameError, ValueError, TypeError, AssertionError) as err:
        first = str(err).splitlines()[0]
        raise UserError(f"--slurm: {first}; see `sbatch --help` for the parameter names") from None
    return executor


def submit(store: Store, job: Job) -> str:
    """Send the job to the cluster; returns the cluster's job id (also recorded in the store)."""
    folder = store.slurm_dir(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (STATUS, CANCEL_MARK):
        (folder / name).unlink(missing_ok=True)
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = _executor(folder, job)
    try:
        submitted = executor.submit(run_command, job.command, job.cwd, job.env, str(folder))
    except (OSError, FailedJobError, FailedSubmissionError) as err:
        last = (str(err).strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--backend slurm: sbatch refused job {job.id}: {last}") from None
    store.update_backend(job.id, backend_id=str(submitted.job_id),
                         reason=f"submitted to {job.slurm.get('cluster', cluster())} as job {submitted.job_id}")
    return str(submitted.job_id)


def run_command(command: list[str], cwd: str, env: dict[str, str], folder: str) -> int:
    """Runs on the node: the command in its own process group, with status.json kept up to date."""
    status_path = Path(folder) / STATUS
    status = {"state": RUNNING, "host": os.uname().nodename, "started_at": time.time(),
              "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if (Path(folder) / CANCEL_MARK).exists():
        write_json(status_path, {**status, "state": CANCELLED, "ended_at": time.time()})
        return 0
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, start_new_session=True)
    write_json(status_path, {**status, "pgid": process.pid, "ident": procs.identity(process.pid)})
    if (Path(folder) / CANCEL_MARK).exists():
        procs.signal_group(process.pid, signal.SIGTERM)
    code = process.wait()
    state = CANCELLED if (Path(folder) / CANCEL_MARK).exists() else DONE if code == 0 else FAILED
    write_json(status_path, {**status, "state": state, "exit_code": code, "ended_at": time.time()})
    if state == FAILED:
        raise RuntimeError(f"{command[0]} ended with {describe_exit(code)}")
    return code


def _read_status(store: Store, job: Job) -> dict:
    try:
        return json.loads((store.slurm_dir(job.id) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def _cluster_state(store: Store, job: Job) -> str:
    """The cluster's word for the job: a Slurm state, or RUNNING/ENDED for the local executor."""
    if job.slurm.get("cluster", cluster()) == "local":
        return "RUNNING" if procs.alive(int(job.backend_id), "") else "ENDED"
    import submitit

    watcher = submitit.SlurmJob.watcher  # forced: a CLI call wants today's state, not a cached one
    return (watcher.get_state(job.backend_id, mode="force").split() or ["UNKNOWN"])[0]


def refresh(store: Store, jobs: list[Job]) -> None:
    """Bring the store's record of Slurm jobs up to date (status.json first, then the cluster)."""
    for job in jobs:
        if job.backend != "slurm" or job.state in FINAL_STATES or not job.backend_id:
            continue
        status = _read_status(store, job)
        values = {}
        if status:
            gpus = [int(g) for g in status.get("gpus", "").split(",") if g.strip().isdigit()]
            values.update(started_at=status["started_at"], host=status["host"], gpu_ids=gpus,
                          pid=status.get("pgid"), pid_ident=status.get("ident"))
        if status.get("state") in FINAL_STATES:
            values.update(state=status["state"], exit_code=status.get("exit_code"), ended_at=status["ended_at"],
                          reason=None if status["state"] == DONE else describe_exit(status.get("exit_code")))
        else:
            word = _cluster_state(store, job)
            if word in _ACTIVE:
                running = bool(status) or word == "RUNNING"
                values.update(state=RUNNING if running else WAITING,
                              reason=None if running else f"{word.lower()} in Slurm (job {job.backend_id})")
            else:
                values.update(state=CANCELLED if word.startswith("CANCELLED") else FAILED, ended_at=time.time(),
                              reason=f"ended in Slurm as {word} without a result; see `editkit queue logs {job.id}`")
        store.update_backend(job.id, **values)


def log_paths(store: Store, job: Job) -> tuple[Path, Path] | None:
    if not job.backend_id:
        return None
    from submitit.core.utils import JobPaths

    paths = JobPaths(store.slurm_dir(job.id), job_id=job.backend_id, task_id=0)
    return paths.stdout, paths.stderr


def cancel(store: Store, job: Job, grace_s: float) -> None:
    """Cancel on the cluster (scancel), end the command's group where we can reach it, record it."""
    folder = store.slurm_dir(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CANCEL_MARK).touch()
    if job.backend_id and job.slurm.get("cluster", cluster()) == "slurm":
        subprocess.run(["scancel", job.backend_id], check=False, capture_output=True)
    status = _read_status(store, job)
    if status.get("pgid") and status.get("host") == os.uname().nodename:
        procs.end_group(status["pgid"], status.get("ident"), grace_s)
    store.mark_cancelled(job.id, "cancelled")
