"""Speed switches for the QwenImage transformer of an EditModel (or a bare diffusers transformer).

Lossless (same function within bf16 rounding):
- ``attention``: which attention kernels run (`ATTENTION_BACKENDS`: "cudnn", "flash" (torch's
  flash-2), "sdpa" (torch's own choice), "fa3" (FlashAttention-3 from the forward-only `fa3-fwd`
  wheel, Hopper and bf16 only, inference only: editkit.models.fa3). ``"auto"`` picks cuDNN
  attention (``_native_cudnn``) on Hopper-or-newer CUDA GPUs, 12% faster per forward than flash-2
  on an H100 (torch 2.11 already prefers it there; older versions pick flash-2); elsewhere it
  keeps the diffusers default. It never picks fa3 (faster kernels measured standalone, not yet
  per step: docs/benchmarks.md).
- ``compile``: regional ``torch.compile`` of the 60 repeated blocks (one compiled graph shared by
  all of them), which fuses the norms, modulation, RoPE and gating around the matmuls.
- ``split_lengths``: a batch whose prompts differ in length (right-padded with a mask, as the
  CFG batch of a prompt and its shorter negative is) runs as one unmasked pass per length on the
  trimmed prompts: the same function, without cuDNN's ~12% slower masked attention.
- ``fused``: the same block math written so that the compiler can fuse it: RoPE in real
  arithmetic (diffusers multiplies complex numbers, which the compiler leaves as separate
  kernels) and the MLP's tanh-GELU inside the matmul's epilogue (cuBLASLt) instead of a pass
  over the 4x-wide hidden states.
- ``enable_checkpointing(selective=True)`` (training): activation checkpointing that keeps each
  block's attention output, so the backward pass does not re-run attention. It costs ~3 GiB at
  1024x1024 and, with compiled blocks, measured no faster than full checkpointing.

Lossy (report their error against bf16 before using them):
- ``fp8``: ``"matmul"`` quantizes activations and weights to float8 per row and runs float8
  matmuls (torchao, Hopper); ``"weights"`` stores weights in float8 and computes in bf16
  (half the weight memory).
- ``cache_threshold``: diffusers' first-block cache, which reuses the last step's residual of
  blocks 2..N while the first block's output changes by less than the threshold.

Memory (lossless; editkit.models.offload):
- ``offload="group"`` keeps the transformer's blocks and the text encoder in CPU memory and
  streams them to the GPU a layer ahead of use (diffusers group offload), for GPUs with 24 GiB.
- ``offload="model"`` keeps whole components in CPU memory and moves each to the GPU when it is
  used (one on the GPU at a time), for GPUs that hold the transformer but not the whole model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editkit.errors import UserError
from editkit.models import fa3

FP8_MODES = ("matmul", "weights")
OFFLOAD_MODES = ("group", "model")
ATTENTION_BACKENDS = {"cudnn": "_native_cudnn", "fa3": "_flash_3", "flash": "_native_flash", "sdpa": "native"}
"""The attention names of `Accel` (besides "auto") and the diffusers backends they select."""
ATTENTION_MODES = ("auto", *ATTENTION_BACKENDS)


@dataclass(frozen=True)
class Accel:
    """Which speed switches to apply; the defaults are the lossless fast path."""

    attention: str = "auto"
    """One of ATTENTION_MODES."""
    compile: bool = True
    fused: bool = True
    split_lengths: bool = True
    fp8: str | None = None
    cache_threshold: float | None = None
    offload: str | None = None
    """None, or one of OFFLOAD_MODES."""

    def check(self) -> Accel:
        """The switches themselves, or a UserError naming the first unknown mode."""
        if self.attention not in ATTENTION_MODES:
            raise UserError(f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTION_MODES)}")
        for what, value, modes in (("fp8", self.fp8, FP8_MODES), ("offload", self.offload, OFFLOAD_MODES)):
            if value is not None and value not in modes:
                raise UserError(f"unknown {what} mode {value!r}; use one of {', '.join(modes)}")
        return self


def transformer_of(model) -> torch.nn.Module:
    """The diffusers transformer of an EditModel, pipeline or the transformer itself."""
    return getattr(model, "transformer", model)


def pick_attention_backend(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """cuDNN attention on CUDA GPUs of compute capability 9.0 or newer for 16-bit weights, else None
    (diffusers' default; cuDNN attention has no float32 kernel)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "_native_cudnn" if major >= 9 else None


def _attention_weight(transformer) -> torch.Tensor:
    """The base weight of the first attention query projection (also under a LoRA): its device
    and dtype are where and in what attention runs."""
    weight = next((p for n, p in transformer.named_parameters()
                   if n.endswith(("attn.to_q.weight", "attn.to_q.base_layer.weight"))), None)
    return weight if weight is not None else next(transformer.parameters())


def set_attention(model, backend: str | None) -> str | None:
    """Route every attention call of the transformer through `backend`: "auto", a name of
    ATTENTION_BACKENDS, a diffusers backend name, or None (diffusers' default); returns the
    diffusers backend chosen (None: the default)."""
    transformer = transformer_of(model)
    backend = ATTENTION_BACKENDS.get(backend, backend)
    if backend == "auto":
        weight = _attention_weight(transformer)
        backend = pick_attention_backend(weight.device, weight.dtype)
    if backend is None:
        transformer.reset_attention_backend()
    elif backend == fa3.BACKEND:
        weight = _attention_weight(transformer)
        fa3.enable(transformer, weight.device, weight.dtype)
    else:
        transformer.set_attention_backend(backend)
    return backend


def compile_blocks(model, *, fullgraph: bool = True, dynamic: bool | None = None, mode: str | None = None) -> None:
    """Regional compile: each transformer block is compiled; all blocks share one graph.

    Not for UNets (InstructPix2Pix): their small transformer blocks compiled regionally measured
    slower than eager on an H200 (2.2 s vs 1.6-1.9 s per 512² edit; docs/benchmarks.md), so a UNet
    runs eager under every speed mode."""
    from diffusers import UNet2DConditionModel

    if isinstance(transformer_of(model), UNet2DConditionModel):
        return
    # Text length changes between prompts; each length is one more entry of the shared block graph.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    options = {k: v for k, v in (("dynamic", dynamic), ("mode", mode)) if v is not None}
    transformer_of(model).compile_repeated_blocks(fullgraph=fullgraph, **options)


def _rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex RoPE (`apply_rotary_emb_qwen(use_real=False)`) in real float32 arithmetic.

    `x` is (B, S, H, D); `freqs` is (S, D/2, 2) = view_as_real of the complex frequencies.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    xr, xi = xf.unbind(-1)
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).type_as(x)


