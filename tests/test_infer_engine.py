"""The batched engine on the tiny preset (fp32, CPU): batching, seeds, fusion, LoRA, bridge."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from editkit.errors import UserError
from editkit.infer.engine import EditRequest, Engine
from editkit.models import lora as L


@pytest.fixture(scope="module")
def engine():
    from editkit.models import load_model

    return Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")


def noise_image(seed, size):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def pixels(img):
    return np.asarray(img).astype(int)


def test_mixed_batch_equals_one_by_one(engine):
    wide, square = noise_image(1, (128, 32)), noise_image(2, (64, 64))
    requests = [
        EditRequest("make it blue", [square], steps=2, seed=1),
        EditRequest("add a red circle on the left", [wide], steps=2, seed=2, width=96, height=32),
        EditRequest("x", [square], steps=2, seed=3, negative_prompt=None, true_cfg_scale=2.5),
        EditRequest("put the two together", [square, wide], steps=2, seed=4),
        EditRequest("make it blue", [square], steps=2, seed=5, true_cfg_scale=6.0),
    ]
    groups = engine.group(requests)
    assert sorted(len(g) for g in groups) == [1, 1, 3]  # the three 64x64 single-source requests share a batch
    steps_seen = []
    batched = engine.edit(requests, progress=lambda s, n: steps_seen.append((s, n)))
    assert steps_seen[-1] == (6, 6) and len(steps_seen) == 6
    # 2511: size of the last source
    assert [img.size for img in batched] == [(64, 64), (96, 32), (64, 64), (128, 32), (64, 64)]
    for request, image in zip(requests, batched):
        alone = engine.edit([request])[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 1
    assert np.abs(pixels(batched[0]) - pixels(batched[4])).max() > 0  # seed/cfg differ -> images differ


def test_seed_decides_the_noise(engine):
    src = noise_image(3, (64, 64))
    a, b, c = engine.edit([EditRequest("blue", [src], steps=2, seed=s) for s in (7, 7, 8)])
    # rows of one batch may round differently on the CPU (the BLAS blocks by batch position, and the
    # blocking can change within a process), so "same" is within one grey level, as batched vs alone
    assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(a) - pixels(c)).max() > 16  # another seed is another noise: a different image


@pytest.mark.parametrize("mode", ["pixel-mask", "latent+pixel-mask"])
def test_pixel_fusion_keeps_the_source_outside_the_mask(engine, mode):
    src = noise_image(4, (64, 64))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 39, 39), fill=255)
    out = engine.edit([EditRequest("blue", [src], steps=2, mask=mask, fusion=mode, feather=2)])[0]
    far = np.ones((64, 64), bool)
    far[24 - 7:40 + 7, 24 - 7:40 + 7] = False
    assert np.array_equal(pixels(out)[far], pixels(src)[far])


def test_latent_fusion_ends_on_the_source_latents_outside_the_mask(engine):
    from editkit.infer import sampler

    model = engine.model
    src = noise_image(5, (64, 64))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    request = EditRequest("blue", [src], steps=3, mask=mask, fusion="latent-mask")
    source = engine._source_latents([request], 64, 64)
    inputs = model.prepare(["blue"], [[src]], 64, 64, [" "])
    noise = sampler.initial_noise(model, 64, 64, [0], inputs.prompt_embeds.dtype)
    runner = engine._masked([request], 64, 64, noise - source)
    packed = sampler.sample(runner, inputs, 3, [4.0], [0], latents=noise)
    latents, src_latents = model.unpack(packed, 8, 8), model.unpack(source, 8, 8)
    torch.testing.assert_close(latents[..., 4:], src_latents[..., 4:], atol=1e-5, rtol=1e-5)
    assert (latents[..., :3] - src_latents[..., :3]).abs().max() > 1e-2
    unmasked = sampler.sample(model, inputs, 3, [4.0], [0], latents=noise)
    assert (model.unpack(unmasked, 8, 8)[..., 4:] - src_latents[..., 4:]).abs().max() > 1e-2


def _random_lora(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (name, module) in enumerate(transformer.named_modules()):
        if name.endswith(("attn.to_q", "attn.to_v", "img_mlp.net.2")):
            r = 2 + i % 3
            modules[name] = L.LoraModule(torch.randn(r, module.in_features, generator=g) * 0.2,
                                         torch.randn(module.out_features, r, generator=g) * 0.2,
                                         torch.tensor(float(r * 2)))
    return L.build(modules, "comfyui")


@pytest.mark.slow
def test_lora_from_every_layout_gives_the_same_edit_fuse_and_unload(engine, tmp_path):
    src = noise_image(6, (64, 64))
    request = EditRequest("blue", [src], steps=2, seed=1)
    base = pixels(engine.edit([request])[0])
    sd = _random_lora(engine.model.transformer)
    outputs = {}
    for layout in L.LAYOUTS:
        path = L.save_lora(tmp_path / f"{layout}.safetensors", L.convert(sd, to=layout), layout)
        engine.load_loras([f"{path}:0.8"])
        outputs[layout] = pixels(engine.edit([request])[0])
        assert engine.settings(request)["lora"] == [[str(path), 0.8]]
    reference = outputs["diffusers"]
    assert np.abs(reference - base).max() > 5
    for layout, out in outputs.items():
        assert np.array_equal(out, reference), layout
    engine.unload_loras()
    assert np.array_equal(pixels(engine.edit([request])[0]), base)
    engine.load_loras([f"{tmp_path / 'comfyui.safetensors'}:0.8"], fuse=True)
    assert np.abs(pixels(engine.edit([request])[0]) - reference).max() <= 1
    engine.unload_loras()
    assert np.abs(pixels(engine.edit([request])[0]) - base).max() <= 1


def test_bridge_sampler_runs_without_cfg(engine):
    src = noise_image(7, (64, 64))
    one, two = engine.edit([EditRequest("blue", [src], steps=1, sampler="bridge"),
                            EditRequest("blue", [src], steps=2, sampler="bridge")])
    assert one.size == two.size == (64, 64)
    assert not np.array_equal(pixels(one), pixels(two))


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": " "}, "instruction is empty"),
    ({"steps": 0}, "steps"),
    ({"steps": 1}, "at least 2 steps"),
    ({"sampler": "ddim"}, "sampler"),
    ({"fusion": "pixel-mask"}, "needs a mask"),
    ({"fusion": "soft"}, "fusion mode"),
])
def test_bad_requests_are_user_errors(engine, kwargs, message):
    request = EditRequest(**{"prompt": "blue", "images": [noise_image(0, (64, 64))], **kwargs})
    with pytest.raises(UserError, match=message):
        engine.edit([request])


def test_bridge_start_is_the_same_in_training_and_in_the_engine(engine, tmp_path):
    """A source of another aspect than the output: training, previews and the engine all start the
    LBM bridge from the source covering the output and centre-cropped (never stretched)."""
    from editkit.data.records import EditRecord
    from editkit.train.samples import encode_records

    wide = noise_image(11, (128, 48))  # 8:3 source for a 64x64 output
    wide.save(tmp_path / "src.png")
    noise_image(12, (64, 64)).save(tmp_path / "tgt.png")
    record = EditRecord(id="a", instruction="x", sources=[tmp_path / "src.png"], target=tmp_path / "tgt.png")
    trained = encode_records(engine.model, [record], (64, 64))[0]["bridge_source"]
    request = EditRequest("x", [Image.open(tmp_path / "src.png").convert("RGB")], sampler="bridge")
    started = engine._source_latents([request], 64, 64)
    torch.testing.assert_close(engine.model.pack(trained[None].to(started)), started)
    stretched = engine.model.pack(engine.model.encode_images([wide], 64, 64))
    assert not torch.allclose(stretched, started, atol=1e-3)


def test_cfg_one_edits_do_not_encode_the_negative_prompt(engine, monkeypatch):
    seen = []
    prepare = engine.model.prepare

    def spy(prompts, images, width, height, negatives=None, **kw):
        seen.append(list(negatives))
        return prepare(prompts, images, width, height, negatives, **kw)

    monkeypatch.setattr(engine.model, "prepare", spy)
    src = noise_image(4, (64, 64))
    images = engine.edit([EditRequest("blue", [src], steps=2, seed=1, true_cfg_scale=1.0, negative_prompt="bad"),
                          EditRequest("blue", [src], steps=2, seed=1, true_cfg_scale=4.0, negative_prompt="bad")])
    assert seen == [[None, "bad"]]  # one batch; only the CFG-4 request's negative is encoded
    alone = engine.edit([EditRequest("blue", [src], steps=2, seed=1, true_cfg_scale=1.0, negative_prompt=None)])[0]
    assert np.abs(pixels(alone) - pixels(images[0])).max() <= 1  # CFG 1 is the same edit with or without one
