"""The start rule (pure), the fake GPU backend, and NVML being absent."""

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from editkit.errors import UserError
from editkit.queue.gpus import FakeBackend, GpuSample, NvmlBackend
from editkit.queue.rule import History, plan
from editkit.queue.store import JobSpec, Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "q")
    yield s
    s.close()


def _job(store, tmp_path, **kw):
    return store.get(store.submit(JobSpec(command=["true"], cwd=str(tmp_path), **kw)))


def _gpu(index, free, util=0.0, total=80.0):
    return GpuSample(index, free, total, util)


def _history(*steps):
    """steps: (time, [(free, util), ...]) per GPU index."""
    history = History()
    for when, gpus in steps:
        history.add(when, [_gpu(i, free, util) for i, (free, util) in enumerate(gpus)])
    return history


def test_gpus_must_fit_for_the_whole_window(store, tmp_path):
    job = _job(store, tmp_path, gpus=1, min_free_gib=40, window_s=10)
    history = _history((0, [(79, 0)]), (6, [(79, 0)]))
    assert plan([job], history, [0], {}, 1, now=6)[0].gpus is None
    assert "free for 6 s of the 10 s window" in plan([job], history, [0], {}, 1, now=6)[0].reason
    history.add(10, [_gpu(0, 79)])
    assert plan([job], history, [0], {}, 1, now=10)[0].gpus == [0]
    history.add(11, [_gpu(0, 79, util=50)])  # one busy sample restarts the window
    history.add(20, [_gpu(0, 79)])
    assert plan([job], history, [0], {}, 1, now=20)[0].gpus is None


def test_the_freest_ready_gpus_are_chosen_and_claimed_ones_skipped(store, tmp_path):
    job = _job(store, tmp_path, gpus=2, min_free_gib=40, window_s=0)
    history = _history((0, [(79, 0), (50, 0), (79, 0), (3.1, 0)]))
    assert plan([job], history, [0, 1, 2, 3], {}, 1, now=0)[0].gpus == [0, 2]
    assert plan([job], history, [0, 1, 2, 3], {0: 7}, 1, now=0)[0].gpus == [1, 2]
    assert plan([job], history, [1, 3], {}, 1, now=0)[0].gpus is None  # the worker's own GPU set


def test_wait_reasons_name_the_gpu_and_the_need(store, tmp_path):
    history = _history((0, [(79, 97), (3.1, 0), (1.0, 0)]))
    job = _job(store, tmp_path, gpus=1, min_free_gib=40, max_util=10, window_s=0)
    assert plan([job], history, [1, 2], {}, 1, now=0)[0].reason == "GPU 1 has 3.1 GiB free, needs 40"
    assert plan([job], history, [0], {}, 1, now=0)[0].reason == "GPU 0 is 97% busy, needs under 10%"
    two = _job(store, tmp_path, gpus=2, min_free_gib=2, window_s=0)
    assert plan([two], history, [0, 1, 2], {1: 5}, 1, now=0)[0].reason.startswith("0 of 2 GPUs ready; ")
    assert plan([two], history, [1], {}, 1, now=0)[0].reason == "needs 2 GPUs; this worker has 1 (GPUs 1)"
    assert "GPU 1 is used by queue job 5" == plan([job], history, [1], {1: 5}, 1, now=0)[0].reason


def test_default_free_memory_is_95_percent_of_the_gpu(store, tmp_path):
    job = _job(store, tmp_path, gpus=1, window_s=0)
    assert plan([job], _history((0, [(75, 0)])), [0], {}, 1, now=0)[0].reason == "GPU 0 has 75.0 GiB free, needs 76"
    assert plan([job], _history((0, [(77, 0)])), [0], {}, 1, now=0)[0].gpus == [0]


def test_queue_order_backfill_backoff_and_cpu_slots(store, tmp_path):
    history = _history((0, [(79, 0), (79, 0)]))
    big = _job(store, tmp_path, gpus=4, window_s=0, priority=5)
    small = _job(store, tmp_path, gpus=1, window_s=0)
    urgent = _job(store, tmp_path, gpus=1, window_s=0, priority=9)
    backing = _job(store, tmp_path, gpus=1, window_s=0, priority=9)
    cpu_a, cpu_b = _job(store, tmp_path), _job(store, tmp_path)
    order = store.waiting_local()
    assert [j.id for j in order[:3]] == [urgent.id, backing.id, big.id]
    backing = dataclasses.replace(backing, not_before=100.0, failures=1, retries=2)
    order = [backing if j.id == backing.id else j for j in order]
    decisions = {d.job.id: d for d in plan(order, history, [0, 1], {}, 1, now=0)}
    assert decisions[urgent.id].gpus == [0]
    assert decisions[backing.id].gpus is None and decisions[backing.id].reason.startswith("retry 1 of 2")
    assert decisions[big.id].gpus is None
    assert decisions[small.id].gpus == [1]  # backfills past the job that cannot start
    assert decisions[cpu_a.id].gpus == [] and decisions[cpu_b.id].gpus is None
    assert "CPU slot" in decisions[cpu_b.id].reason


def test_history_keeps_the_sample_that_starts_the_window():
    history = _history(*[(t, [(79, 0)]) for t in range(10)])
    history.prune(now=9, keep_s=3)
    assert len(history._samples[0]) == 4


def test_fake_backend_reads_snapshots_and_timelines_afresh(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [{"free_gib": 3.1, "total_gib": 80, "util": 97}, {"free_gib": 80}]}))
    backend = FakeBackend(path)
    assert backend.count() == 2
    assert backend.sample()[0] == GpuSample(0, 3.1, 80.0, 97.0)
    path.write_text(json.dumps({"timeline": [{"at": 0, "gpus": [{"free_gib": 1}]},
                                             {"at": 1.0, "gpus": [{"free_gib": 2}]},
                                             {"at": 4e9, "gpus": [{"free_gib": 3}]}]}))
    assert [s.free_gib for s in backend.sample()] == [2.0]
    path.write_text("{oops")
    with pytest.raises(UserError, match="EDITKIT_QUEUE_FAKE_GPUS=.*cannot read"):
        backend.sample()


@pytest.fixture
def no_nvml(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    monkeypatch.delenv("EDITKIT_QUEUE_FAKE_GPUS", raising=False)


def test_nvml_absent_is_one_line_user_error(no_nvml):
    with pytest.raises(UserError, match="NVML is not available") as err:
        NvmlBackend()
    assert "\n" not in str(err.value)


def _app():
    from editkit.queue.commands import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


@pytest.mark.parametrize("args", [["submit", "--gpus", "1", "--", "true"], ["worker", "--gpus", "0,1"]])
def test_gpus_requested_without_nvml_exits_2_with_one_line(no_nvml, tmp_path, args):
    result = CliRunner().invoke(_app(), ["queue", *args[:1], "--queue", str(tmp_path / "q"), *args[1:]])
    assert isinstance(result.exception, UserError) and "NVML is not available" in str(result.exception)


def test_cpu_job_needs_no_nvml(no_nvml, tmp_path):
    result = CliRunner().invoke(
        _app(), ["queue", "submit", "--queue", str(tmp_path / "q"), "--gpus", "0", "--", "true"])
    assert result.exit_code == 0, result.output
    assert "queued: CPU job" in result.output
