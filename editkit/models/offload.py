"""Low-memory modes of an EditModel (lossless): where weights wait while they are not used.

- "group" (diffusers group offload): the transformer's blocks and the text encoder live in
  pinned CPU memory and stream to the GPU one layer ahead of use, on a side stream. For GPUs
  with 24 GiB; every step streams the transformer's weights once.
- "model" (like diffusers' `enable_model_cpu_offload`, for the facade): whole components live
  in CPU memory and move to the GPU when used: the text encoder for `encode_prompt`, the VAE
  for encoding and decoding, the transformer for `predict`. Using one sends the one used
  before back, so one component is on the GPU at a time: the transformer stays there for all
  steps of an edit, which run at full speed; the moves cost one copy per component per edit.

Both keep `EditModel.device` the GPU: inputs, noise and prompts are still made there.
"""

from __future__ import annotations

import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from editkit.errors import UserError
from editkit.models.accel import OFFLOAD_MODES, transformer_of


def enable_group_offload(model, device: torch.device | str = "cuda") -> None:
    """Group offload (leaf level) of the transformer's blocks and the text encoder to `device`.

    The transformer's small non-block layers stay on `device`. One batched (masked) CFG pass
    streams the weights once per step, so `apply_accel` leaves the prompt-length split off in
    this mode."""
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    transformer = transformer_of(model)
    transformer.to(device)
    modules = [transformer.transformer_blocks]
    text_encoder = getattr(model, "text_encoder", None)
    if text_encoder is not None:
        modules.append(text_encoder)
    for module in modules:
        apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=device.type == "cuda")


def _placed(device: torch.device | str) -> torch.device:
    """`device` as parameters report it ("cuda" -> "cuda:<current>")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class OneOnDevice:
    """The components of one model that take turns on the execution device."""

    def __init__(self, device: torch.device | str, offload_device: torch.device | str = "cpu"):
        self.device = _placed(device)
        self.offload_device = _placed(offload_device)
        self.members: list[torch.nn.Module] = []
        self.current: torch.nn.Module | None = None
        """The component that ran last (the one on the execution device)."""

    def onload(self, module: torch.nn.Module) -> None:
        """Move `module` to the execution device after sending every other member there back."""
        for other in self.members:
            if other is not module and _device_of(other) != self.offload_device:
                torch.nn.Module.to(other, self.offload_device)  # nn.Module.to: diffusers' .to warns on casts
        if _device_of(module) != self.device:
            torch.nn.Module.to(module, self.device)
        self.current = module


class ComponentOffloadHook(ModelHook):
    """accelerate hook: before the component runs (its forward, or a diffusers VAE's `encode` /
    `decode`, which call the hook too), it becomes the one on the execution device."""

    def __init__(self, group: OneOnDevice):
        super().__init__()
        self.group = group

    def init_hook(self, module):
        return torch.nn.Module.to(module, self.group.offload_device)

    def pre_forward(self, module, *args, **kwargs):
        self.group.onload(module)
        return args, kwargs


def offloaded_components(model) -> list[torch.nn.Module]:
    """The modules that take turns: the transformer, the VAE, and the text encoder's base model
    (what `encode_prompt` runs; its LM head is never used and stays in CPU memory)."""
    parts = [model.transformer, getattr(model, "vae", None)]
    text_encoder = getattr(model, "text_encoder", None)
    if text_encoder is not None:
        torch.nn.Module.to(text_encoder, "cpu")
        parts.append(getattr(text_encoder, "model", text_encoder))
    return [part for part in parts if part is not None]


def enable_model_offload(model, device: torch.device | str = "cuda") -> OneOnDevice:
    """Model offload of an EditModel's components to `device` (see the module docstring); returns
    the group, whose `current` says which component is on the device."""
    group = OneOnDevice(device)
    for module in offloaded_components(model):
        group.members.append(module)
        add_hook_to_module(module, ComponentOffloadHook(group), append=True)
    return group


def enable_offload(model, mode: str, device: torch.device | str) -> None:
    """Apply offload `mode` ("group" or "model") with `device` as the execution device."""
    if mode == "group":
        enable_group_offload(model, device)
    elif mode == "model":
        enable_model_offload(model, device)
    else:
        raise UserError(f"unknown offload mode {mode!r}; use one of {', '.join(OFFLOAD_MODES)}")
