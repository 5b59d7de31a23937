"""Qwen-Image-Layered: editkit's decomposition equals diffusers' QwenImageLayeredPipeline on the tiny
preset (fp32, CPU, max abs difference <= 1e-4), and a save-tiny folder loads in both.

The pipeline accepts only the 640 and 1024 buckets; the tests patch its `calculate_dimensions` to
the tiny model's area (as tests/test_models_parity.py patches the edit pipelines' view sizes) and
set its dropped-token count to the one editkit derives for the byte-level tokenizer.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.models import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:qwen-image-layered", dtype="fp32", device="cpu")


def _image(seed, size):
    """A random RGBA image with a varied alpha (the RGBA VAE sees it)."""
    pixels = np.random.RandomState(seed).rand(size[1], size[0], 4)
    pixels[..., 3] = 0.5 + 0.5 * pixels[..., 3]
    return Image.fromarray((pixels * 255).astype("uint8"), "RGBA")


def _pipeline(model, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered_module

    original = layered_module.calculate_dimensions
    monkeypatch.setattr(layered_module, "calculate_dimensions", lambda area, ratio: original(model.output_area, ratio))
    pipe = layered_module.QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, processor=model.processor,
        transformer=model.transformer)
    pipe.prompt_template_encode_start_idx = model.drop_idx
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipeline(pipe, image, prompt, layers, cfg, normalize, steps, seed):
    """The pipeline's final packed latents (its output_type="latent" branch fails in 0.42.1:
    they are caught after the last step) and its decoded layers as float arrays."""
    caught = {}

    def keep(_pipe, _i, _t, kwargs):
        caught["latents"] = kwargs["latents"]
        return {}

    layers_np = pipe(image=image, prompt=prompt, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg,
                     layers=layers, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                     output_type="np", resolution=640, cfg_normalize=normalize, use_en_prompt=True,
                     callback_on_step_end=keep).images[0]
    return caught["latents"], np.asarray(layers_np)


CASES = [(2, 4.0, True), (2, 1.0, True), (4, 4.0, False), (4, 1.0, True)]


@pytest.mark.parametrize("layers,cfg,normalize", CASES, ids=[f"{n}layers-cfg{c}-norm{int(z)}" for n, c, z in CASES])
def test_decomposition_matches_the_pipeline(model, monkeypatch, layers, cfg, normalize):
    image, prompt, steps, seed = _image(0, (80, 48)), "a red square over a blue field", 3, 7
    ref_latents, ref_pixels = _run_pipeline(_pipeline(model, monkeypatch), image, prompt, layers, cfg, normalize,
                                            steps, seed)

    inputs = model.prepare_layers([prompt], [image], layers, [" "] if cfg > 1 else None)
    latents = model.sample_layers(inputs, steps, cfg, [seed], cfg_normalize=normalize)
    with torch.no_grad():
        pixels = model.decode_layers(latents, inputs.width, inputs.height, layers)[0]
    pixels = model.image_processor.postprocess(pixels, output_type="np")

    assert latents.shape == ref_latents.shape
    assert ref_latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    assert pixels.shape == ref_pixels.shape == (layers, inputs.height, inputs.width, 4)
    assert np.abs(pixels - ref_pixels).max() <= TOL
    assert pixels[..., 3].std() > 0  # alpha is decoded, not constant


def test_auto_caption_matches_the_pipeline(model, monkeypatch):
    """No prompt: the VLM describes the image first, as the pipeline does; the layers then agree."""
    image = _image(1, (64, 64))
    pipe = _pipeline(model, monkeypatch)
    ref_caption = pipe.get_image_caption(pipe.image_processor.resize(image, 64, 64), use_en_prompt=True,
                                         device=torch.device("cpu"))
    assert model.caption([image], "en") == [ref_caption]

    _, ref_pixels = _run_pipeline(pipe, image, "", 2, 4.0, True, 2, 3)
    layers = model.decompose([image], layers=2, steps=2, cfg=4.0, seeds=[3], prompts=None)[0]
    ours = np.stack([np.asarray(layer, dtype=np.float32) / 255 for layer in layers])
    assert np.abs(ours - ref_pixels).max() <= 1 / 255 + 1e-6  # 8-bit rounding of the same layers


def test_a_batch_decomposes_each_image_as_alone(model):
    """Per-image seeds and prompts; images of other sizes and layer counts go in their own batches."""
    images = [_image(2, (64, 64)), _image(3, (64, 64)), _image(4, (96, 48))]
    prompts, seeds = ["one", "a longer description", "three"], [5, 6, 7]
    together = model.decompose(images, layers=[2, 2, 3], steps=2, cfg=4.0, seeds=seeds, prompts=prompts)
    assert [len(layers) for layers in together] == [2, 2, 3]
    assert together[2][0].size == model.layer_size(images[2]) and together[2][0].mode == "RGBA"
    for i in range(3):
        alone = model.decompose([images[i]], layers=[2, 2, 3][i], steps=2, cfg=4.0, seeds=[seeds[i]],
                                prompts=[prompts[i]])[0]
        assert _largest_difference(alone, together[i]) <= 1  # up to 8-bit rounding of batched arithmetic
    other_seed = model.decompose([images[0]], layers=2, steps=2, cfg=4.0, seeds=[99], prompts=[prompts[0]])[0]
    assert _largest_difference(other_seed, together[0]) > 1


def _largest_difference(layers, others) -> int:
    return max(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) for a, b in zip(layers, others))


def test_predict_is_a_differentiable_velocity(model):
    """A decomposition training stage steps `predict` on packed layer latents."""
    image = _image(5, (64, 64))
    inputs = model.prepare_layers(["a cat"], [image], 2)
    h, w = model.latent_size(inputs.width, inputs.height)
    x = torch.randn(1, 3, model.latent_channels, h, w, requires_grad=True)
    velocity = model.predict(model.pack_layers(x), torch.tensor([0.5]), inputs.prompt_embeds, inputs.prompt_mask,
                             inputs.img_shapes, inputs.cond_latents)
    assert velocity.shape == model.pack_layers(x).shape
    velocity.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(model.unpack_layers(model.pack_layers(x.detach()), 3, h, w), x.detach())


def test_the_edit_engine_points_to_layers_decompose(model):
    from editkit.infer.engine import EditRequest, Engine

    engine = Engine(model, model_name="tiny:qwen-image-layered")
    with pytest.raises(UserError, match="editkit layers decompose"):
        engine.edit([EditRequest("make it red", [_image(0, (64, 64)).convert("RGB")], steps=2)])


def test_save_tiny_folder_loads_in_diffusers_and_editkit(tmp_path, model):
    from diffusers import QwenImageLayeredPipeline

    from editkit.models import save_tiny
    from editkit.models.families import detect_family

    # a released folder (no editkit entries) is told apart by its pipeline class or transformer flags
    assert detect_family({"_class_name": "QwenImageLayeredPipeline"}, {}) == "qwen-image-layered"
    assert detect_family({}, {"use_layer3d_rope": True, "use_additional_t_cond": True}) == "qwen-image-layered"
    assert detect_family({"_class_name": "QwenImageEditPlusPipeline"}, {"zero_cond_t": True}) != "qwen-image-layered"

    folder = save_tiny(tmp_path / "layered", family="qwen-image-layered")
    loaded = load_model(folder, dtype="fp32", device="cpu")  # detected from the folder
    assert loaded.family.name == "qwen-image-layered" and type(loaded).__name__ == "QwenImageLayeredModel"
    # transformers builds a Qwen2VLProcessor only with torchvision (its video processor), which this
    # environment lacks: the processor is passed in, every other component comes from the folder
    pipe = QwenImageLayeredPipeline.from_pretrained(folder, processor=loaded.processor, local_files_only=True)
    assert pipe.transformer.config.use_layer3d_rope and pipe.transformer.config.use_additional_t_cond
    assert pipe.vae.config.input_channels == 4
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(model, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_folder_with_an_rgb_vae_is_refused(tmp_path):
    import shutil

    from editkit.models import save_tiny

    folder = save_tiny(tmp_path / "layered", family="qwen-image-layered")
    edit = save_tiny(tmp_path / "edit", family="qwen-image-edit-2511")
    shutil.rmtree(folder / "vae")
    shutil.copytree(edit / "vae", folder / "vae")
    with pytest.raises(UserError, match="needs an RGBA VAE"):
        load_model(folder, dtype="fp32", device="cpu")
