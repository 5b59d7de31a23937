"""The queue's state: one SQLite database (WAL mode) in the queue folder, plus per-job logs.

Every state change is one transaction; the ones that decide who gets a GPU (`claim`) or who
decides a job's fate (`finish`, `reap_orphans`, cancel) use `BEGIN IMMEDIATE`, so several
workers on one machine never double-book a GPU and a job ends in exactly one state. Claims are
rows of `gpu_claims` keyed by (host, gpu): a second claim of the same GPU cannot exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from editkit.errors import UserError

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
ON_ORPHAN = ("requeue", "fail")
BACKENDS = ("local", "slurm")
MAX_BACKOFF_S = 3600.0
QUEUE_ENV = "EDITKIT_QUEUE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  command TEXT NOT NULL,
  cwd TEXT NOT NULL,
  env TEXT NOT NULL,
  gpus INTEGER NOT NULL,
  min_free_gib REAL,
  max_util REAL NOT NULL,
  window_s REAL NOT NULL,
  priority INTEGER NOT NULL,
  retries INTEGER NOT NULL,
  backoff_s REAL NOT NULL,
  on_orphan TEXT NOT NULL,
  backend TEXT NOT NULL,
  slurm TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT,
  attempt INTEGER NOT NULL DEFAULT 0,
  failures INTEGER NOT NULL DEFAULT 0,
  not_before REAL NOT NULL DEFAULT 0,
  submitted_at REAL NOT NULL,
  started_at REAL,
  ended_at REAL,
  exit_code INTEGER,
  gpu_ids TEXT,
  host TEXT,
  runner_pid INTEGER,
  runner_ident TEXT,
  pid INTEGER,
  pid_ident TEXT,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  backend_id TEXT
);
CREATE TABLE IF NOT EXISTS gpu_claims (
  host TEXT NOT NULL,
  gpu INTEGER NOT NULL,
  job_id INTEGER NOT NULL,
  PRIMARY KEY (host, gpu)
);
CREATE TABLE IF NOT EXISTS workers (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  host TEXT NOT NULL,
  pid INTEGER NOT NULL,
  ident TEXT,
  gpus TEXT NOT NULL,
  started_at REAL NOT NULL,
  seen_at REAL NOT NULL
);
"""


