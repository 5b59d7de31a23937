"""Workers in subprocesses against a fake NVML: the start rule, GPU exclusivity between two
workers, SIGKILL of a worker, orphans, retries, cancel. Every wait polls state with a generous
timeout; nothing asserts a duration."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from editkit.queue import actions, procs
from editkit.queue.store import CANCELLED, DONE, FAILED, RUNNING, WAITING, JobSpec, Store

TIMEOUT_S = 180.0

JOB_SCRIPT = r'''
import json, os, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
job = os.environ["EDITKIT_QUEUE_JOB_ID"]
gpus = os.environ["CUDA_VISIBLE_DEVICES"]
record = {"gpus": gpus, "pid": os.getpid(), "pgid": os.getpgid(0)}
if mode == "grandchild":
    record["grandchild"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid
if mode == "lock":
    for g in gpus.split(","):
        try:
            os.close(os.open(os.path.join(out, f"gpu{g}.lock"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            open(os.path.join(out, "OVERLAP"), "a").write(f"job {job} GPU {g}\n")
with open(os.path.join(out, f"{job}.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
print(f"job {job} on GPUs {gpus!r}", flush=True)
if mode in ("hold", "grandchild", "lock"):
    for _ in range(6000):
        if os.path.exists(os.path.join(out, "release")):
            break
        time.sleep(0.1)
if mode == "lock":
    time.sleep(0.2)
    for g in gpus.split(","):
        os.remove(os.path.join(out, f"gpu{g}.lock"))
if mode.startswith("fail-until-"):
    attempts = len(open(os.path.join(out, f"{job}.jsonl")).readlines())
    sys.exit(0 if attempts >= int(mode.rsplit("-", 1)[1]) else 3)
'''


def _gpu(free, util=0.0):
    return {"free_gib": free, "total_gib": 80.0, "util": util}


class Bench:
    """A queue folder, a fake GPU file, workers, and cleanup of everything they started."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.script = tmp_path / "job.py"
        self.script.write_text(JOB_SCRIPT)
        self.fake = tmp_path / "gpus.json"
        self.store = Store(tmp_path / "q")
        self.workers: list[subprocess.Popen] = []

    def set_gpus(self, *gpus):
        tmp = self.fake.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": list(gpus)}))
        os.replace(tmp, self.fake)

    def submit(self, mode="quick", **kw):
        kw.setdefault("window_s", 0.2)
        spec = JobSpec(command=[sys.executable, str(self.script), str(self.out), mode], cwd=str(self.tmp), **kw)
        return self.store.submit(spec)

    def worker(self, *args):
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "w")
        env = {**os.environ, "EDITKIT_QUEUE_FAKE_GPUS": str(self.fake)}
        proc = subprocess.Popen([sys.executable, "-m", "editkit.queue", "worker", "--queue", str(self.store.folder),
                                 "--poll", "0.05", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def records(self, job_id):
        path = self.out / f"{job_id}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, condition, what):
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        logs = "\n".join(p.read_text() for p in sorted(self.tmp.glob("worker-*.log")))
        jobs = "\n".join(f"{j.id} {j.state} {j.reason}" for j in self.store.jobs())
        raise AssertionError(f"timed out waiting for {what}\njobs:\n{jobs}\nworkers:\n{logs}")

    def state(self, job_id):
        return self.store.get(job_id).state

    def cleanup(self):
        for proc in self.workers:
            proc.kill()
            proc.wait()
        for job in self.store.jobs():
            for pid in (job.runner_pid, job.pid):
                if pid and procs.alive(pid, None):
                    procs.signal_group(pid, signal.SIGKILL)
        for path in self.out.glob("*.jsonl"):
            for record in map(json.loads, path.read_text().splitlines()):
                procs.signal_group(record["pgid"], signal.SIGKILL)
        self.store.close()


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path)
    yield b
    b.cleanup()


def test_job_waits_for_busy_gpus_then_runs_on_exactly_the_free_ones(bench):
    bench.set_gpus(_gpu(3.1), _gpu(79, util=97), _gpu(10), _gpu(3.1))
    job_id = bench.submit(gpus=2, min_free_gib=40, max_util=10, window_s=0.3)
    bench.worker("--gpus", "0,1,2,3")
    bench.wait_for(lambda: "0 of 2 GPUs ready; GPU 1 is 97% busy" in (bench.store.get(job_id).reason or ""),
                   "the wait reason")
    assert bench.state(job_id) == WAITING and not bench.records(job_id)
    switched = time.time()
    bench.set_gpus(_gpu(3.1), _gpu(79), _gpu(10), _gpu(79))
    bench.wait_for(lambda: bench.state(job_id) == DONE, "the job to finish")
    job = bench.store.get(job_id)
    assert job.gpu_ids == [1, 3] and job.exit_code == 0
    assert [r["gpus"] for r in bench.records(job_id)] == ["1,3"]
    assert job.started_at >= switched + 0.3  # the GPUs had to stay free for the whole window
    assert bench.store.claimed_gpus(job.host) == {}


def test_two_workers_racing_for_the_same_gpus_never_share_one(bench):
    bench.set_gpus(*[_gpu(79)] * 4)  # NVML always says free: only the claims keep jobs apart
    ids = [bench.submit("lock", gpus=2, window_s=0) for _ in range(6)]
    bench.worker("--gpus", "0,1,2,3")
    bench.worker("--gpus", "0,1,2,3")
    running = lambda: [i for i in ids if bench.state(i) == RUNNING]  # noqa: E731
    bench.wait_for(lambda: len(running()) == 2, "two jobs to hold all four GPUs")
    for _ in range(2):  # both workers make full passes while the GPUs are held
        mark = time.time()
        bench.wait_for(lambda: [w.seen_at > mark for w in bench.store.workers("", lambda *a: True)] == [True] * 2,
                       "both workers to make a pass")
    assert len(running()) == 2 and not (bench.out / "OVERLAP").exists()
    (bench.out / "release").touch()
    bench.wait_for(lambda: all(bench.state(i) == DONE for i in ids), "all jobs to finish")
    assert not (bench.out / "OVERLAP").exists()
    for job_id in ids:
        job = bench.store.get(job_id)
        assert [r["gpus"] for r in bench.records(job_id)] == [",".join(map(str, job.gpu_ids))]
        assert len(job.gpu_ids) == 2


def test_a_worker_killed_mid_job_loses_nothing(bench):
    bench.set_gpus(_gpu(79))
    job_id = bench.submit("hold", gpus=1)
    worker = bench.worker("--gpus", "0")
    bench.wait_for(lambda: bench.records(job_id), "the job to start")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    job = bench.store.get(job_id)
    assert job.state == RUNNING and procs.alive(job.runner_pid, job.runner_ident)
    (bench.out / "release").touch()
    bench.wait_for(lambda: bench.state(job_id) == DONE, "the runner to record the end")
    restarted = bench.worker("--gpus", "0", "--exit-when-empty")
    assert restarted.wait(timeout=TIMEOUT_S) == 0
    job = bench.store.get(job_id)
    assert (job.state, job.attempt, job.exit_code) == (DONE, 1, 0)
    assert len(bench.records(job_id)) == 1 and bench.store.claimed_gpus(job.host) == {}


@pytest.mark.parametrize("override, expected", [(None, FAILED), ("requeue", WAITING)])
def test_a_job_whose_processes_died_with_the_machine_is_handled_as_chosen(bench, override, expected):
    bench.set_gpus(_gpu(79))
    job_id = bench.submit("hold", gpus=1, on_orphan="fail")
    worker = bench.worker("--gpus", "0")
    bench.wait_for(lambda: bench.records(job_id), "the job to start")
    job = bench.store.get(job_id)
    for pid in (worker.pid, job.runner_pid):  # a power cut: worker, runner and job all gone
        os.kill(pid, signal.SIGKILL)
    procs.signal_group(bench.records(job_id)[0]["pgid"], signal.SIGKILL)
    worker.wait()
    bench.wait_for(lambda: not procs.alive(job.runner_pid, job.runner_ident), "the runner to die")
    assert bench.state(job_id) == RUNNING
    bench.worker("--gpus", "0", *(["--on-orphan", override] if override else []))
    if expected == FAILED:
        bench.wait_for(lambda: bench.state(job_id) == FAILED, "the orphan to be failed")
        assert "lost" in bench.store.get(job_id).reason and len(bench.records(job_id)) == 1
    else:
        bench.wait_for(lambda: len(bench.records(job_id)) == 2, "the re-queued job to start again")
        (bench.out / "release").touch()
        bench.wait_for(lambda: bench.state(job_id) == DONE, "the second attempt to finish")
        assert bench.store.get(job_id).attempt == 2
    assert bench.store.claimed_gpus(job.host) == {}


def test_failed_jobs_are_retried_with_backoff_up_to_the_limit(bench):
    enough = bench.submit("fail-until-3", retries=2, backoff_s=0.05)
    too_few = bench.submit("fail-until-3", retries=1, backoff_s=0.05)
    worker = bench.worker("--gpus", "none", "--cpu-jobs", "2", "--exit-when-empty")
    assert worker.wait(timeout=TIMEOUT_S) == 0
    ok, failed = bench.store.get(enough), bench.store.get(too_few)
    assert (ok.state, ok.attempt, ok.failures, ok.exit_code) == (DONE, 3, 2, 0)
    assert (failed.state, failed.attempt, failed.exit_code) == (FAILED, 2, 3)
    err_log = bench.store.log_paths(enough)[1].read_text()
    assert err_log.count("--- editkit queue: job") == 6  # a start and an end line per attempt (append-only)
    assert bench.store.log_paths(enough)[0].read_text().count("job ") == 3


def test_cancel_of_a_waiting_and_of_a_running_job_ends_its_process_group(bench):
    bench.set_gpus(_gpu(79))
    running = bench.submit("grandchild", gpus=1, retries=2)
    waiting = bench.submit("hold", gpus=1)
    bench.worker("--gpus", "0")
    bench.wait_for(lambda: bench.records(running), "the first job to start")
    assert actions.cancel(bench.store, waiting, grace_s=5).state == CANCELLED
    record = bench.records(running)[0]
    job = actions.cancel(bench.store, running, grace_s=5)
    assert job.state == CANCELLED and job.reason == "cancelled while running"
    for pid in (record["pid"], record["grandchild"]):
        assert procs.identity(pid) is None  # gone (or a zombie nobody has reaped yet)
    assert not procs.group_alive(record["pgid"], None)
    assert bench.store.claimed_gpus(job.host) == {}
    assert not bench.records(waiting) and len(bench.records(running)) == 1  # no retry after a cancel


def test_a_worker_without_gpus_runs_cpu_jobs_and_says_why_gpu_jobs_wait(bench):
    gpu_job = bench.submit(gpus=1)
    cpu_job = bench.submit()
    bench.worker("--gpus", "none")
    bench.wait_for(lambda: bench.state(cpu_job) == DONE, "the CPU job")
    assert bench.records(cpu_job)[0]["gpus"] == ""  # no GPU visible to a CPU job
    bench.wait_for(lambda: bench.store.get(gpu_job).reason, "a wait reason")
    assert bench.store.get(gpu_job).reason == "needs 1 GPU; this worker has 0 (GPUs none)"
