"""editkit.models.accel attention names and the FA3 backend (editkit.models.fa3) on the tiny model, CPU.

The fa3-fwd kernels run on Hopper GPUs only; here a fake `fa3_fwd_interface` module computing
attention with torch SDPA stands in for the wheel, to check the routing through diffusers'
registry (the real kernel: bench/gpu_checks.py on the GPU machine).
"""

import sys
import types

import pytest
import torch

from editkit.errors import UserError
from editkit.models import accel, fa3


@pytest.fixture
def model():
    from editkit.models.families import get_family

    return get_family("qwen-image-edit-2511").build_tiny(seed=0)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    embeds = torch.randn(2, 9, 64, generator=g)
    return latents, torch.tensor([0.3, 0.8]), embeds, [[(1, 4, 4), (1, 4, 4)]] * 2, cond


def _predict(model, inputs, mask=None):
    latents, t, embeds, shapes, cond = inputs
    with torch.no_grad():
        return model.predict(latents, t, embeds, mask, shapes, cond)


def _processor_backends(model):
    return {str(block.attn.processor._attention_backend) for block in model.transformer.transformer_blocks}


@pytest.fixture
def fake_fa3(monkeypatch):
    """A stand-in `fa3_fwd_interface` (SDPA on (B, S, H, D) tensors) that counts its calls; the
    registry entry `_flash_3` is restored afterwards."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kwargs):
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    module = types.ModuleType(fa3.MODULE)
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, fa3.MODULE, module)
    name = AttentionBackendName(fa3.BACKEND)
    for table in (_AttentionBackendRegistry._backends, _AttentionBackendRegistry._constraints,
                  _AttentionBackendRegistry._supported_arg_names):
        monkeypatch.setitem(table, name, table[name])
    monkeypatch.setattr(fa3, "device_problem", lambda device, dtype: None)  # the CPU stands in for a Hopper GPU
    return calls


@pytest.mark.parametrize("name, backend", [("cudnn", "_native_cudnn"), ("flash", "_native_flash"),
                                           ("sdpa", "native"), ("fa3", "_flash_3")])
def test_attention_names_select_diffusers_backends(name, backend):
    assert accel.ATTENTION_BACKENDS[name] == backend
    assert set(accel.ATTENTION_MODES) == {"auto", "cudnn", "fa3", "flash", "sdpa"}


def test_sdpa_sets_the_native_backend_and_auto_keeps_the_default_on_cpu(model):
    assert accel.set_attention(model, "sdpa") == "native"
    assert _processor_backends(model) == {"AttentionBackendName.NATIVE"}
    assert accel.set_attention(model, "auto") is None
    assert _processor_backends(model) == {"None"}


def test_accel_accepts_exactly_the_attention_and_offload_names():
    for name in accel.ATTENTION_MODES:
        assert accel.Accel(attention=name).check().attention == name
    for mode in (None, "group", "model"):
        accel.Accel(offload=mode).check()
    for bad in ({"attention": "_native_cudnn"}, {"attention": None}, {"offload": "disk"}, {"fp8": "int4"}):
        with pytest.raises(UserError, match="unknown"):
            accel.Accel(**bad).check()


def test_fa3_without_the_wheel_is_one_line_naming_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, fa3.MODULE, None)  # import fails as when the wheel is absent
    with pytest.raises(UserError) as err:
        accel.apply_accel(model, accel.Accel(attention="fa3", compile=False))
    assert fa3.WHEEL in str(err.value) and "\n" not in str(err.value)


def test_fa3_on_the_cpu_is_one_line_naming_the_wheel(model, monkeypatch):
    module = types.ModuleType(fa3.MODULE)
    module.flash_attn_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, fa3.MODULE, module)  # installed, but the model is on the CPU
    with pytest.raises(UserError, match="Hopper") as err:
        accel.set_attention(model, "fa3")
    assert fa3.WHEEL in str(err.value) and "\n" not in str(err.value)


def test_fa3_needs_hopper_and_bf16():
    assert "cpu" in fa3.device_problem("cpu", torch.bfloat16)


def test_fake_fa3_through_the_registry_matches_sdpa(model, inputs, fake_fa3):
    accel.set_attention(model, "sdpa")
    want = _predict(model, inputs)
    assert accel.set_attention(model, "fa3") == "_flash_3"
    assert _processor_backends(model) == {"AttentionBackendName._FLASH_3"}
    got = _predict(model, inputs)
    assert len(fake_fa3) == len(model.transformer.transformer_blocks)  # every block's attention ran the kernel
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fake_fa3_with_fused_ops_and_the_prompt_length_split(model, inputs, fake_fa3):
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    accel.set_attention(model, "sdpa")
    want = _predict(model, inputs, mask)  # one masked batch on SDPA
    accel.apply_accel(model, accel.Accel(attention="fa3", compile=False))
    got = _predict(model, inputs, mask)  # split into two unmasked passes, both on the kernel
    assert len(fake_fa3) == 2 * len(model.transformer.transformer_blocks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fake_fa3_leaves_masked_calls_to_sdpa(model, inputs, fake_fa3):
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    accel.set_attention(model, "sdpa")
    want = _predict(model, inputs, mask)
    accel.set_attention(model, "fa3")
    got = _predict(model, inputs, mask)  # no prompt-length split: one masked batch
    assert fake_fa3 == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fake_fa3_refuses_training(model, inputs, fake_fa3):
    accel.set_attention(model, "fa3")
    latents, t, embeds, shapes, cond = inputs
    latents = latents.clone().requires_grad_(True)
    with pytest.raises(UserError, match="forward only"):
        model.predict(latents, t, embeds, None, shapes, cond)


@pytest.mark.slow
def test_fake_fa3_under_the_compiled_blocks(model, inputs, fake_fa3):
    accel.set_attention(model, "sdpa")
    want = _predict(model, inputs)
    accel.apply_accel(model, accel.Accel(attention="fa3"))  # fullgraph regional compile through the backend
    got = _predict(model, inputs)
    assert len(fake_fa3) > 0  # traced into the compiled graph (calls counted while tracing)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