def default_folder() -> Path:
    """$EDITKIT_QUEUE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)/editkit/queue."""
    if os.environ.get(QUEUE_ENV):
        return Path(os.environ[QUEUE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "editkit" / "queue"


def hostname() -> str:
    return socket.gethostname()


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What `submit` records: the command and the rule for starting it."""

    command: list[str]
    cwd: str
    name: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    gpus: int = 0
    min_free_gib: float | None = None
    max_util: float = 10.0
    window_s: float = 60.0
    priority: int = 0
    retries: int = 0
    backoff_s: float = 30.0
    on_orphan: str = "requeue"
    backend: str = "local"
    slurm: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Job:
    """One row of the jobs table."""

    id: int
    name: str
    command: list[str]
    cwd: str
    env: dict[str, str]
    gpus: int
    min_free_gib: float | None
    max_util: float
    window_s: float
    priority: int
    retries: int
    backoff_s: float
    on_orphan: str
    backend: str
    slurm: dict
    state: str
    reason: str | None
    attempt: int
    failures: int
    not_before: float
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    gpu_ids: list[int] | None
    host: str | None
    runner_pid: int | None
    runner_ident: str | None
    pid: int | None
    pid_ident: str | None
    cancel_requested: bool
    backend_id: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        for key in ("command", "env", "slurm", "gpu_ids"):
            values[key] = None if values[key] is None else json.loads(values[key])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class WorkerRow:
    id: int
    host: str
    pid: int
    ident: str | None
    gpus: list[int]
    started_at: float
    seen_at: float


def backoff_delay(backoff_s: float, failures: int) -> float:
    """Seconds to wait before retry number `failures` (1-based): doubles each time, capped."""
    return min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Store:
    """The queue folder: queue.db, logs/<id>.out|.err, slurm/<id>/."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.logs_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise UserError(f"--queue {self.folder}: cannot create the queue folder ({err.strerror}); "
                            "pick a writable folder") from None
        self._db = sqlite3.connect(self.folder / "queue.db", timeout=60.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        self._db.close()

    @property
    def logs_dir(self) -> Path:
        return self.folder / "logs"

    def log_paths(self, job_id: int) -> tuple[Path, Path]:
        return self.logs_dir / f"{job_id}.out", self.logs_dir / f"{job_id}.err"

    def slurm_dir(self, job_id: int) -> Path:
        return self.folder / "slurm" / str(job_id)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): decisions see the latest state."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
        return db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

    def _update(self, db: sqlite3.Connection, job_id: int, **values) -> None:
        for key in ("gpu_ids",):
            if key in values and values[key] is not None:
                values[key] = json.dumps(values[key])
        columns = ", ".join(f"{key}=?" for key in values)
        db.execute(f"UPDATE jobs SET {columns} WHERE id=?", (*values.values(), job_id))

    def _release(self, db: sqlite3.Connection, job_id: int) -> None:
        db.execute("DELETE FROM gpu_claims WHERE job_id=?", (job_id,))

    # reading

    def get(self, job_id: int) -> Job:
        row = self._row(self._db, job_id)
        if row is None:
            raise UserError(f"job {job_id}: no such job in {self.folder}; see `editkit queue list`")
        return Job.from_row(row)

    def jobs(self, states: Iterable[str] | None = None) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        wanted = set(states) if states else None
        return [Job.from_row(r) for r in rows if wanted is None or r["state"] in wanted]

    def waiting_local(self) -> list[Job]:
        """Local jobs that wait, in start order: higher priority first, then first submitted."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state=? AND backend='local' ORDER BY priority DESC, id",
            (WAITING,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def claimed_gpus(self, host: str) -> dict[int, int]:
        """GPU index -> id of the job holding it, on host."""
        rows = self._db.execute("SELECT gpu, job_id FROM gpu_claims WHERE host=?", (host,)).fetchall()
        return {r["gpu"]: r["job_id"] for r in rows}

    # submitting and user actions

    def submit(self, spec: JobSpec, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO jobs (name, command, cwd, env, gpus, min_free_gib, max_util, window_s,"
                " priority, retries, backoff_s, on_orphan, backend, slurm, state, submitted_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (spec.name, json.dumps(spec.command), spec.cwd, json.dumps(spec.env), spec.gpus,
                 spec.min_free_gib, spec.max_util, spec.window_s, spec.priority, spec.retries,
                 spec.backoff_s, spec.on_orphan, spec.backend, json.dumps(spec.slurm), WAITING, now))
            return int(cursor.lastrowid)

    def request_cancel(self, job_id: int, now: float | None = None) -> Job:
        """A waiting job becomes cancelled; a running one is flagged (its runner ends it)."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._row(db, job_id)
            if row is None:
                raise UserError(f"job {job_id}: no such job in {self.folder}; see `editkit queue list`")
            if row["state"] == WAITING and row["backend"] == "local":
                self._update(db, job_id, state=CANCELLED, ended_at=now, reason="cancelled before it started")
            elif row["state"] in (WAITING, RUNNING):
                self._update(db, job_id, cancel_requested=1)
        return self.get(job_id)

    def mark_cancelled(self, job_id: int, reason: str, now: float | None = None) -> bool:
        """End a waiting or running job as cancelled (when no runner is left to record it)."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._row(db, job_id)
            if row is None or row["state"] not in (WAITING, RUNNING):
                return False
            self._release(db, job_id)
            self._update(db, job_id, state=CANCELLED, ended_at=now, reason=reason)
            return True

    def retry(self, job_id: int) -> Job:
        """Put a finished job back in the queue with a fresh retry budget."""
        with self._write() as db:
            row = self._row(db, job_id)
            if row is None:
                raise UserError(f"job {job_id}: no such job in {self.folder}; see `editkit queue list`")
            if row["state"] not in FINAL_STATES:
                raise UserError(f"job {job_id} is {row['state']}; only done, failed or cancelled jobs "
                                "can be retried")
            self._update(db, job_id, state=WAITING, failures=0, not_before=0, cancel_requested=0,
                         reason="re-queued by `editkit queue retry`", backend_id=None)
        return self.get(job_id)

    def clear(self, states: Iterable[str]) -> list[int]:
        """Delete the jobs in these (final) states with their logs; returns their ids."""
        states = [s for s in states if s in FINAL_STATES]
        with self._write() as db:
            marks = ",".join("?" * len(states))
            ids = [r["id"] for r in db.execute(f"SELECT id FROM jobs WHERE state IN ({marks})", states)]
            db.execute(f"DELETE FROM jobs WHERE state IN ({marks})", states)
        for job_id in ids:
            for path in self.log_paths(job_id):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.slurm_dir(job_id), ignore_errors=True)
        return ids

    # the runner's side

    def claim(self, job_id: int, gpus: list[int], host: str, runner_pid: int, runner_ident: str | None,
              now: float | None = None) -> Job | None:
        """Make a waiting job running on these GPUs, if it still waits and none of them is taken."""
        with self._write() as db:
            now = time.time() if now is None else now
            row = self._row(db, job_id)
            if (row is None or row["state"] != WAITING or row["backend"] != "local"
                    or row["not_before"] > now or row["gpus"] != len(gpus) or row["cancel_requested"]):
                return None
            marks = ",".join("?" * len(gpus))
            if gpus and db.execute(f"SELECT 1 FROM gpu_claims WHERE host=? AND gpu IN ({marks})",
                                   (host, *gpus)).fetchone():
                return None
            db.executemany("INSERT INTO gpu_claims (host, gpu, job_id) VALUES (?,?,?)",
                           [(host, gpu, job_id) for gpu in gpus])
            self._update(db, job_id, state=RUNNING, attempt=row["attempt"] + 1, started_at=now,
                         ended_at=None, exit_code=None, gpu_ids=list(gpus), host=host, reason=None,
                         runner_pid=runner_pid, runner_ident=runner_ident, pid=None, pid_ident=None)
        return self.get(job_id)

    def set_process(self, job_id: int, attempt: int, pid: int, ident: str | None) -> bool:
        """Record the job's process (its group leader); True when a cancel is already requested."""
        with self._write() as db:
            db.execute("UPDATE jobs SET pid=?, pid_ident=? WHERE id=? AND attempt=? AND state=?",
                       (pid, ident, job_id, attempt, RUNNING))
            row = self._row(db, job_id)
            return bool(row["cancel_requested"]) or row["state"] != RUNNING

    def finish(self, job_id: int, attempt: int, exit_code: int, now: float | None = None) -> str | None:
        """Record how an attempt ended: done, cancelled, failed, or waiting again for a retry."""
        with self._write() as db:
            now = time.time() if now is None else now
            row = self._row(db, job_id)
            if row is None or row["state"] != RUNNING or row["attempt"] != attempt:
                return None
            self._release(db, job_id)
            values = dict(ended_at=now, exit_code=exit_code)
            if row["cancel_requested"]:
                values.update(state=CANCELLED, reason="cancelled while running")
            elif exit_code == 0:
                values.update(state=DONE)
            elif row["failures"] < row["retries"]:
                failures = row["failures"] + 1
                values.update(state=WAITING, failures=failures,
                              not_before=now + backoff_delay(row["backoff_s"], failures),
                              reason=f"retry {failures} of {row['retries']} after {describe_exit(exit_code)}")
            else:
                values.update(state=FAILED, failures=row["failures"] + 1, reason=describe_exit(exit_code))
            self._update(db, job_id, **values)
            return values["state"]

    # the worker's side

    def running_on(self, host: str) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE state=? AND backend='local' AND host=?",
                                (RUNNING, host)).fetchall()
        return [Job.from_row(r) for r in rows]

    def settle_orphan(self, job: Job, policy: str, now: float | None = None) -> str | None:
        """A running job whose runner is gone: re-queue it or mark it failed (policy), once."""
        with self._write() as db:
            now = time.time() if now is None else now
            row = self._row(db, job.id)
            if row is None or row["state"] != RUNNING or row["attempt"] != job.attempt:
                return None
            self._release(db, job.id)
            lost = f"its runner (pid {job.runner_pid}) is gone: worker killed or machine restarted"
            if row["cancel_requested"]:
                self._update(db, job.id, state=CANCELLED, ended_at=now, reason="cancelled; " + lost)
                return CANCELLED
            if policy == "requeue":
                self._update(db, job.id, state=WAITING, not_before=0, reason=f"re-queued: {lost}")
                return WAITING
            self._update(db, job.id, state=FAILED, ended_at=now,
                         reason=f"lost: {lost}; not re-queued (--on-orphan fail)")
            return FAILED

    def set_reasons(self, reasons: dict[int, str]) -> None:
        """Store why each waiting job waits (shown by `list`)."""
        if not reasons:
            return
        with self._write() as db:
            db.executemany("UPDATE jobs SET reason=? WHERE id=? AND state=?",
                           [(reason, job_id, WAITING) for job_id, reason in reasons.items()])

    def update_backend(self, job_id: int, **values) -> None:
        """Fields the Slurm backend learns (backend_id, state, times, exit code, GPUs)."""
        with self._write() as db:
            if values.get("state") in FINAL_STATES:
                self._release(db, job_id)
            self._update(db, job_id, **values)

    # workers

    def add_worker(self, host: str, pid: int, ident: str | None, gpus: list[int]) -> int:
        now = time.time()
        with self._write() as db:
            cursor = db.execute("INSERT INTO workers (host, pid, ident, gpus, started_at, seen_at)"
                                " VALUES (?,?,?,?,?,?)", (host, pid, ident, json.dumps(gpus), now, now))
            return int(cursor.lastrowid)

    def remove_worker(self, worker_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE id=?", (worker_id,))

    def workers(self, host: str, alive: Callable[[int, str | None], bool]) -> list[WorkerRow]:
        """Workers on record; those of this host whose process is gone are dropped."""
        rows = [WorkerRow(**{**dict(r), "gpus": json.loads(r["gpus"])})
                for r in self._db.execute("SELECT * FROM workers ORDER BY id")]
        dead = [w.id for w in rows if w.host == host and not alive(w.pid, w.ident)]
        if dead:
            with self._write() as db:
                db.executemany("DELETE FROM workers WHERE id=?", [(i,) for i in dead])
        return [w for w in rows if w.id not in dead]

    def touch_worker(self, worker_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE workers SET seen_at=? WHERE id=?", (time.time(), worker_id))
