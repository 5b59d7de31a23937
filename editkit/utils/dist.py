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


def resolve_device(device: str | None, option: str = "--device") -> str:
    """A checked torch device string: `device`, else this process's GPU when CUDA is there, else
    "cpu". A name torch does not know, or a CUDA device on a machine without it (or with fewer
    GPUs), is a UserError naming the option."""
    import torch

    from editkit.errors import UserError

    if device is None:
        if torch.cuda.is_available():
            return f"cuda:{local_rank() % torch.cuda.device_count()}" if world_size() > 1 else "cuda"
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {device}: CUDA is not available on this machine; use --device cpu "
                            "(or install a CUDA build of torch)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"{option} {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise UserError(f"{option} {device!r}: unsupported device type; use cpu, cuda or cuda:N")
    return device
