"""`editkit queue ...` through typer: options, errors, list/show/logs/retry/cancel/clear/watch."""

import re
import subprocess
import sys

import pytest

from editkit.errors import UserError
from editkit.queue.store import CANCELLED, FAILED, WAITING, Store


def _store(tmp_path):
    return Store(tmp_path / "q")


def test_every_queue_command_has_help(queue_cli):
    for command in ("submit", "list", "show", "logs", "cancel", "retry", "clear", "worker", "watch"):
        result = queue_cli(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, result.output


def test_submit_records_the_command_verbatim_after_the_first_word(queue_cli, tmp_path):
    result = queue_cli("submit", "--name", "lr", "--env", "LR=3e-4", "--priority", "2", "echo", "--lr", "3", "--", "x")
    assert result.exit_code == 0, result.output
    job = _store(tmp_path).get(1)
    assert job.command == ["echo", "--lr", "3", "--", "x"] and job.env == {"LR": "3e-4"}
    assert (job.name, job.priority, job.cwd, job.state) == ("lr", 2, str(tmp_path.resolve()), WAITING)
    assert "no worker is running" in result.output


@pytest.mark.parametrize("args, message", [
    (["--env", "LR", "--", "true"], "--env 'LR': write KEY=VALUE"),
    (["--cwd", "nowhere", "--", "true"], "--cwd .*nowhere: no such folder"),
    ([], "give the command after --"),
    (["--", "no-such-program-xyz"], "command 'no-such-program-xyz' not found"),
    (["--max-util", "0", "--", "true"], "--max-util: give a percentage"),
    (["--time", "30", "--", "true"], "--time is for --backend slurm"),
    (["--backend", "slurm", "--", "true"], "--backend slurm needs --time"),
    (["--backend", "slurm", "--time", "5", "--window", "9", "--", "true"], "--window is for the local backend"),
    (["--backend", "slurm", "--time", "5", "--retries", "2", "--", "true"], "--retries is for the local backend"),
    (["--on-orphan", "maybe", "--", "true"], "--on-orphan maybe: use one of requeue, fail"),
])
def test_submit_mistakes_are_one_line_user_errors(queue_cli, args, message):
    result = queue_cli("submit", *args)
    assert isinstance(result.exception, UserError), result.output
    assert "\n" not in str(result.exception)
    assert re.search(message, str(result.exception)), str(result.exception)


def test_a_failed_job_shows_logs_then_retry_cancel_and_clear(queue_cli, tmp_path):
    script = "echo out-line; echo err-line >&2; exit 4"
    assert queue_cli("submit", "--name", "boom", "--", "sh", "-c", script).exit_code == 0
    result = queue_cli("worker", "--gpus", "none", "--poll", "0.05", "--exit-when-empty")
    assert result.exit_code == 0, result.output
    assert "started job 1 (boom) on CPU" in result.output and "job 1 (boom) failed, exit code 4" in result.output
    listed = queue_cli("list").output
    assert "boom" in listed and "failed" in listed and "exit code 4" in listed
    shown = queue_cli("show", "1").output
    assert "exit code: 4" in shown and "command:   sh -c 'echo out-line; echo err-line >&2; exit 4'" in shown
    logs = queue_cli("logs", "1")
    assert "out-line" in logs.output and "err-line" in logs.output
    assert queue_cli("logs", "1", "--stream", "out").output == "out-line\n"
    assert queue_cli("retry", "1").output.strip() == "job 1 (boom) queued again"
    assert _store(tmp_path).get(1).state == WAITING
    assert queue_cli("cancel", "1").output.strip() == "job 1: cancelled (was waiting)"
    assert _store(tmp_path).get(1).state == CANCELLED
    assert isinstance(queue_cli("clear").exception, UserError)
    assert queue_cli("clear", "--done").output.strip() == "removed 0 jobs"
    assert queue_cli("clear", "--cancelled").output.strip() == "removed 1 job: 1"
    assert not any(p.exists() for p in _store(tmp_path).log_paths(1))
    assert isinstance(queue_cli("show", "1").exception, UserError)


def test_list_shows_the_wait_reason_and_watch_draws_the_table(queue_cli, tmp_path):
    queue_cli("submit", "--name", "sweep-a", "--", "true")
    _store(tmp_path).set_reasons({1: "GPU 2 has 3.1 GiB free, needs 40"})
    listed = queue_cli("list").output
    assert "waiting: GPU 2 has 3.1 GiB free, needs 40" in listed
    assert "no worker is running; start one with `editkit queue worker`" in listed
    assert "sweep-a" not in queue_cli("list", "--state", FAILED).output
    assert "--state lost: use one of waiting, running, done" in str(queue_cli("list", "--state", "lost").exception)
    watched = queue_cli("watch", "--count", "1")
    assert watched.exit_code == 0 and "sweep-a" in watched.output


def test_logs_follow_returns_with_everything_once_the_job_ends(queue_cli, tmp_path):
    queue_cli("submit", "--", "sh", "-c", "echo first; sleep 0.5; echo second")
    worker = subprocess.Popen([sys.executable, "-m", "editkit.queue", "worker", "--queue", str(tmp_path / "q"),
                               "--gpus", "none", "--poll", "0.05", "--exit-when-empty"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = queue_cli("logs", "1", "-f", "--stream", "out")
        assert result.output == "first\nsecond\n"
        assert worker.wait(timeout=180) == 0
    finally:
        worker.kill()
        worker.wait()


def test_worker_rejects_gpus_it_does_not_have(queue_cli, tmp_path, monkeypatch):
    fake = tmp_path / "gpus.json"
    fake.write_text('{"gpus": [{"free_gib": 80}, {"free_gib": 80}]}')
    monkeypatch.setenv("EDITKIT_QUEUE_FAKE_GPUS", str(fake))
    result = queue_cli("worker", "--gpus", "0,5")
    assert isinstance(result.exception, UserError)
    assert "GPU 5 does not exist; this machine has 2" in str(result.exception)
    result = queue_cli("submit", "--gpus", "3", "--", "true")
    assert "--gpus 3: this machine has 2 GPUs" in str(result.exception)


def test_a_job_id_beyond_sqlite_integers_is_one_line(tmp_path, capsys):
    """found by bench/reliability's flag fuzz: an id over 2**63 overflowed inside SQLite (a traceback)."""
    import pytest

    from editkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["queue", "logs", str(2**70), "--queue", str(tmp_path / "q")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith("editkit: error:")
