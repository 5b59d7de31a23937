"""editkit.models.accel: the lossless switches compute the same function as diffusers (tiny, CPU)."""

import pytest
import torch

from bench.fullsize import PRESETS, build_transformer
from bench.gpu_bench import DitInputs, cfg_step_batched, cfg_step_two_pass, forward, rel_err
from editkit.errors import UserError
from editkit.models import accel


class _Run:
    device = torch.device("cpu")
    preset = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny():
    return build_transformer(_Run.preset, "cpu", seed=0)


def test_fused_block_ops_match_diffusers(tiny):
    x = DitInputs(_Run())
    with torch.no_grad():
        want = forward(tiny, x, x.latents, x.pos)
        masked = DitInputs(_Run(), neg_tokens=_Run.preset.text_tokens // 2)
        want_step = cfg_step_two_pass(tiny, masked)
        accel.fuse_block_ops(tiny)
        assert isinstance(tiny.transformer_blocks[0].attn.processor, accel.FusedDoubleStreamProcessor)
        got = forward(tiny, x, x.latents, x.pos)
        got_step = cfg_step_batched(tiny, masked)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got_step, want_step) < 1e-5  # padded + masked batch through the fused processor


def test_rope_real_equals_complex():
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    x = torch.randn(2, 7, 3, 8)
    freqs = torch.polar(torch.ones(7, 4), torch.randn(7, 4))
    want = apply_rotary_emb_qwen(x, freqs, use_real=False)
    assert torch.allclose(accel._rope_real(x, torch.view_as_real(freqs)), want, atol=1e-6)


def test_auto_attention_keeps_default_on_cpu(tiny):
    assert accel.pick_attention_backend("cpu") is None
    assert accel.set_attention(tiny, "auto") is None


def test_unknown_modes_are_user_errors(tiny):
    with pytest.raises(UserError):
        accel.apply_fp8(tiny, "int3")
    with pytest.raises(UserError):
        accel.apply_accel(tiny, accel.Accel(compile=False, offload="disk"))


def test_split_prompt_lengths_matches_the_masked_batch():
    from editkit.models.families import get_family

    model = get_family("qwen-image-edit-2511").build_tiny(seed=0)
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    embeds = torch.randn(3, 9, 64, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 9])
    shapes = [[(1, 4, 4), (1, 4, 4)]] * 3
    t = torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad():
        want = model.predict(latents, t, embeds, mask, shapes, cond)
        model.split_prompt_lengths()
        got = model.predict(latents, t, embeds, mask, shapes, cond)
        calls = []
        original = model.transformer.forward
        model.transformer.forward = lambda *a, **k: calls.append(k["encoder_hidden_states_mask"]) or original(*a, **k)
        model.predict(latents, t, embeds, mask, shapes, cond)
    assert rel_err(got, want) < 1e-5
    assert calls == [None, None]  # two unmasked passes: lengths 5 and 9


def test_gelu_epilogue_leaves_lora_wrapped_layers_to_their_own_forward():
    import types

    from diffusers.models.activations import GELU
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    module = GELU(8, 16, approximate="tanh")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), module)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = module(x)  # includes the LoRA delta
        module.forward = types.MethodType(accel._gelu_tanh_epilogue, module)
        got = module(x)
    assert torch.equal(got, want)
