"""The queue with the real NVML (skipped without an NVIDIA driver; run on the GPU machine)."""

import json
import os
import subprocess
import sys

import pytest

from editkit.errors import UserError
from editkit.queue.gpus import NvmlBackend
from editkit.queue.store import DONE, JobSpec, Store


def _nvml_works() -> bool:
    try:
        NvmlBackend()
    except UserError:
        return False
    return True


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _nvml_works(), reason="needs NVML (an NVIDIA driver)")]

JOB = """
import json, os, sys
record = {"visible": os.environ["CUDA_VISIBLE_DEVICES"]}
try:
    import torch
    record["torch_count"] = torch.cuda.device_count()
except ImportError:
    pass
open(sys.argv[1], "w").write(json.dumps(record))
"""


def test_nvml_reports_every_gpu_with_plausible_numbers():
    backend = NvmlBackend()
    samples = backend.sample()
    assert len(samples) == backend.count() >= 1
    for index, sample in enumerate(samples):
        assert sample.index == index and sample.total_gib > 1
        assert 0 <= sample.free_gib <= sample.total_gib and 0 <= sample.util <= 100


def test_a_worker_on_real_gpus_gives_the_job_exactly_one(tmp_path):
    store = Store(tmp_path / "q")
    script = tmp_path / "job.py"
    script.write_text(JOB)
    record = tmp_path / "record.json"
    job_id = store.submit(JobSpec(command=[sys.executable, str(script), str(record)], cwd=str(tmp_path), gpus=1,
                                  min_free_gib=1.0, max_util=100.5, window_s=0.2))
    env = {k: v for k, v in os.environ.items() if k != "EDITKIT_QUEUE_FAKE_GPUS"}
    worker = subprocess.run([sys.executable, "-m", "editkit.queue", "worker", "--queue", str(store.folder),
                             "--poll", "0.1", "--exit-when-empty"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    job = store.get(job_id)
    assert job.state == DONE and len(job.gpu_ids) == 1
    seen = json.loads(record.read_text())
    assert seen["visible"] == str(job.gpu_ids[0])
    if "torch_count" in seen:
        assert seen["torch_count"] == 1
