"""The worker loop: watch the GPUs, start jobs whose rule holds, settle jobs whose runner died.

Each pass: reap finished runners, settle orphans (running jobs of this host whose runner is
gone: re-queue or fail them as chosen), sample the GPUs, plan, start runners, store the wait
reasons. SIGTERM/SIGINT stop the loop; jobs already running carry on (their runners record
the outcome), so stopping or killing a worker never loses a job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from editkit.queue import procs
from editkit.queue.gpus import GpuBackend
from editkit.queue.rule import History, plan
from editkit.queue.store import Job, Store, hostname


def _now_text() -> str:
    return time.strftime("%H:%M:%S")


class Worker:
    def __init__(self, store: Store, backend: GpuBackend | None, gpus: Sequence[int], poll_s: float = 5.0,
                 cpu_jobs: int = 1, on_orphan: str | None = None, exit_when_empty: bool = False,
                 grace_s: float = 10.0, say: Callable[[str], None] = print):
        self.store = store
        self.backend = backend
        self.gpus = list(gpus)
        self.poll_s = poll_s
        self.cpu_jobs = cpu_jobs
        self.on_orphan = on_orphan
        self.exit_when_empty = exit_when_empty
        self.grace_s = grace_s
        self.say = say
        self.host = hostname()
        self.history = History()
        self.children: dict[int, tuple[subprocess.Popen, Job]] = {}
        self.stopping = False

    def run(self) -> None:
        worker_id = self.store.add_worker(self.host, os.getpid(), procs.identity(os.getpid()), self.gpus)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        where = f"GPUs {','.join(map(str, self.gpus))}" if self.gpus else "no GPUs: CPU jobs only"
        self.say(f"[{_now_text()}] worker on {self.host} ({where}), queue {self.store.folder}")
        try:
            while not self.stopping:
                idle = self.step()
                if self.exit_when_empty and idle:
                    break
                self.store.touch_worker(worker_id)
                self._sleep()
        finally:
            self.store.remove_worker(worker_id)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        running = [job_id for job_id, (proc, _) in self.children.items() if proc.poll() is None]
        if running:
            self.say(f"[{_now_text()}] worker stopped; jobs {', '.join(map(str, running))} keep running "
                     "and record their results")

    def _stop(self, _signum, _frame) -> None:
        self.stopping = True

    def _sleep(self) -> None:
        deadline = time.monotonic() + self.poll_s
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def step(self) -> bool:
        """One pass; True when no local job waits or runs on this host."""
        self._reap_children()
        self._settle_orphans()
        now = self._sample()
        waiting = self.store.waiting_local()
        cpu_running = sum(1 for _, job in self.children.values() if job.gpus == 0)
        decisions = plan(waiting, self.history, self.gpus, self.store.claimed_gpus(self.host),
                         self.cpu_jobs - cpu_running, now)
        reasons = {}
        for decision in decisions:
            if decision.gpus is None:
                reasons[decision.job.id] = decision.reason
            elif not self._launch(decision.job, decision.gpus):
                break  # another worker moved first: plan again with fresh claims next pass
        self.store.set_reasons(reasons)
        return not waiting and not self.store.running_on(self.host)

    def _sample(self) -> float:
        if self.backend is None or not self.gpus:
            return time.time()
        samples = [s for s in self.backend.sample() if s.index in self.gpus]
        now = time.time()  # after reading: a sample is never older than what it shows
        self.history.add(now, samples)
        windows = [job.window_s for job in self.store.waiting_local()] or [0.0]
        self.history.prune(now, max(windows) + 2 * self.poll_s)
        return now

    def _launch(self, job: Job, gpus: list[int]) -> bool:
        proc = subprocess.Popen(
            [sys.executable, "-m", "editkit.queue.runner", str(self.store.folder), str(job.id),
             ",".join(map(str, gpus))],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True)
        answer = proc.stdout.readline().strip()
        proc.stdout.close()
        if answer != "claimed":
            proc.wait()
            return False
        self.children[proc.pid] = (proc, job)
        where = f"GPUs {','.join(map(str, gpus))}" if gpus else "CPU"
        self.say(f"[{_now_text()}] started job {job.id} ({job.name}) on {where}")
        return True

    def _reap_children(self) -> None:
        for pid, (proc, job) in list(self.children.items()):
            if proc.poll() is None:
                continue
            del self.children[pid]
            ended = self.store.get(job.id)
            detail = f", {ended.reason}" if ended.reason else ""
            self.say(f"[{_now_text()}] job {job.id} ({job.name}) {ended.state}{detail}")

    def _settle_orphans(self) -> None:
        for job in self.store.running_on(self.host):
            if procs.alive(job.runner_pid, job.runner_ident):
                continue
            procs.end_group(job.pid, job.pid_ident, self.grace_s)  # leftovers of the job itself
            state = self.store.settle_orphan(job, self.on_orphan or job.on_orphan)
            if state:
                self.say(f"[{_now_text()}] job {job.id} ({job.name}) was running without a runner: now {state}")