class FusedDoubleStreamProcessor:
    """diffusers' `QwenDoubleStreamAttnProcessor2_0` with real-arithmetic RoPE (same function).

    Expects the rotary frequencies as real (S, D/2, 2) tensors: `fuse_block_ops` makes the
    transformer's `pos_embed` return them so.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states_mask is not None:
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        seq_txt = encoder_hidden_states.shape[1]

        def project(x, q, k, v, norm_q, norm_k, freqs):
            query, key, value = (proj(x).unflatten(-1, (-1, head_dim)) for proj in (q, k, v))
            if norm_q is not None:
                query = norm_q(query)
            if norm_k is not None:
                key = norm_k(key)
            if freqs is not None:
                query, key = _rope_real(query, freqs), _rope_real(key, freqs)
            return query, key, value

        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        img = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, img_freqs)
        txt = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                      attn.norm_added_q, attn.norm_added_k, txt_freqs)
        query, key, value = (torch.cat([t, i], dim=1) for t, i in zip(txt, img))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(out[:, :seq_txt].contiguous())


def _gelu_tanh_epilogue(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`GELU(approximate="tanh").forward` as one cuBLASLt matmul with a GELU epilogue.

    The fused op has no backward: with autograd recording, the plain matmul + GELU runs; so it
    does where `proj` is not a plain Linear (an unfused LoRA adds its delta in its own forward) or
    its weights are not on the input's device (group offload onloads them in `proj`), or they are
    a tensor subclass (torchao's float8 weights: cuBLASLt's epilogue takes plain tensors only).
    """
    proj = self.proj
    plain = (type(proj) is torch.nn.Linear and _plain_tensor(proj.weight)
             and proj.weight.device == hidden_states.device)
    if torch.is_grad_enabled() or not plain:  # training, a LoRA-wrapped layer, or offloaded weights
        return F.gelu(proj(hidden_states), approximate="tanh")
    flat = hidden_states.flatten(0, -2)
    out = torch._addmm_activation(proj.bias, flat, proj.weight.t(), use_gelu=True)
    return out.unflatten(0, hidden_states.shape[:-1])


def _plain_tensor(weight) -> bool:
    """A plain (unquantized) parameter or tensor, not a subclass such as torchao's float8 weights."""
    return type(weight) in (torch.nn.Parameter, torch.Tensor)


def _real_rope_hook(module, args, output):
    return tuple(torch.view_as_real(f) if f.is_complex() else f for f in output)


