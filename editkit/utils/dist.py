"""Which process am I: rank and world size from torchrun / accelerate environment variables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This process's share of items: every world-th item starting at rank (deterministic)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def process_device(device: str | None = None) -> str | None:
    """`device`, or this process's own GPU (cuda:LOCAL_RANK) when several processes share a machine
    and none was given (else None: the loader's default)."""
    if device is not None or world_size() == 1:
        return device
    import torch

    return f"cuda:{local_rank()}" if torch.cuda.is_available() else None
