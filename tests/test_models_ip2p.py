"""The instruct-pix2pix family (InstructPix2Pix / MagicBrush) on its tiny preset (fp32, CPU): parity
with diffusers' StableDiffusionInstructPix2PixPipeline, per-request seeds in batches, its folders,
the CLI (edit, infer with a CFG sweep, sharded and resumable), mask fusion, and its refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.infer import fusion
from editkit.infer.engine import EditRequest, Engine
from editkit.infer.sampler import initial_noise, sample
from editkit.models import load_model
from tests.cli_run import run_cli

FAMILY = "instruct-pix2pix"
TINY = ["--model", f"tiny:{FAMILY}", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]
TOL = 1e-4


def _image(seed, size):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def model():
    return load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")


def _pipeline(model):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=type(model.scheduler).from_config(model.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(model, prompt, image, cfg, image_cfg, steps, seed, negative=" "):
    inputs = model.prepare([prompt], [[image]], negative_prompts=[negative])
    latents = sample(model, inputs, steps=steps, true_cfg_scale=cfg, seeds=[seed], image_cfg=[image_cfg])
    with torch.no_grad():
        pixels = model.image_processor.postprocess(model.decode_packed(latents, inputs.width, inputs.height),
                                                   output_type="np")
    return latents, pixels


SCHEDULERS = {"euler-ancestral": None, "ddim": "DDIMScheduler"}
CASES = [(7.5, 1.5, "euler-ancestral"), (1.0, 1.5, "euler-ancestral"), (7.5, 1.5, "ddim"), (1.0, 1.5, "ddim")]


@pytest.mark.parametrize("cfg,image_cfg,scheduler", CASES, ids=[f"cfg{c}-img{i}-{s}" for c, i, s in CASES])
def test_matches_diffusers_pipeline(model, cfg, image_cfg, scheduler):
    """Same weights, seed, steps and guidance give the pipeline's latents and pixels; the source is
    72x50, so both round the output down to 72x48. DDIM is the deterministic case."""
    if SCHEDULERS[scheduler]:
        from diffusers import DDIMScheduler

        model = model.with_scheduler({"_class_name": SCHEDULERS[scheduler],
                                      **DDIMScheduler.from_config(model.scheduler.config).config})
    image, prompt, steps, seed = _image(0, (72, 50)), "make the sky red", 4, 7
    pipe = _pipeline(model)
    call = dict(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=cfg,
                image_guidance_scale=image_cfg)
    ref_latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    ref_pixels = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    latents, pixels = _ours(model, prompt, image, cfg, image_cfg, steps, seed)

    assert type(pipe.scheduler).__name__ == type(model.scheduler).__name__
    latents = model.unpack(latents, 6, 9)
    assert latents.shape == ref_latents.shape == (1, 4, 6, 9)
    assert ref_latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    assert np.abs(pixels - ref_pixels).max() <= TOL


def test_guidance_changes_the_result(model):
    """cfg 1 is the unguided text+image pass (the pipeline's rule), not the guided one."""
    image = _image(1, (64, 64))
    guided, _ = _ours(model, "make it red", image, 7.5, 1.5, 3, 0)
    unguided, _ = _ours(model, "make it red", image, 1.0, 1.5, 3, 0)
    image_only, _ = _ours(model, "make it red", image, 7.5, 3.0, 3, 0)
    assert (guided - unguided).abs().max() > 1e-2 and (guided - image_only).abs().max() > 1e-2


def test_initial_noise_is_the_pipelines_draw(model):
    """Unpacked latents: the sampler's per-seed (1, 1, C, h, w) draw equals the pipeline's (1, C, h, w)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = model.unpack(initial_noise(model, 72, 48, [5, 9], torch.float32), 6, 9)
    for i, seed in enumerate((5, 9)):
        ref = randn_tensor((1, 4, 6, 9), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        assert torch.equal(noise[i : i + 1], ref)  # the same random stream, no arithmetic


def test_a_batch_of_two_equals_each_alone(model):
    """Different seeds, text and image guidance in one batch; each sample equals its run alone (up to the
    float rounding of batched matmuls: relative 1e-5 of the latents, which random weights make large)."""
    images = [_image(2, (64, 48)), _image(3, (64, 48))]
    prompts, seeds, cfgs, image_cfgs = ["make it red", "add a hat"], [11, 12], [7.5, 1.0], [1.5, 2.0]
    inputs = model.prepare(prompts, [[img] for img in images], negative_prompts=[" ", "blurry"])
    batch = sample(model, inputs, steps=3, true_cfg_scale=cfgs, seeds=seeds, image_cfg=image_cfgs)
    for i in range(2):
        alone = model.prepare([prompts[i]], [[images[i]]], negative_prompts=[[" ", "blurry"][i]])
        single = sample(model, alone, steps=3, true_cfg_scale=cfgs[i], seeds=[seeds[i]], image_cfg=[image_cfgs[i]])
        assert (batch[i : i + 1] - single).abs().max().item() <= 1e-5 * single.abs().max().item()
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_output_size_follows_the_source(model):
    image = _image(0, (100, 61))
    assert model.output_size([image]) == (96, 56)  # rounded down to multiples of 8, as the pipeline
    assert model.output_size([image], width=64) == (64, 32)  # round(64 * 61 / 100) = 39 -> 32
    assert model.output_size([image], 48, 40) == (48, 40)
    inputs = model.prepare(["x"], [[image]], 48, 40)
    assert (inputs.width, inputs.height) == (48, 40) and inputs.cond_latents.shape == (1, 4, 5, 6)


@pytest.mark.parametrize("images, message", [([], "exactly one image"), ([_image(0, (64, 64))] * 2, "at most 1")])
def test_one_source_image_per_edit(model, images, message):
    with pytest.raises(UserError, match=message):
        model.prepare(["x"], [images])


def test_save_tiny_folder_loads_in_diffusers_and_editkit(tmp_path, capsys):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    folder = tmp_path / "ip2p"
    code, out, err = run_cli(capsys, "model", "save-tiny", folder, "--family", FAMILY)
    assert code == 0, err
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline" and index["_editkit_family"] == FAMILY
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 8 and pipe.safety_checker is None
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert loaded.family.name == FAMILY and type(loaded.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    image = _image(4, (64, 64))
    ref = pipe("make it red", image=image, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1),
               output_type="latent").images
    latents, _ = _ours(loaded, "make it red", image, 7.5, 1.5, 3, 1)
    assert (loaded.unpack(latents, 8, 8) - ref).abs().max().item() <= TOL
    # detected without editkit's key, from the pipeline class alone
    del index["_editkit_family"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_model(folder, dtype="fp32", device="cpu").family.name == FAMILY


def test_edit_cli_uses_the_family_defaults(tmp_path, capsys):
    from editkit.infer.outputs import read_settings

    source = tmp_path / "a.png"
    _image(0, (72, 50)).save(source)
    out = tmp_path / "edit.png"
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", source, "--prompt", "make it blue", "--out", out,
                           "--image-cfg", "1.2", "--seed", "3")
    assert code == 0, err
    settings = read_settings(out)
    assert settings["family"] == FAMILY and settings["true_cfg_scale"] == 7.5 and settings["image_cfg"] == 1.2
    assert Image.open(out).size == (72, 48)


def test_infer_cli_sweeps_cfg_shards_and_resumes(tmp_path, capsys, monkeypatch):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord
    from editkit.infer.outputs import read_settings

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.png")
        _image(i, (64, 64)).save(paths[-1])
    manifest = tmp_path / "set.jsonl"
    write_manifest([EditRecord(id=f"r{i}", instruction=f"edit {i}", sources=[p]) for i, p in enumerate(paths)],
                   manifest, "pairs")
    args = ["infer", *TINY, "--data", manifest, "--out", tmp_path / "preds", "--cfg", "1,7.5", "--image-cfg", "1.3",
            "--batch-size", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # two ranks share the records
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png"))
    assert written == [f"cfg-{c}/r{i}.png" for c in ("1.0", "7.5") for i in range(3)]
    assert read_settings(tmp_path / "preds" / "cfg-7.5" / "r0.png")["image_cfg"] == 1.3
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "skipped" in out, (out, err)
    a = np.asarray(Image.open(tmp_path / "preds" / "cfg-1.0" / "r0.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "preds" / "cfg-7.5" / "r0.png"), dtype=int)
    assert np.abs(a - b).max() > 0


def test_engine_batches_requests_with_their_own_seeds(model):
    engine = Engine(model, max_batch=2)
    image = _image(5, (64, 64))
    requests = [EditRequest("make it red", [image], steps=2, seed=s) for s in (1, 2)]
    together = engine.edit(requests)
    alone = [engine.edit([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert np.abs(np.asarray(together[0], dtype=int) - np.asarray(together[1], dtype=int)).max() > 0


def _half_mask(size):
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # the left half is the edit region
    return mask


def test_pixel_mask_keeps_the_source_outside_the_mask(model):
    image = _image(6, (64, 64))
    out = Engine(model).edit([EditRequest("make it red", [image], steps=2, mask=_half_mask((64, 64)),
                                          fusion="pixel-mask", feather=2)])[0]
    got, src = np.asarray(out, dtype=int), np.asarray(image, dtype=int)
    assert np.array_equal(got[:, 40:], src[:, 40:])  # more than 3 * feather from the edit region
    assert np.abs(got[:, :24] - src[:, :24]).max() > 0


def test_latent_mask_keeps_the_background_on_the_source_path(model):
    """The engine's latent-mask hook (blend toward `noise - source`): the latents outside the mask end
    on the source's, those inside are the model's; a mask covering everything changes nothing."""
    image = _image(7, (64, 64))
    inputs = model.prepare(["make it red"], [[image]], negative_prompts=[" "])
    noise = initial_noise(model, 64, 64, [3], torch.float32)
    source = model.encode_images([image], 64, 64)
    free = sample(model, inputs, steps=3, true_cfg_scale=7.5, seeds=[3], latents=noise)

    def fused(mask):
        weight = model.pack(fusion.latent_mask(mask, (8, 8))[None, None].expand(1, 4, 8, 8).contiguous())
        hooked = model.with_velocity_hook(lambda v: fusion.blend_latents(v, noise - model.pack(source), weight))
        return model.unpack(sample(hooked, inputs, steps=3, true_cfg_scale=7.5, seeds=[3], latents=noise), 8, 8)

    half = fused(_half_mask((64, 64)))
    assert (half[..., 4:] - source[..., 4:]).abs().max().item() <= 1e-5
    assert (half[..., :4] - source[..., :4]).abs().max().item() > 0.1
    free = model.unpack(free, 8, 8)
    assert (fused(Image.new("L", (64, 64), 255)) - free).abs().max().item() <= 1e-6


def test_latent_mask_through_the_engine(model):
    """The VAE's mid-block attention lets every decoded pixel see every latent, so the engine-level
    checks use whole-image masks: none to edit gives the source's VAE reconstruction, all to edit
    the unfused edit; latent+pixel-mask pastes the source pixels far from a half mask."""
    image = _image(8, (64, 64))
    engine = Engine(model)

    def edit(mask, mode):
        return np.asarray(engine.edit([EditRequest("make it red", [image], steps=2, mask=mask, fusion=mode,
                                                   feather=2)])[0], dtype=int)

    with torch.no_grad():
        recon = np.asarray(model.to_pil(model.decode_latents(model.encode_images([image], 64, 64)))[0], dtype=int)
    off = np.asarray(engine.edit([EditRequest("make it red", [image], steps=2)])[0], dtype=int)
    assert np.abs(edit(Image.new("L", (64, 64), 0), "latent-mask") - recon).max() <= 1
    assert np.abs(edit(Image.new("L", (64, 64), 255), "latent-mask") - off).max() <= 1
    assert np.abs(off - recon).max() > 8
    both = edit(_half_mask((64, 64)), "latent+pixel-mask")
    assert np.array_equal(both[:, 40:], np.asarray(image, dtype=int)[:, 40:])


def test_a_lora_on_the_unet_changes_the_edit(model, tmp_path):
    from editkit.models import lora as L

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    layer = model.unet.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    modules = {name: L.LoraModule(torch.randn(2, layer.in_features, generator=g),
                                  torch.randn(layer.out_features, 2, generator=g), torch.tensor(2.0))}
    path = L.save_lora(tmp_path / "unet.safetensors", L.build(modules, "peft"), "peft")
    engine = Engine(load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu"))
    request = EditRequest("make it red", [_image(9, (64, 64))], steps=2)
    base = np.asarray(engine.edit([request])[0], dtype=int)
    engine.load_loras([f"{path}:1.0"])
    with_lora = np.asarray(engine.edit([request])[0], dtype=int)
    engine.unload_loras()
    assert np.abs(with_lora - base).max() > 0
    assert np.array_equal(np.asarray(engine.edit([request])[0], dtype=int), base)


def test_train_refuses_the_family_in_one_line(tmp_path, capsys):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    source = tmp_path / "a.png"
    _image(0, (64, 64)).save(source)
    manifest = tmp_path / "train.jsonl"
    write_manifest([EditRecord(id="a", instruction="x", sources=[source], target=source)], manifest, "pairs")
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"model": f"tiny:{FAMILY}", "output_dir": str(tmp_path / "run"),
                                  "data": {"train": [{"manifest": str(manifest)}], "area": 4096, "multiple": 16},
                                  "train": {"mode": "lora", "lora": {"rank": 4}},
                                  "loop": {"max_steps": 1, "mixed_precision": "no", "tensorboard": False}}))
    code, _, err = run_cli(capsys, "train", config)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "for editing and evaluation only" in lines[0], err


def test_the_bridge_sampler_is_refused_in_one_line(tmp_path, capsys):
    source = tmp_path / "a.png"
    _image(0, (64, 64)).save(source)
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", source, "--prompt", "x", "--out", tmp_path / "o.png",
                           "--sampler", "bridge")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--sampler flow" in lines[0], err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from editkit.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("ip2p") / "model", family=FAMILY)


def _broken(folder, tmp_path, damage):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


DAMAGES = {
    "missing unet weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                             "missing unet/*.safetensors*"),
    "truncated text encoder": (lambda f: (f / "text_encoder" / "model.safetensors").write_bytes(b"\x00" * 10),
                               "damaged safetensors file"),
    "unknown scheduler": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "Nope"}'),
                          "not a diffusers scheduler"),
    "missing tokenizer": (lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()], "missing tokenizer/"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_folder_is_one_line_and_exit_2(folder, tmp_path, capsys, damage):
    broken = _broken(folder, tmp_path, DAMAGES[damage][0])
    source = tmp_path / "a.png"
    _image(0, (64, 64)).save(source)
    code, _, err = run_cli(capsys, "edit", "--model", broken, "--steps", "2", "--dtype", "fp32", "--device", "cpu",
                           "--image", source, "--prompt", "x", "--out", tmp_path / "o.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and DAMAGES[damage][1] in lines[0], err
