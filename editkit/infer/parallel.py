"""Single-image latency on several GPUs under torchrun: CFG-parallel and Ulysses (`--parallel`).

Every rank loads the whole model on its own GPU, runs the same requests with the same seeds
(a dataset is not sharded across ranks in these modes) and ends with the same image; rank 0
writes it.

- "cfg" (2 processes): each denoising step, rank 0 runs the conditional pass and rank 1 the
  negative one, and the two predictions are exchanged (all_gather), so both ranks take the same
  step from the whole true-CFG batch's velocity: the same latents on both, and the same image as
  one process (up to float rounding: two batch-1 passes instead of one batch-2 pass). It is the
  facade view `EditModel.with_cfg_parallel(CfgParallel())`: the sampler stacks the conditional
  samples then their negatives, and each rank takes one equal share of that batch. A batch that
  does not divide (no true CFG, a single sample) runs whole on every rank.
- "ulysses" (2 or more processes): diffusers' context parallel with Ulysses attention on the
  transformer (the `_cp_plan` of diffusers' QwenImage transformer): each rank runs the blocks on
  1/N of the tokens, and attention trades tokens for heads with an all-to-all. Its "anything"
  mode splits any prompt length and head count. The attention backend must support context
  parallel (cudnn, flash, sdpa; not fa3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from editkit.errors import UserError
from editkit.utils import dist as ranks

PARALLEL_MODES = ("cfg", "ulysses")


def init_process_group(device: torch.device | str) -> None:
    """torch.distributed's default group from torchrun's environment, once: NCCL for CUDA tensors
    (with gloo for CPU ones: Ulysses' "anything" mode exchanges sizes on the CPU), gloo on the CPU."""
    if dist.is_initialized():
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


class CfgParallel:
    """The `split` of `EditModel.with_cfg_parallel`: this rank's equal share of a predict batch run
    through `predict`, the shares all-gathered in rank order (`group`: torch.distributed's)."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, predict, latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents=None,
                 attention_kwargs=None):
        world, batch = dist.get_world_size(self.group), latents.shape[0]
        if world == 1 or batch % world:
            return predict(latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs)
        rank = dist.get_rank(self.group)
        share = slice(rank * batch // world, (rank + 1) * batch // world)
        per_sample = torch.is_tensor(timestep) and timestep.ndim == 1

        def mine(x):
            return None if x is None else x[share]

        part = predict(latents[share], timestep[share] if per_sample else timestep, prompt_embeds[share],
                       mine(prompt_mask), img_shapes[share], mine(cond_latents), attention_kwargs).contiguous()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts)


def enable_ulysses(model, degree: int | None = None) -> None:
    """diffusers' context parallel (Ulysses, "anything" mode) on the transformer over `degree`
    ranks (default: all of them). Call it after `apply_accel`'s attention choice."""
    from diffusers import ContextParallelConfig

    degree = degree or dist.get_world_size()
    try:
        model.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree,
                                                                          ulysses_anything=True))
    except ValueError as err:  # an attention backend without context parallel support
        reason = (str(err).splitlines() or ["unsupported"])[0]
        raise UserError(f"--parallel ulysses cannot run: {reason}") from None


def apply_parallel(model, mode: str | None):
    """The model to give the Engine under `--parallel mode` (None: `model` itself), after forming
    the process group from torchrun's environment. UserError outside torchrun or with a world
    size the mode cannot use."""
    if mode is None:
        return model
    if mode not in PARALLEL_MODES:
        raise UserError(f"--parallel {mode!r}: use one of {', '.join(PARALLEL_MODES)}")
    world = ranks.world_size()
    if world < 2:
        raise UserError(f"--parallel {mode} shares one edit between processes: run it under torchrun "
                        "(e.g. torchrun --nproc-per-node 2 -m editkit ...)")
    if mode == "cfg" and world != 2:
        raise UserError(f"--parallel cfg runs the conditional and the negative pass on 2 processes, not {world}; "
                        "use --nproc-per-node 2 (or --parallel ulysses)")
    init_process_group(model.device)
    if mode == "cfg":
        return model.with_cfg_parallel(CfgParallel())
    enable_ulysses(model, world)
    return model
