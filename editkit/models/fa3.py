"""FlashAttention-3 (the forward-only `fa3-fwd` wheel) as a diffusers attention backend.

diffusers 0.42.1 names FlashAttention-3 `_flash_3` but binds it to the upstream
`flash_attn_interface` module, which is built from source. The PyPI wheel `fa3-fwd` ships the
same forward kernels (bf16, Hopper sm_90) as `fa3_fwd_interface`, with the same
`flash_attn_func(q, k, v, softmax_scale=None, causal=False, ...)` on `(B, S, H, D)` tensors.
`enable` registers this module's function in diffusers' registry under `_flash_3` (the
registry's own `register` decorator) and routes the transformer's attention processors to it.

What the backend does with the calls FA3 cannot run:
- a call that needs a gradient (training) is refused with a UserError: the wheel has no
  backward kernels, and training keeps cuDNN attention (`--attention auto` or `cudnn`);
- a masked call (prompts of different lengths batched with a padding mask; FA3 takes no mask)
  runs on cuDNN attention (torch SDPA off CUDA). With the prompt-length split, which
  `apply_accel` turns on except under group offload, every call is unmasked.
"""

from __future__ import annotations

import importlib

import torch

from editkit.errors import UserError

WHEEL = "fa3-fwd==0.0.3"
MODULE = "fa3_fwd_interface"
BACKEND = "_flash_3"
"""The diffusers backend name this module's function is registered under."""


def load_kernel():
    """The wheel's `flash_attn_func`, or a UserError naming the wheel."""
    try:
        module = importlib.import_module(MODULE)
    except (ImportError, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"attention fa3 needs the {WHEEL} wheel (FlashAttention-3 forward for Hopper GPUs; "
                        f"pip install {WHEEL}), which does not import here ({reason}); use --attention cudnn"
                        ) from None
    return module.flash_attn_func


def device_problem(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why the wheel's kernels cannot run on weights of `device` and `dtype` (None: they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"its kernels run on Hopper GPUs (sm_90) only, and the model is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"its kernels run on Hopper GPUs (sm_90) only, and this GPU is sm_{major}{minor}"
    if dtype != torch.bfloat16:
        return f"its kernels are bf16 only, and the model is {str(dtype).removeprefix('torch.')} (load it with bf16)"
    return None


def make_backend(kernel):
    """The diffusers backend function over `kernel` (a `flash_attn_func`).

    diffusers passes a backend only the arguments its signature names, so every argument the
    dispatcher may send is listed.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    cudnn, native = AttentionBackendName._NATIVE_CUDNN, AttentionBackendName.NATIVE

    def fa3_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None):
        if _parallel_config is not None:
            raise UserError("attention fa3 does not run under context parallel (--parallel ulysses); "
                            "use --attention cudnn")
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            raise UserError(f"attention fa3 is forward only ({WHEEL} has no backward kernels); train with "
                            "--attention cudnn or auto")
        if attn_mask is not None or dropout_p or enable_gqa:
            return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                         backend=cudnn if query.is_cuda else native)
        out = kernel(query, key, value, softmax_scale=scale, causal=is_causal)
        return out[0] if isinstance(out, tuple) else out  # upstream FA3 betas return (out, lse)

    return fa3_attention


def register(kernel) -> None:
    """Put the backend over `kernel` in diffusers' registry as `_flash_3` (replacing diffusers' own)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.register(AttentionBackendName(BACKEND))(make_backend(kernel))


def enable(transformer, device: torch.device | str, dtype: torch.dtype) -> str:
    """Route every attention call of `transformer` (weights on `device`, computing in `dtype`)
    through FA3; returns the backend name.

    A UserError names the wheel when it is not installed, or says why its kernels cannot run on
    that device and dtype. diffusers' `set_attention_backend` is not used: it checks for the
    upstream module, which the wheel does not provide.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName

    kernel = load_kernel()
    problem = device_problem(device, dtype)
    if problem:
        raise UserError(f"attention fa3 ({WHEEL}) cannot run here: {problem}; use --attention cudnn")
    register(kernel)
    processors = [m.processor for m in transformer.modules() if hasattr(getattr(m, "processor", None),
                                                                        "_attention_backend")]
    if any(getattr(p, "_parallel_config", None) is not None for p in processors):
        raise UserError("attention fa3 does not run under context parallel (--parallel ulysses); "
                        "use --attention cudnn")
    for processor in processors:
        processor._attention_backend = AttentionBackendName(BACKEND)
    return BACKEND
