"""Parity with the diffusers pipelines on the tiny presets (fp32, CPU): same weights, seed, steps,
CFG and sizes give the same latents and pixels (max abs difference <= 1e-4).

The pipelines hard-code their view sizes (module constants, or 1024*1024 inline in the first
release); the tests patch them to the tiny model's sizes, and set the pipeline's dropped-token
count to the one editkit derives for the byte-level tokenizer.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.infer.sampler import sample
from editkit.models import load_model

TOL = 1e-4


def _image(seed, size):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _pipeline(model, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    if model.family.pipeline_class == "QwenImageEditPipeline":
        original = edit_module.calculate_dimensions
        tiny_dimensions = lambda area, ratio: original(model.vae_image_area, ratio)  # noqa: E731
        monkeypatch.setattr(edit_module, "calculate_dimensions", tiny_dimensions)
        cls = edit_module.QwenImageEditPipeline
    else:
        monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", model.vlm_image_area)
        monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", model.vae_image_area)
        cls = plus_module.QwenImageEditPlusPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        processor=model.processor,
        transformer=model.transformer,
    )
    pipe.prompt_template_encode_start_idx = model.drop_idx
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    ("qwen-image-edit-2509", 1, 4.0, "cpu"),
    ("qwen-image-edit-2509", 2, 4.0, "cpu"),
    ("qwen-image-edit-2511", 1, 4.0, "cpu"),
    ("qwen-image-edit-2511", 2, 1.0, "cpu"),
    ("qwen-image-edit", 1, 4.0, "cpu"),
]
if torch.cuda.is_available():  # the same bar on the GPU machine
    CASES += [("qwen-image-edit-2511", 2, 4.0, "cuda"), ("qwen-image-edit", 1, 4.0, "cuda")]


@pytest.mark.parametrize("family,num_images,cfg,device", CASES, ids=[f"{f}-{n}img-cfg{c}-{d}" for f, n, c, d in CASES])
def test_matches_diffusers_pipeline(family, num_images, cfg, device, monkeypatch):
    model = load_model(f"tiny:{family}", dtype="fp32", device=device)
    images = [_image(0, (128, 64)), _image(1, (64, 80))][:num_images]
    prompt, negative, width, height, steps, seed = "make the sky red", " ", 64, 48, 3, 7
    pipe = _pipeline(model, monkeypatch)
    call = dict(
        image=images if model.family.max_images is None else images[0],
        prompt=prompt,
        negative_prompt=negative if cfg > 1 else None,
        true_cfg_scale=cfg,
        num_inference_steps=steps,
        width=width,
        height=height,
    )
    ref_latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    ref_pixels = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images

    inputs = model.prepare([prompt], [images], width, height, [negative] if cfg > 1 else None)
    latents = sample(model, inputs, steps=steps, true_cfg_scale=cfg, seeds=[seed])
    with torch.no_grad():
        pixels = model.image_processor.postprocess(model.decode_packed(latents, width, height), output_type="np")

    assert latents.shape == ref_latents.shape
    assert ref_latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    assert np.abs(pixels - ref_pixels).max() <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_gpu_is_close_to_the_pipeline(monkeypatch):
    """bf16 differs from the pipeline only by rounding (CFG runs batched here, separately there)."""
    model = load_model("tiny:qwen-image-edit-2511", dtype="bf16", device="cuda")
    images = [_image(0, (128, 64)), _image(1, (64, 80))]
    pipe = _pipeline(model, monkeypatch)
    ref = pipe(
        image=images, prompt="make the sky red", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3,
        width=64, height=48, generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
    ).images.float()
    inputs = model.prepare(["make the sky red"], [images], 64, 48, [" "])
    latents = sample(model, inputs, steps=3, true_cfg_scale=4.0, seeds=[7]).float()
    assert (latents - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
