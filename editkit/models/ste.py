"""The slot encoding (`ste`): a learned vector per image slot, added to that slot's tokens after `img_in`.

The seeds train "STE" (spatio-temporal encodings) beside their rank-512 LoRA and run an ablation
without it, but their module is not public. This is editkit's own design, named after theirs:
slot 0 is the target, slots 1..N the condition images in the order of `img_shapes`; a
`(slots, inner_dim)` table, zero-initialised, so an untrained STE changes nothing. It tells the
transformer which image a token belongs to beside the RoPE frame index (which
`--rope-frames shared` takes away: editkit.models.rope_frames).

It hooks into diffusers' `QwenImageTransformer2DModel` without forking it: a forward pre-hook on
the transformer reads `img_shapes` (target first, then each condition image: the token layout of
`hidden_states`), and a forward hook on `img_in` adds each token's slot vector to its output (only
a vector's part orthogonal to all-ones matters: the blocks' LayerNorms remove a constant shift). The
module is a submodule of the transformer (`editkit_ste`), so the optimiser, DDP, checkpoints and
exact resume see its weight like any other trainable parameter. `set_active(False)` turns it
off (the `--without ste` ablation) and `detach` removes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from editkit.errors import UserError

CONDITION_SLOTS = 3
"""Condition-image slots of families that take any number of images (the Edit-Plus releases
are made for 1 to 3)."""


class SlotEncoding(nn.Module):
    """One learned vector per image slot (target, condition 1..N), added to the slot's image tokens."""

    def __init__(self, slots: int, dim: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(slots, dim, device=device))
        self.active = True
        self._img_shapes = None
        self._handles: list = []

    @property
    def slots(self) -> int:
        return self.weight.shape[0]

    def slot_ids(self, img_shapes, num_tokens: int) -> torch.Tensor:
        """The slot of every image token: img_shapes' entries in order (one sample's list, or
        a batch's list of equal lists)."""
        shapes = img_shapes[0] if img_shapes and isinstance(img_shapes[0], list) else img_shapes
        counts = [math.prod(shape) for shape in shapes]
        if len(counts) > self.slots:
            raise UserError(f"the STE encodes {self.slots - 1} condition image(s), this edit has {len(counts) - 1}; "
                            "give fewer source images, or run without it (--without ste)")
        if sum(counts) != num_tokens:
            raise UserError(f"the STE expects {sum(counts)} image tokens from img_shapes but img_in made "
                            f"{num_tokens} (a sequence-parallel run?); run without it (--without ste)")
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(self.weight.device)

    def forward(self, tokens: torch.Tensor, img_shapes) -> torch.Tensor:
        """`tokens` (B, S, D) after `img_in`, plus each token's slot vector."""
        encoding = self.weight[self.slot_ids(img_shapes, tokens.shape[1])]
        return tokens + encoding.to(device=tokens.device, dtype=tokens.dtype)

    # ----- the hooks on the transformer ----------------------------------------------------------

    def set_active(self, active: bool) -> None:
        self.active = bool(active)

    def attach(self, transformer: nn.Module, name: str) -> SlotEncoding:
        """Register as `transformer.<name>` and hook into its forward (see the module docstring)."""
        transformer.add_module(name, self)
        self._handles = [
            transformer.register_forward_pre_hook(self._remember_shapes, with_kwargs=True),
            # on the Linear itself: a LoRA loaded or unloaded later wraps or unwraps it, the hook stays
            getattr(transformer.img_in, "base_layer", transformer.img_in).register_forward_hook(self._add_encoding),
            transformer.register_forward_hook(self._forget_shapes, always_call=True),
        ]
        return self

    def detach(self, transformer: nn.Module, name: str) -> None:
        """Remove the hooks and the submodule."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(transformer, name, None) is self:
            delattr(transformer, name)

    def _remember_shapes(self, _module, args, kwargs):
        self._img_shapes = kwargs.get("img_shapes", args[4] if len(args) > 4 else None)

    def _add_encoding(self, _module, _args, output):
        if not self.active or self._img_shapes is None:
            return None
        return self(output, self._img_shapes)

    def _forget_shapes(self, *_):
        self._img_shapes = None


def attach_ste(transformer: nn.Module, name: str, slots: int) -> SlotEncoding:
    """A zero STE of `slots` slots on a QwenImage transformer, attached as `transformer.<name>`."""
    if not hasattr(transformer, "img_in"):
        raise UserError("the STE needs a QwenImage transformer (a module with img_in)")
    weight = getattr(transformer.img_in, "base_layer", transformer.img_in).weight  # a LoRA may wrap img_in
    return SlotEncoding(slots, weight.shape[0], device=weight.device).attach(transformer, name)
