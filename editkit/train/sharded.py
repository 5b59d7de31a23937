"""Checkpoint parts of sharded runs (FSDP2, DeepSpeed ZeRO-2/3) that no single process holds.

The optimiser state is split over the ranks, so every rank writes its own part into the
checkpoint's staging folder, and a resumed run (same number of processes) reads its part back:
- FSDP2: torch.distributed.checkpoint (DCP) with the optimiser state keyed by parameter names;
- DeepSpeed: the engine's own `save_checkpoint` / `load_checkpoint` (ZeRO partitions, fp32
  master weights; frozen weights are left out).
The trainable weights themselves are gathered to the main process for `trainable.safetensors`
and the LoRA exports (`trainable_state`), frozen weights never: a LoRA checkpoint of a 20 B
model stays the size of the LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

FOLDER = "optimizer_shards"
_DS_TAG = "zero"


def kind(accelerator) -> str | None:
    """"fsdp", "deepspeed" or None (every rank holds the whole optimiser state)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def trainable_state(accelerator, wrapped) -> dict[str, torch.Tensor]:
    """The full trainable weights on the main process ({} elsewhere); call on every rank."""
    how = kind(accelerator)
    if how == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return state if accelerator.is_main_process else {}
    if how == "deepspeed":
        import contextlib

        import deepspeed

        state = {}
        for name, param in accelerator.unwrap_model(wrapped).named_parameters():
            if not param.requires_grad:
                continue
            # ZeRO-3 keeps each rank's slice (parameters with a ds_id): gather one at a time
            partitioned = hasattr(param, "ds_id")
            with deepspeed.zero.GatheredParameters([param]) if partitioned else contextlib.nullcontext():
                if accelerator.is_main_process:
                    state[name] = param.detach().cpu().clone()
        return state
    raise ValueError("trainable_state is for sharded runs")


def save_optimizer(accelerator, wrapped, optimizer, folder: Path) -> None:
    """Every rank writes its part of the optimiser state under folder (call on every rank)."""
    how = kind(accelerator)
    folder = Path(folder)
    if how == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(wrapped, _inner(optimizer))}, checkpoint_id=str(folder))
    elif how == "deepspeed":
        wrapped.save_checkpoint(str(folder), tag=_DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    else:
        raise ValueError("save_optimizer is for sharded runs")


def load_optimizer(accelerator, wrapped, optimizer, folder: Path) -> None:
    """Read back this rank's part (the run must have the same number of processes)."""
    how = kind(accelerator)
    folder = Path(folder)
    if how == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        inner = _inner(optimizer)
        state = {"optimizer": get_optimizer_state_dict(wrapped, inner)}
        dcp.load(state, checkpoint_id=str(folder))
        set_optimizer_state_dict(wrapped, inner, state["optimizer"])
    elif how == "deepspeed":
        path, _ = wrapped.load_checkpoint(str(folder), tag=_DS_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")
    else:
        raise ValueError("load_optimizer is for sharded runs")