def fuse_block_ops(model) -> None:
    """Swap in the fusable block math (real RoPE; GELU in the matmul epilogue on CUDA). Lossless.

    The fused processor is written for the QwenImage double-stream blocks; other networks (Flux,
    UNets) keep their own math and get only the rest of the fast path (compile, attention)."""
    import types

    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.activations import GELU

    transformer = transformer_of(model)
    if getattr(transformer, "_editkit_fused", False) or not isinstance(transformer, QwenImageTransformer2DModel):
        return
    transformer.pos_embed.register_forward_hook(_real_rope_hook)
    for block in transformer.transformer_blocks:
        processor = FusedDoubleStreamProcessor()
        processor._attention_backend = block.attn.processor._attention_backend
        processor._parallel_config = block.attn.processor._parallel_config  # context parallel, if enabled
        block.attn.set_processor(processor)
    for module in transformer.modules():
        cuda = module.__class__ is GELU and module.proj.weight.is_cuda
        if (cuda and module.approximate == "tanh" and type(module.proj) is torch.nn.Linear
                and _plain_tensor(module.proj.weight) and module.proj.bias is not None):
            module.forward = types.MethodType(_gelu_tanh_epilogue, module)
    transformer._editkit_fused = True


def predict_by_prompt_length(predict, latents, timestep, prompt_embeds, prompt_mask, img_shapes,
                             cond_latents=None, attention_kwargs=None):
    """`predict(...)` with right-padded prompts of different lengths run unmasked, one group per length.

    Each group of samples sharing a prompt length gets one pass on prompts trimmed to that length.
    Padded text tokens are masked out as keys and their outputs are dropped, and RoPE positions of
    the kept tokens do not depend on the padding, so the result is the same function.
    """
    if prompt_mask is None:
        return predict(latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs)
    mask = prompt_mask.long()
    lengths, prefix = torch.stack([mask.sum(1), mask.cumprod(1).sum(1)]).tolist()  # one host sync
    if lengths != prefix or min(lengths) == 0:  # not right-padded: keep the mask
        return predict(latents, timestep, prompt_embeds, prompt_mask, img_shapes, cond_latents, attention_kwargs)
    per_sample = torch.is_tensor(timestep) and timestep.ndim == 1
    out = None
    for length in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == length]
        if len(idx) == len(lengths):
            return predict(latents, timestep, prompt_embeds[:, :length], None, img_shapes, cond_latents,
                           attention_kwargs)
        sel = torch.tensor(idx, device=latents.device)
        part = predict(latents[sel], timestep[sel] if per_sample else timestep, prompt_embeds[sel, :length],
                       None, [img_shapes[i] for i in idx], None if cond_latents is None else cond_latents[sel],
                       attention_kwargs)
        if out is None:
            out = part.new_empty((latents.shape[0], *part.shape[1:]))
        out[sel] = part
    return out


def _block_linears(transformer):
    """Filter for torchao: the linear layers inside the repeated blocks, not a LoRA's own small
    layers (PEFT's lora_A / lora_B inside a wrapped layer stay in the compute dtype)."""
    def keep(module, fqn):
        return (isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.")
                and ".lora_" not in fqn)
    return keep


def apply_fp8(model, mode: str) -> None:
    """Float8 weights of the block linears (torchao): "matmul" (fp8 compute) or "weights" (storage only)."""
    if mode not in FP8_MODES:
        raise UserError(f"unknown fp8 mode {mode!r}; use one of {', '.join(FP8_MODES)}")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        raise UserError("fp8 needs torchao: pip install 'torchao>=0.17'") from None
    transformer = transformer_of(model)
    if mode == "matmul":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        config = Float8WeightOnlyConfig()
    quantize_(transformer, config, filter_fn=_block_linears(transformer))


def enable_first_block_cache(model, threshold: float) -> None:
    """diffusers' first-block cache (lossy): skip blocks 2..N while block 1 barely changes."""
    from diffusers.hooks import FirstBlockCacheConfig

    transformer_of(model).enable_cache(FirstBlockCacheConfig(threshold=threshold))


_ATTENTION_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
)


def _save_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    name = getattr(op, "__name__", str(op)).split(".")[0]
    if name in _ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint(module, *args):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    return checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _save_attention_policy),
    )


def enable_checkpointing(model, selective: bool = True) -> None:
    """Activation checkpointing per block; `selective` keeps attention outputs (no attention recompute)."""
    transformer = transformer_of(model)
    transformer.enable_gradient_checkpointing(_selective_checkpoint if selective else None)


def apply_accel(model, accel: Accel = Accel()):
    """Apply the speed switches `accel` to an EditModel (or a bare transformer) in the order that
    works: fp8, fused ops, prompt-length split, attention, cache, offload, compile."""
    accel.check()
    if accel.fp8:
        apply_fp8(model, accel.fp8)
    if accel.fused:
        fuse_block_ops(model)
    # group-offloaded weights: one masked pass streams them once; a bare transformer has no predict to split
    if accel.split_lengths and accel.offload != "group" and model is not transformer_of(model):
        model.split_prompt_lengths()
    set_attention(model, accel.attention)
    if accel.cache_threshold:
        enable_first_block_cache(model, accel.cache_threshold)
    if accel.offload:
        from editkit.models.offload import enable_offload

        enable_offload(model, accel.offload, next(transformer_of(model).parameters()).device)
    if accel.compile:
        compile_blocks(model)
    return model
