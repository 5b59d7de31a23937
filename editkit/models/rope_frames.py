"""Where condition images sit on the RoPE frame axis: their own frames, or the target's (`--rope-frames`).

diffusers' `QwenEmbedRope` gives the i-th entry of `img_shapes` the frame index i: the target is
frame 0, condition image k is frame k ("own", what the released models were trained with).
"shared" puts every condition image at the target's frame 0 (the positional ablation of the
seeds' STE experiments): the height and width positions stay, only the frame index changes, so
a condition token at (y, x) gets the same rotary phase as the target token at (y, x).

Done without forking diffusers: for the length of one transformer call, a forward hook on the
transformer's `pos_embed` replaces its image frequencies with the frame-0 ones of each entry
(from `QwenEmbedRope`'s own cached `_compute_video_freqs`). It is prepended, so it runs before
editkit.models.accel's real-RoPE hook; it does not combine with diffusers' context parallelism,
which splits `pos_embed`'s output before torch hooks run.
"""

from __future__ import annotations

import contextlib

import torch

from editkit.errors import UserError

ROPE_FRAMES = ("own", "shared")


def check(mode: str) -> str:
    if mode not in ROPE_FRAMES:
        raise UserError(f"--rope-frames {mode!r}: use own (each condition image at its own frame, as released) "
                        "or shared (all at the target's frame)")
    return mode


def check_supported(transformer) -> None:
    """UserError unless the transformer's RoPE is `QwenEmbedRope` (one frame per img_shapes entry)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    pos_embed = getattr(_unwrapped(transformer), "pos_embed", None)
    if type(pos_embed) is not QwenEmbedRope:
        raise UserError(f"--rope-frames shared: this transformer's RoPE ({type(pos_embed).__name__}) has no "
                        "per-image frames to share; use --rope-frames own")


def view(model, mode: str | None):
    """`model`, or its view with `mode` (editkit.models.family.RopeFrames); None or the model's
    own mode: `model` itself."""
    if mode is None or mode == getattr(model, "rope_frames", "own"):
        return model
    check(mode)
    with_rope_frames = getattr(model, "with_rope_frames", None)
    if with_rope_frames is None:
        raise UserError(f"--rope-frames {mode}: family {model.family.name} has no RoPE frame option; leave it out")
    return with_rope_frames(mode)


@contextlib.contextmanager
def applied(transformer, mode: str):
    """Within the block, `transformer` places condition images by `mode` ("own": unchanged)."""
    if mode == "own":
        yield
        return
    handle = _unwrapped(transformer).pos_embed.register_forward_hook(_shared_frames, prepend=True, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _unwrapped(transformer):
    """The diffusers transformer inside a DDP wrapper (or the transformer itself)."""
    return getattr(transformer, "module", transformer)


def _shared_frames(module, args, kwargs, output):
    """`QwenEmbedRope.forward`'s output with every img_shapes entry at frame index 0."""
    video_fhw = args[0] if args else kwargs["video_fhw"]
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(video_fhw, list):  # one list per sample, all equal: the first (as QwenEmbedRope)
        video_fhw = video_fhw[0]
    if not isinstance(video_fhw, list):
        video_fhw = [video_fhw]
    image = torch.cat([module._compute_video_freqs(frame, height, width, 0, device)
                       for frame, height, width in video_fhw], dim=0)
    return image, output[1]
