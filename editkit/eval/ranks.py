"""How the ranks of a sharded `editkit eval` meet: a torch.distributed gloo group.

The ranks exchange only small Python objects (each one's unavailable-metric reasons), so gloo serves
on CPU and GPU machines alike. One process: no group and no collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from editkit.errors import UserError
from editkit.utils import dist

# A rank whose shard is cached reaches the gather long before one that computes: allow a day.
RANK_TIMEOUT = timedelta(hours=24)


@contextmanager
def rank_group() -> Iterator[object | None]:
    """None with one process. Else the gloo group of all ranks: the default group when it is gloo, a
    gloo group over it when it is not (NCCL), or one formed from torchrun's variables (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and torn down on exit."""
    if dist.world_size() <= 1:
        yield None
        return
    import torch.distributed as tdist

    if not tdist.is_available():
        raise UserError(f"WORLD_SIZE={dist.world_size()}: this torch build has no torch.distributed; "
                        "run one process")
    if tdist.is_initialized():
        if tdist.get_backend() == "gloo":
            yield tdist.group.WORLD
            return
        group = tdist.new_group(backend="gloo", timeout=RANK_TIMEOUT)
        try:
            yield group
        finally:
            tdist.destroy_process_group(group)
        return
    try:
        tdist.init_process_group("gloo", timeout=RANK_TIMEOUT)
    except ValueError as err:  # a variable torchrun sets is missing
        raise UserError(f"WORLD_SIZE={dist.world_size()}: cannot reach the other ranks ({err}); launch with "
                        "torchrun or accelerate launch") from err
    try:
        yield tdist.group.WORLD
    finally:
        tdist.destroy_process_group()


def gather(value, group) -> list:
    """Every rank's `value`, in rank order (`[value]` without a group). It returns on any rank only
    once all ranks have called it, so it is also where they wait for each other."""
    if group is None:
        return [value]
    import torch.distributed as tdist

    values: list = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(values, value, group=group)
    return values
