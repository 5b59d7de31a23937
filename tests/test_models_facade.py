"""EditModel facade on the tiny preset: shapes, packing, determinism, batching, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.infer.sampler import edit_images, sample
from editkit.models import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:qwen-image-edit-2511", dtype="fp32", device="cpu")


def _image(seed, size=(64, 64)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_pack_unpack_round_trip(model):
    latents = torch.randn(3, 4, 6, 10)
    packed = model.pack(latents)
    assert packed.shape == (3, 15, 16)
    assert torch.equal(model.unpack(packed, 6, 10), latents)


def test_drop_index_is_the_system_prompt_length(model):
    ids = model.tokenizer(model.family.prompt("x", 1))["input_ids"]
    prefix = model.tokenizer(model.family.system_prompt)["input_ids"]
    assert model.drop_idx == len(prefix) > 0
    assert ids[: model.drop_idx] == prefix


def test_edit_is_deterministic_per_seed(model):
    img = _image(0)
    a = edit_images(model, ["make it red"], [[img]], steps=2, seeds=[1], true_cfg_scale=1.0)[0]
    b = edit_images(model, ["make it red"], [[img]], steps=2, seeds=[1], true_cfg_scale=1.0)[0]
    c = edit_images(model, ["make it red"], [[img]], steps=2, seeds=[2], true_cfg_scale=1.0)[0]
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_instructions_give_different_embeddings(model):
    embeds, mask = model.encode_prompt(["make it red", "remove the cat"], [[_image(0)], [_image(0)]])
    assert embeds.shape[0] == 2 and mask.shape == embeds.shape[:2]
    n = int(mask[0].sum())
    assert not torch.allclose(embeds[0, :n], embeds[1, :n])


def test_first_release_takes_one_image():
    from editkit.models.families import get_family

    with pytest.raises(UserError, match="at most 1"):
        get_family("qwen-image-edit").prompt("x", 2)


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="known families"):
        load_model("tiny:nope", dtype="fp32", device="cpu")


def test_predict_rejects_mixed_img_shapes(model):
    x = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="img_shapes"):
        model.predict(x, 0.5, torch.randn(2, 3, 64), None, [[(1, 4, 4)], [(1, 2, 8)]])


def test_predict_is_differentiable(model):
    x = torch.randn(1, 16, 16, requires_grad=True)
    out = model.predict(x, 0.5, torch.randn(1, 3, 64), None, [[(1, 4, 4)]])
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sample_uses_cfg_only_with_a_negative(model):
    inputs = model.prepare(["make it red", "make it red"], [[_image(0)], [_image(0)]], negative_prompts=[" ", None])
    out = sample(model, inputs, steps=2, true_cfg_scale=4.0, seeds=[3, 3])
    assert not torch.allclose(out[0], out[1])
    plain = model.prepare(["make it red"], [[_image(0)]])
    ref = sample(model, plain, steps=2, true_cfg_scale=4.0, seeds=[3])
    assert torch.allclose(out[1], ref[0], atol=1e-5)


def test_mixed_batch_equals_one_by_one(model):
    pairs = [[_image(1, (96, 64)), _image(2)], [_image(3, (96, 64)), _image(4)], [_image(5, (96, 64)), _image(6)]]
    prompts = ["make it red", "remove the small blue square in the corner please", "x"]
    negatives = [" ", None, "blurry"]
    scales = [4.0, 4.0, 2.5]
    inputs = model.prepare(prompts, pairs, 64, 48, negatives)
    batched = sample(model, inputs, steps=2, true_cfg_scale=scales, seeds=[10, 11, 12])
    for i in range(3):
        single = model.prepare([prompts[i]], [pairs[i]], 64, 48, [negatives[i]])
        alone = sample(model, single, steps=2, true_cfg_scale=scales[i], seeds=[10 + i])
        assert (batched[i] - alone[0]).abs().max().item() <= 1e-4


def test_bridge_sampler_follows_the_bridge(model):
    from editkit.infer.sampler import sample_bridge

    inputs = model.prepare(["make it red"], [[_image(0)]], 64, 64)
    source = model.pack(model.encode_images([_image(0)], 64, 64))
    out = sample_bridge(model, inputs, source, steps=2, bridge_noise=0.0)
    with torch.no_grad():
        x = source
        for s, s_next in ((1.0, 0.5), (0.5, 0.0)):
            v = model.predict(x, s, inputs.prompt_embeds, inputs.prompt_mask, inputs.img_shapes, inputs.cond_latents)
            x = x + (s_next - s) * v
    assert torch.allclose(out, x, atol=1e-5)
    noisy_a = sample_bridge(model, inputs, source, steps=2, bridge_noise=0.5, seeds=[1])
    noisy_b = sample_bridge(model, inputs, source, steps=2, bridge_noise=0.5, seeds=[1])
    assert torch.equal(noisy_a, noisy_b) and not torch.allclose(noisy_a, out, atol=1e-3)


@pytest.mark.parametrize("size", [(1000, 700), (640, 1280), (333, 333)])
def test_sizes_follow_the_pipelines(model, size, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    img = Image.new("RGB", size)
    monkeypatch.setattr(model, "vae_image_area", plus.VAE_IMAGE_SIZE)
    monkeypatch.setattr(model, "vlm_image_area", plus.CONDITION_IMAGE_SIZE)
    monkeypatch.setattr(model, "output_area", 1024 * 1024)
    assert model.vae_size(img) == plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, size[0] / size[1])
    assert model.vlm_size(img) == plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, size[0] / size[1])
    w, h = plus.calculate_dimensions(1024 * 1024, size[0] / size[1])
    assert model.output_size([Image.new("RGB", (50, 50)), img]) == (w // 16 * 16, h // 16 * 16)
    assert model.output_size([img], 200, 99) == (192, 96)


def test_edit_plus_runs_without_source_images(model):
    inputs = model.prepare(["draw a red square"], [[]], 64, 48)
    assert inputs.cond_latents is None and inputs.img_shapes == [[(1, 3, 4)]]
    out = sample(model, inputs, steps=2, true_cfg_scale=1.0, seeds=[0])
    assert out.shape == (1, 12, 16) and torch.isfinite(out).all()


def test_a_batch_needs_matching_source_sizes(model):
    with pytest.raises(ValueError, match="group requests by shape"):
        model.prepare(["a", "b"], [[_image(0)], [_image(1, (128, 64))]], 64, 64)
