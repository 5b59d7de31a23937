"""`--backend slurm`: submitit's local executor runs the Slurm path for real here; fake
sbatch/sacct/scancel on PATH check what goes to a cluster (no Slurm on this machine)."""

import json
import os
import stat
import time

import pytest

from editkit.queue import procs
from editkit.queue.store import CANCELLED, DONE, FAILED, RUNNING, WAITING, Store

TIMEOUT_S = 180.0


def _state_after_list(queue_cli, tmp_path, job_id):
    queue_cli("list")  # list brings Slurm jobs up to date
    return Store(tmp_path / "q").get(job_id)


def _wait(queue_cli, tmp_path, job_id, condition, what):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = _state_after_list(queue_cli, tmp_path, job_id)
        if condition(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {job}")


def test_local_executor_runs_slurm_jobs_that_list_logs_and_cancel_follow(queue_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_QUEUE_SUBMITIT_CLUSTER", "local")
    ok = queue_cli("submit", "--backend", "slurm", "--time", "5", "--name", "ok", "--env", "WORD=hi-slurm",
             "--", "sh", "-c", "echo $WORD; pwd")
    assert ok.exit_code == 0 and "submitted to local as job" in ok.output, ok.output
    queue_cli("submit", "--backend", "slurm", "--time", "5", "--", "sh", "-c", "exit 3")
    queue_cli("submit", "--backend", "slurm", "--time", "5", "--", "sleep", "600")
    done = _wait(queue_cli, tmp_path, 1, lambda j: j.state == DONE, "job 1 to finish")
    assert done.exit_code == 0 and done.started_at <= done.ended_at
    failed = _wait(queue_cli, tmp_path, 2, lambda j: j.state == FAILED, "job 2 to fail")
    assert failed.exit_code == 3 and failed.reason == "exit code 3"
    logs = queue_cli("logs", "1", "--stream", "out").output
    assert "hi-slurm" in logs and str(tmp_path) in logs  # --env and the submit folder reach the job
    status = tmp_path / "q" / "slurm" / "3" / "status.json"
    deadline = time.monotonic() + TIMEOUT_S
    while not (status.exists() and "pgid" in json.loads(status.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    pgid = json.loads(status.read_text())["pgid"]
    assert _state_after_list(queue_cli, tmp_path, 3).state == RUNNING
    assert queue_cli("cancel", "3", "--grace", "5").output.strip() == "job 3: cancelled (was running)"
    assert not procs.group_alive(pgid, None)
    assert _state_after_list(queue_cli, tmp_path, 3).state == CANCELLED


FAKE_SLURM = {
    "sbatch": 'cp "$1" "$FAKE_SLURM_DIR/sbatch-script.sh"\necho "Submitted batch job 4242"\n',
    "srun": "exit 0\n",
    "sacct": 'echo "JobID|State|NodeList"\necho "4242|$(cat "$FAKE_SLURM_DIR/state")|node1"\n',
    "scancel": 'echo "$@" >> "$FAKE_SLURM_DIR/scancel.log"\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in FAKE_SLURM.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (folder / "state").write_text("PENDING")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(folder))
    monkeypatch.setenv("EDITKIT_QUEUE_SUBMITIT_CLUSTER", "slurm")
    return folder


def test_sbatch_gets_gpus_time_partition_extra_parameters_and_the_log_folder(queue_cli, tmp_path, fake_slurm):
    result = queue_cli("submit", "--backend", "slurm", "--gpus", "2", "--time", "90", "--partition", "gpu",
                 "--slurm", "account=proj", "--name", "lora-r16", "--", "python", "train.py")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "job 1 (lora-r16) submitted to slurm as job 4242"
    script = (fake_slurm / "sbatch-script.sh").read_text()
    folder = tmp_path / "q" / "slurm" / "1"
    for line in ("#SBATCH --gpus-per-node=2", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --job-name=lora-r16", f"#SBATCH --output={folder}/%j_0_log.out",
                 f"#SBATCH --error={folder}/%j_0_log.err"):
        assert line in script, script


def test_cluster_states_are_followed_and_cancel_calls_scancel(queue_cli, tmp_path, fake_slurm):
    queue_cli("submit", "--backend", "slurm", "--time", "5", "--", "python", "train.py")
    job = _state_after_list(queue_cli, tmp_path, 1)
    assert (job.state, job.backend_id, job.reason) == (WAITING, "4242", "pending in Slurm (job 4242)")
    assert "waiting: pending in Slurm (job 4242)" in queue_cli("list").output
    (fake_slurm / "state").write_text("RUNNING")
    assert _state_after_list(queue_cli, tmp_path, 1).state == RUNNING
    (fake_slurm / "state").write_text("TIMEOUT")
    job = _state_after_list(queue_cli, tmp_path, 1)
    assert job.state == FAILED and "ended in Slurm as TIMEOUT" in job.reason
    assert queue_cli("retry", "1").exit_code == 0  # re-submitted
    (fake_slurm / "state").write_text("PENDING")
    assert queue_cli("cancel", "1").output.strip() == "job 1: cancelled (was waiting)"
    assert (fake_slurm / "scancel.log").read_text().split() == ["4242"]


def test_no_slurm_is_one_line_user_error(queue_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_QUEUE_SUBMITIT_CLUSTER", "slurm")
    monkeypatch.setenv("PATH", str(tmp_path))
    result = queue_cli("submit", "--backend", "slurm", "--time", "5", "--", "true")
    assert "--backend slurm: no Slurm here" in str(result.exception) and "\n" not in str(result.exception)
    assert Store(tmp_path / "q").get(1).state == FAILED
