"""editkit.infer.parallel: CFG-parallel and Ulysses under torchrun give one process's edits (2 gloo
processes on the CPU), and clear errors outside torchrun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editkit.errors import UserError
from editkit.infer import parallel
from tests import parallel_worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_process():
    return parallel_worker.edits(parallel_worker.tiny_model())


def _torchrun(mode: str, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "tests/parallel_worker.py", mode, str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _same_edits(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["latents"], want["latents"], atol=1e-4, rtol=1e-4)
    for a, b in zip(got["images"], want["images"]):
        assert (a.short() - b.short()).abs().max() <= 1  # uint8 pixels, to rounding


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cfg", "ulysses"])
def test_two_processes_give_the_single_process_edits(mode, single_process, tmp_path):
    rank0, rank1 = _torchrun(mode, tmp_path)
    assert torch.equal(rank0["latents"], rank1["latents"])  # both ranks take the same steps
    assert all(torch.equal(a, b) for a, b in zip(rank0["images"], rank1["images"]))
    _same_edits(rank0, single_process)
    assert rank0["work"] + rank1["work"] == single_process["work"]  # the ranks shared the work
    assert 0 < rank1["work"] < single_process["work"]


class _OneRank:
    """A stand-in for torch.distributed with `world` ranks where this process is `rank` and
    all_gather fills every slot with this rank's tensor shifted by the slot's rank."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def get_world_size(self, group=None):
        return self.world

    def get_rank(self, group=None):
        return self.rank

    def all_gather(self, parts, tensor, group=None):
        for i, part in enumerate(parts):
            part.copy_(tensor + 100 * (i - self.rank))


def test_cfg_parallel_runs_this_ranks_share_and_gathers(monkeypatch):
    monkeypatch.setattr(parallel, "dist", _OneRank(2, 1))
    calls = []

    def predict(latents, timestep, embeds, mask, shapes, cond, kwargs):
        calls.append((latents.clone(), timestep.clone(), embeds.clone(), mask.clone(), shapes, cond.clone()))
        return latents * 2

    latents = torch.arange(4.0).view(4, 1, 1)
    timestep = torch.tensor([0.1, 0.2, 0.1, 0.2])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])
    out = parallel.CfgParallel()(predict, latents, timestep, latents + 10, mask, ["c1", "c2", "n1", "n2"],
                                 latents + 20)
    (mine_latents, mine_t, mine_embeds, mine_mask, mine_shapes, mine_cond), = calls
    assert mine_latents.flatten().tolist() == [2.0, 3.0] and mine_shapes == ["n1", "n2"]  # rank 1: the negatives
    assert mine_t.tolist() == pytest.approx([0.1, 0.2]) and mine_mask.tolist() == [[1, 0], [1, 0]]
    assert mine_embeds.flatten().tolist() == [12.0, 13.0] and mine_cond.flatten().tolist() == [22.0, 23.0]
    assert out.flatten().tolist() == [4.0 - 100, 6.0 - 100, 4.0, 6.0]  # rank 0's share first, then this rank's


def test_cfg_parallel_runs_an_odd_batch_whole(monkeypatch):
    monkeypatch.setattr(parallel, "dist", _OneRank(2, 0))
    latents = torch.ones(1, 2, 3)
    out = parallel.CfgParallel()(lambda x, *rest: x * 3, latents, 0.5, latents, None, [[(1, 1, 1)]])
    assert torch.equal(out, latents * 3)


def test_parallel_outside_torchrun_is_a_user_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model = object()
    assert parallel.apply_parallel(model, None) is model
    with pytest.raises(UserError, match="torchrun"):
        parallel.apply_parallel(model, "cfg")
    with pytest.raises(UserError, match="use one of"):
        parallel.apply_parallel(model, "tensor")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="2 processes"):
        parallel.apply_parallel(model, "cfg")
