"""The queue's SQLite state: claims, transitions, orphans (no processes started)."""

import sqlite3
import threading

import pytest

from editkit.errors import UserError
from editkit.queue.store import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    WAITING,
    JobSpec,
    Store,
    backoff_delay,
    default_folder,
    describe_exit,
)


def _spec(tmp_path, **kw):
    return JobSpec(command=["true"], cwd=str(tmp_path), **kw)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "q")
    yield s
    s.close()


def test_database_is_in_wal_mode_and_survives_reopening(tmp_path, store):
    job_id = store.submit(_spec(tmp_path, name="a", gpus=2))
    db = sqlite3.connect(tmp_path / "q" / "queue.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Store(tmp_path / "q")
    job = again.get(job_id)
    assert (job.name, job.gpus, job.state, job.command) == ("a", 2, WAITING, ["true"])


def test_a_gpu_is_claimed_once_until_released(tmp_path, store):
    a = store.submit(_spec(tmp_path, gpus=2))
    b = store.submit(_spec(tmp_path, gpus=2))
    c = store.submit(_spec(tmp_path, gpus=2))
    assert store.claim(a, [0, 1], "h", 11, "x") is not None
    assert store.claim(b, [1, 2], "h", 12, "x") is None  # GPU 1 is taken
    assert store.claim(b, [1, 2], "other-host", 12, "x") is not None  # claims are per host
    assert store.claim(c, [2, 3], "h", 13, "x") is not None
    assert store.claimed_gpus("h") == {0: a, 1: a, 2: c, 3: c}
    assert store.claim(a, [0, 1], "h", 11, "x") is None  # already running
    assert store.finish(a, 1, 0) == DONE
    assert store.claimed_gpus("h") == {2: c, 3: c}
    job = store.get(a)
    assert (job.state, job.exit_code, job.gpu_ids, job.attempt) == (DONE, 0, [0, 1], 1)


def test_racing_claims_from_many_connections_give_each_gpu_to_one_job(tmp_path, store):
    ids = [store.submit(_spec(tmp_path, gpus=1)) for _ in range(8)]
    wins = []

    def claim(job_id):
        own = Store(tmp_path / "q")
        if own.claim(job_id, [3], "h", job_id, "x"):
            wins.append(job_id)
        own.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.claimed_gpus("h") == {3: wins[0]}
    assert [j.id for j in store.jobs([RUNNING])] == wins


def test_failures_are_retried_with_doubling_backoff_then_fail(tmp_path, store):
    job_id = store.submit(_spec(tmp_path, retries=2, backoff_s=10.0))
    for attempt, delay in ((1, 10.0), (2, 20.0)):
        assert store.claim(job_id, [], "h", 1, "x", now=1000.0 * attempt) is not None
        assert store.finish(job_id, attempt, 1, now=1000.0 * attempt + 5) == WAITING
        job = store.get(job_id)
        assert job.not_before == pytest.approx(1000.0 * attempt + 5 + delay)
        assert job.failures == attempt and "retry" in job.reason
        assert store.claim(job_id, [], "h", 1, "x", now=job.not_before - 1) is None  # still backing off
    assert store.claim(job_id, [], "h", 1, "x", now=5000.0) is not None
    assert store.finish(job_id, 3, -9, now=5001.0) == FAILED
    job = store.get(job_id)
    assert (job.attempt, job.failures, job.reason) == (3, 3, "killed by SIGKILL")


def test_backoff_is_capped_and_exit_codes_read_well():
    assert backoff_delay(30, 1) == 30 and backoff_delay(30, 3) == 120
    assert backoff_delay(30, 20) == 3600
    assert describe_exit(3) == "exit code 3" and describe_exit(-15) == "killed by SIGTERM"


def test_finish_of_a_stale_attempt_changes_nothing(tmp_path, store):
    job_id = store.submit(_spec(tmp_path))
    store.claim(job_id, [], "h", 1, "x")
    assert store.finish(job_id, 7, 0) is None
    assert store.get(job_id).state == RUNNING


def test_cancel_of_a_waiting_job_and_flag_on_a_running_one(tmp_path, store):
    waiting = store.submit(_spec(tmp_path))
    running = store.submit(_spec(tmp_path, gpus=1, retries=3))
    store.claim(running, [0], "h", 1, "x")
    assert store.request_cancel(waiting).state == CANCELLED
    assert store.claim(waiting, [], "h", 1, "x") is None
    flagged = store.request_cancel(running)
    assert (flagged.state, flagged.cancel_requested) == (RUNNING, True)
    assert store.set_process(running, 1, 99, "x") is True  # the runner learns it must stop
    assert store.finish(running, 1, -15) == CANCELLED  # not retried
    assert store.claimed_gpus("h") == {}


def test_retry_only_finished_jobs_with_a_fresh_budget(tmp_path, store):
    job_id = store.submit(_spec(tmp_path, retries=0))
    with pytest.raises(UserError, match="only done, failed or cancelled"):
        store.retry(job_id)
    store.claim(job_id, [], "h", 1, "x")
    store.finish(job_id, 1, 2)
    job = store.retry(job_id)
    assert (job.state, job.failures, job.attempt) == (WAITING, 0, 1)
    with pytest.raises(UserError, match="job 99: no such job"):
        store.get(99)


def test_clear_removes_finished_jobs_and_their_logs(tmp_path, store):
    done = store.submit(_spec(tmp_path))
    keep = store.submit(_spec(tmp_path))
    store.claim(done, [], "h", 1, "x")
    store.finish(done, 1, 0)
    for path in store.log_paths(done):
        path.write_text("log")
    assert store.clear([DONE]) == [done]
    assert [j.id for j in store.jobs()] == [keep]
    assert not any(p.exists() for p in store.log_paths(done))
    assert store.submit(_spec(tmp_path)) > done  # ids are never reused (logs cannot mix)


@pytest.mark.parametrize("policy, state", [("requeue", WAITING), ("fail", FAILED)])
def test_an_orphan_is_requeued_or_failed_once(tmp_path, store, policy, state):
    job_id = store.submit(_spec(tmp_path, gpus=1))
    job = store.claim(job_id, [0], "h", 1, "x")
    assert store.settle_orphan(job, policy) == state
    assert store.settle_orphan(job, policy) is None
    assert store.claimed_gpus("h") == {}
    assert "runner (pid 1) is gone" in store.get(job_id).reason


def test_default_folder_follows_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITKIT_QUEUE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_folder() == tmp_path / "cache" / "editkit" / "queue"
    monkeypatch.setenv("EDITKIT_QUEUE", str(tmp_path / "mine"))
    assert default_folder() == tmp_path / "mine"


def test_unwritable_queue_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--queue .*cannot create the queue folder"):
        Store(tmp_path / "file" / "q")
