"""LoRA key layouts: detection, lossless round trips, save/load, and identical model outputs from each layout.

Parity: a file editkit writes in the diffusers (and ComfyUI) layout, loaded by diffusers' own
`QwenImageLoraLoaderMixin`, changes the transformer exactly as editkit's loader does.
"""

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

from editkit.errors import UserError
from editkit.models import lora as L

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.img_mlp.net.2",
           "transformer_blocks.1.attn.to_add_out", "img_in", "proj_out"]


def tiny_transformer():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4)).eval()


def random_lora(transformer, with_alpha=True, seed=1):
    """Mixed ranks and alphas, B non-zero so the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, name in enumerate(TARGETS):
        w = transformer.get_submodule(name).weight
        r = 2 if i % 2 else 4
        alpha = torch.tensor(float([1, 4, 8][i % 3])) if with_alpha else None
        modules[name] = L.LoraModule(torch.randn(r, w.shape[1], generator=g) * 0.3,
                                     torch.randn(w.shape[0], r, generator=g) * 0.3, alpha)
    return L.build(modules, "comfyui" if with_alpha else "peft")


def forward(transformer):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, generator=g)
    txt = torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=txt,
                           encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long),
                           timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_detect_and_round_trip_every_layout(layout):
    sd = random_lora(tiny_transformer())
    converted = L.convert(sd, to=layout)
    assert L.detect_layout(converted) == layout
    back = L.convert(converted, to="comfyui")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_save_load_round_trip_keeps_alphas(tmp_path, layout):
    sd = random_lora(tiny_transformer())
    path = L.save_lora(tmp_path / "x.safetensors", L.convert(sd, to=layout), layout, {"base": "tiny"})
    loaded, header = L.load_lora(path)
    assert header["base"] == "tiny" and header["editkit_layout"] == layout
    back = L.convert(loaded, to="comfyui")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob(".tmp-*"))


def test_diffusers_file_keeps_alpha_in_peft_metadata(tmp_path):
    sd = random_lora(tiny_transformer())
    path = L.save_lora(tmp_path / "d.safetensors", sd, "diffusers")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and ".alpha" not in k for k in keys)
    config = json.loads(header[L.METADATA_KEY])
    assert config["transformer.lora_alpha"] in (1.0, 4.0, 8.0)


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_model_output_is_identical_from_every_layout(tmp_path, layout):
    t = tiny_transformer()
    base = forward(t)
    sd = random_lora(t)
    reference_path = L.save_lora(tmp_path / "ref.safetensors", sd, "comfyui")
    L.apply_loras(t, [L.LoraSpec(str(reference_path))])
    reference = forward(t)
    L.unload_loras(t)
    assert torch.equal(forward(t), base)

    path = L.save_lora(tmp_path / f"{layout}.safetensors", L.convert(sd, to=layout), layout)
    L.apply_loras(t, [L.LoraSpec(str(path))])
    out = forward(t)
    assert not torch.allclose(out, base, atol=1e-3)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_parity_with_diffusers_loader(tmp_path, layout):
    ours, theirs = tiny_transformer(), tiny_transformer()
    sd = random_lora(ours)
    path = L.save_lora(tmp_path / "l.safetensors", L.convert(sd, to=layout), layout)
    L.apply_loras(ours, [L.LoraSpec(str(path))])
    state_dict, metadata = QwenImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    QwenImageLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=theirs, metadata=metadata)
    torch.testing.assert_close(forward(ours), forward(theirs), atol=1e-5, rtol=1e-5)


def test_scales_several_adapters_fuse_and_unload(tmp_path):
    t = tiny_transformer()
    base = forward(t)
    a = L.save_lora(tmp_path / "a.safetensors", random_lora(t, seed=1), "diffusers")
    b = L.save_lora(tmp_path / "b.safetensors", random_lora(t, with_alpha=False, seed=2), "diffsynth")
    L.apply_loras(t, [L.LoraSpec(str(a), 0.5)])
    half = forward(t)
    L.apply_loras(t, [L.LoraSpec(str(a), 1.0)])
    full = forward(t)
    assert not torch.allclose(half, full, atol=1e-4)
    specs = [L.LoraSpec(str(a), 0.7), L.LoraSpec(str(b), 0.4)]
    assert L.apply_loras(t, specs) == ["lora0", "lora1"]
    unfused = forward(t)
    L.apply_loras(t, specs, fuse=True)
    torch.testing.assert_close(forward(t), unfused, atol=1e-5, rtol=1e-4)
    L.unload_loras(t)
    assert L.adapter_names(t) == []
    torch.testing.assert_close(forward(t), base, atol=1e-5, rtol=1e-4)


def test_bad_files_and_keys_are_user_errors(tmp_path):
    t = tiny_transformer()
    with pytest.raises(UserError, match="not found"):
        L.load_lora(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        L.load_lora(junk)
    with pytest.raises(UserError, match="not a LoRA key"):
        L.detect_layout({"model.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="no up/B"):
        L.parse({"diffusion_model.x.lora_down.weight": torch.zeros(2, 3)})
    sd = L.convert(random_lora(t), to="peft")
    sd["transformer_blocks.9.attn.to_q.lora_A.weight"] = torch.zeros(2, 16)
    sd["transformer_blocks.9.attn.to_q.lora_B.weight"] = torch.zeros(16, 2)
    with pytest.raises(UserError, match="not in this transformer"):
        L.add_adapter(t, sd, "x")
    with pytest.raises(UserError, match="not a number"):
        L.LoraSpec.parse(f"{junk}:strong")
    with pytest.raises(UserError, match="not found"):
        L.LoraSpec.parse(str(tmp_path / "nope.safetensors"))
    assert L.LoraSpec.parse(f"{junk}:0.5") == L.LoraSpec(str(junk), 0.5)


def _kohya_key(comfy_key):
    """diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight
    -> lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"""
    name = comfy_key.removeprefix("diffusion_model.")
    if name.endswith(".alpha"):
        module, suffix = name.removesuffix(".alpha"), "alpha"
    else:
        module, down_or_up, weight = name.rsplit(".", 2)
        suffix = f"{down_or_up}.{weight}"
    return f"lora_unet_{module.replace('.', '_')}.{suffix}"


def test_kohya_files_load_with_the_same_effect(tmp_path):
    t = tiny_transformer()
    sd = random_lora(t)  # comfyui layout, with alphas
    kohya = {_kohya_key(k): v for k, v in sd.items()}
    assert L.detect_layout(kohya) == "kohya"
    modules, reference = L.parse(kohya), L.parse(sd)
    assert modules.keys() == reference.keys()
    for name, mod in modules.items():
        ref = reference[name]
        torch.testing.assert_close(mod.B @ mod.A * mod.scale, ref.B @ ref.A * ref.scale)
    path = tmp_path / "kohya.safetensors"
    from safetensors.torch import save_file

    save_file(kohya, str(path))
    L.apply_loras(t, [L.LoraSpec(str(path))])
    from_kohya = forward(t)
    L.apply_loras(t, [L.LoraSpec(str(L.save_lora(tmp_path / "c.safetensors", sd, "comfyui")))])
    torch.testing.assert_close(from_kohya, forward(t), atol=1e-5, rtol=1e-5)
