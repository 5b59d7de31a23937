"""The flux-fill family (FLUX.1-Fill-dev) on its tiny preset (fp32, CPU): parity with diffusers'
FluxFillPipeline, per-request seeds and guidance in batches, its folders, the CLI (edit with a
mask, infer with masks and a guidance sweep, sharded and resumable), mask fusion, LoRAs in BFL
names, and its refusals in one line."""

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

FAMILY = "flux-fill"
TINY = ["--model", f"tiny:{FAMILY}", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]
TOL = 1e-4


def _image(seed, size):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _box_mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _half_mask(size):
    return _box_mask(size, (0, 0, size[0] // 2, size[1]))  # the left half is the edit region


@pytest.fixture(scope="module")
def model():
    return load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")


def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_generator(model, seed, width, height):
    """The pipeline's generator as editkit's sampler leaves it: seeded, past the initial noise."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(seed)
    randn_tensor((1, model.latent_channels, *model.latent_size(width, height)), generator=generator)
    return generator


def _ours(model, prompt, image, mask, cfg, steps, seed, width=None, height=None):
    inputs = model.prepare([prompt], [[image]], width, height, masks=[mask])
    latents = sample(model, inputs, steps=steps, true_cfg_scale=cfg, seeds=[seed])
    with torch.no_grad():
        pixels = model.image_processor.postprocess(model.decode_packed(latents, inputs.width, inputs.height),
                                                   output_type="np")
    return latents, pixels, inputs


@pytest.mark.parametrize("cfg", [30.0, 1.0], ids=["guidance30", "guidance1"])
def test_matches_diffusers_pipeline(model, cfg):
    """Same weights, seed, steps and embedded guidance give the pipeline's latents and pixels. The
    model's "without guidance" is its embedded guidance at 1 (FLUX.1-Fill is guidance-distilled: no
    negative pass exists). The pipeline gets editkit's initial noise (`latents=`) and the generator
    past it, from which both draw the masked image's VAE sample."""
    image, mask = _image(0, (80, 60)), _box_mask((80, 60), (10, 10, 50, 40))
    prompt, steps, seed = "make the sky red", 3, 7
    latents, pixels, inputs = _ours(model, prompt, image, mask, cfg, steps, seed)
    width, height = inputs.width, inputs.height
    assert (width, height) == (80, 48)  # 64x64 pixels of area at the source's aspect, multiples of 16
    noise = initial_noise(model, width, height, [seed], torch.float32)
    pipe = _pipeline(model)
    call = dict(prompt=prompt, image=image, mask_image=mask, width=width, height=height, guidance_scale=cfg,
                num_inference_steps=steps, latents=noise)
    ref_latents = pipe(**call, generator=_pipeline_generator(model, seed, width, height), output_type="latent").images
    ref_pixels = pipe(**call, generator=_pipeline_generator(model, seed, width, height), output_type="np").images
    assert latents.shape == ref_latents.shape == (1, 15, 64)
    assert ref_latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    assert np.abs(pixels - ref_pixels).max() <= TOL


def test_the_fill_input_is_the_pipelines(model):
    """384 channels per token: 64 latent, 64 masked-image, 256 mask; the mask channels are the pixels
    under each latent, as the pipeline's prepare_mask_latents packs them."""
    pipe = _pipeline(model)
    mask = _half_mask((64, 32))
    ours = model.pack_mask(model.mask_processor.preprocess(mask, 32, 64))
    ref, _ = pipe.prepare_mask_latents(model.mask_processor.preprocess(mask, 32, 64), torch.zeros(1, 16, 4, 8), 1, 16,
                                       1, 32, 64, torch.float32, "cpu", None)
    assert model.transformer.config.in_channels == 384 and ours.shape == (1, 8, 256)
    assert torch.equal(ours, ref)


def test_guidance_and_mask_change_the_result(model):
    image = _image(1, (64, 64))
    high, _, _ = _ours(model, "make it red", image, _half_mask((64, 64)), 30.0, 3, 0)
    low, _, _ = _ours(model, "make it red", image, _half_mask((64, 64)), 3.5, 3, 0)
    other_mask, _, _ = _ours(model, "make it red", image, Image.new("L", (64, 64), 255), 30.0, 3, 0)
    assert (high - low).abs().max() > 1e-2 and (high - other_mask).abs().max() > 1e-2


def test_a_batch_of_two_equals_each_alone(model):
    """Different seeds, prompts, masks and guidance in one batch; each sample equals its run alone (up to
    the float rounding of batched matmuls)."""
    images = [_image(2, (64, 48)), _image(3, (64, 48))]
    masks = [_half_mask((64, 48)), _box_mask((64, 48), (20, 8, 60, 40))]
    prompts, seeds, cfgs = ["make it red", "add a hat"], [11, 12], [30.0, 4.0]
    inputs = model.prepare(prompts, [[img] for img in images], masks=masks)
    batch = sample(model, inputs, steps=3, true_cfg_scale=cfgs, seeds=seeds)
    for i in range(2):
        alone = model.prepare([prompts[i]], [[images[i]]], masks=[masks[i]])
        single = sample(model, alone, steps=3, true_cfg_scale=cfgs[i], seeds=[seeds[i]])
        assert (batch[i : i + 1] - single).abs().max().item() <= 1e-5 * single.abs().max().item()
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_a_shared_batch_equals_the_whole_one(model):
    """`with_cfg_parallel`'s split gets the transformer's batch in `predict`'s positional order (the
    pooled embeddings as the mask, the guidance as the condition), as CfgParallel slices it per rank."""
    def halves(run, latents, timestep, embeds, pooled, shapes, guidance, attention_kwargs):
        parts = [run(latents[s], timestep[s], embeds[s], pooled[s], shapes[s], guidance[s], attention_kwargs)
                 for s in (slice(0, 1), slice(1, 2))]
        return torch.cat(parts)

    images, masks = [_image(2, (64, 48)), _image(3, (64, 48))], [_half_mask((64, 48))] * 2
    inputs = model.prepare(["make it red", "add a hat"], [[img] for img in images], masks=masks)
    whole = sample(model, inputs, steps=2, true_cfg_scale=[30.0, 4.0], seeds=[1, 2])
    shared = sample(model.with_cfg_parallel(halves), inputs, steps=2, true_cfg_scale=[30.0, 4.0], seeds=[1, 2])
    assert (whole - shared).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_output_size_keeps_the_aspect(model):
    image = _image(0, (100, 60))
    assert model.output_size([image]) == (80, 48)
    assert model.output_size([image], width=64) == (64, 32)  # round(64 * 60 / 100) = 38 -> 32
    assert model.output_size([image], 48, 40) == (48, 32)
    inputs = model.prepare(["x"], [[image]], 48, 32, masks=[_half_mask((100, 60))])
    assert (inputs.width, inputs.height) == (48, 32) and inputs.extra["mask"].shape == (1, 6, 256)


def test_every_edit_needs_its_mask_and_one_image(model):
    image = _image(0, (64, 64))
    with pytest.raises(UserError, match="give every edit a mask"):
        model.prepare(["x"], [[image]])
    with pytest.raises(UserError, match="one source image per edit"):
        model.prepare(["x"], [[image, image]], masks=[_half_mask((64, 64))])
    with pytest.raises(UserError, match="one source image per edit"):
        model.prepare(["x"], [[]], masks=[_half_mask((64, 64))])


def test_edit_cli_without_a_mask_is_one_line(tmp_path, capsys):
    source = tmp_path / "a.png"
    _image(0, (64, 64)).save(source)
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", source, "--prompt", "x", "--out", tmp_path / "o.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "give a mask" in lines[0], err


def test_edit_cli_with_a_mask_uses_the_family_defaults(tmp_path, capsys):
    from editkit.infer.outputs import read_settings

    source, mask = tmp_path / "a.png", tmp_path / "m.png"
    _image(0, (80, 60)).save(source)
    _box_mask((80, 60), (0, 0, 40, 60)).save(mask)
    out = tmp_path / "edit.png"
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", source, "--mask", mask, "--prompt", "make it blue",
                           "--out", out, "--seed", "3")
    assert code == 0, err
    settings = read_settings(out)
    assert settings["family"] == FAMILY and settings["true_cfg_scale"] == 30.0 and settings["steps"] == 2
    assert Image.open(out).size == (80, 48)


def test_infer_cli_reads_masks_sweeps_guidance_shards_and_resumes(tmp_path, capsys, monkeypatch):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    records = []
    for i in range(3):
        source, mask = tmp_path / f"s{i}.png", tmp_path / f"m{i}.png"
        _image(i, (64, 64)).save(source)
        _box_mask((64, 64), (0, 0, 16 * (i + 1), 64)).save(mask)
        records.append(EditRecord(id=f"r{i}", instruction=f"edit {i}", sources=[source], mask=mask))
    manifest = tmp_path / "set.jsonl"
    write_manifest(records, manifest, "pairs")
    args = ["infer", *TINY, "--data", manifest, "--out", tmp_path / "preds", "--cfg", "3.5,30", "--batch-size", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # two ranks share the records
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png"))
    assert written == [f"cfg-{c}/r{i}.png" for c in ("3.5", "30.0") for i in range(3)]
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "skipped" in out, (out, err)
    a = np.asarray(Image.open(tmp_path / "preds" / "cfg-3.5" / "r0.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "preds" / "cfg-30.0" / "r0.png"), dtype=int)
    assert np.abs(a - b).max() > 0


def test_engine_batches_requests_with_their_own_seeds(model):
    engine = Engine(model, max_batch=2)
    image = _image(5, (64, 64))
    requests = [EditRequest("make it red", [image], steps=2, seed=s, mask=_half_mask((64, 64))) for s in (1, 2)]
    together = engine.edit(requests)
    alone = [engine.edit([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert np.abs(np.asarray(together[0], dtype=int) - np.asarray(together[1], dtype=int)).max() > 0


def test_pixel_mask_keeps_the_source_outside_the_mask(model):
    image = _image(6, (64, 64))
    out = Engine(model).edit([EditRequest("make it red", [image], steps=2, mask=_half_mask((64, 64)),
                                          fusion="pixel-mask", feather=2)])[0]
    got, src = np.asarray(out, dtype=int), np.asarray(image, dtype=int)
    assert np.array_equal(got[:, 40:], src[:, 40:])  # more than 3 * feather from the edit region
    assert np.abs(got[:, :24] - src[:, :24]).max() > 0


def test_latent_mask_keeps_the_background_on_the_source_path(model):
    """The engine's latent-mask hook (blend toward `noise - source`) on Flux's flow-matching velocity:
    the latents outside the mask end on the source's, those inside are the model's; a mask covering
    everything changes nothing."""
    image, mask = _image(7, (64, 64)), _half_mask((64, 64))
    inputs = model.prepare(["make it red"], [[image]], masks=[mask])
    noise = initial_noise(model, 64, 64, [3], torch.float32)
    source = model.encode_images([image], 64, 64)

    def fused(fusion_mask):
        weight = fusion.latent_mask(fusion_mask, (8, 8))[None, None].expand(1, 16, 8, 8).contiguous()
        background, packed_weight = noise - model.pack(source), model.pack(weight)
        hook = model.with_velocity_hook(lambda v: fusion.blend_latents(v, background, packed_weight))
        return model.unpack(sample(hook, inputs, steps=3, true_cfg_scale=30.0, seeds=[3], latents=noise), 8, 8)

    half = fused(mask)
    assert (half[..., 4:] - source[..., 4:]).abs().max().item() <= 1e-5
    assert (half[..., :4] - source[..., :4]).abs().max().item() > 0.1
    free = model.unpack(sample(model, inputs, steps=3, true_cfg_scale=30.0, seeds=[3], latents=noise), 8, 8)
    assert (fused(Image.new("L", (64, 64), 255)) - free).abs().max().item() <= 1e-6


def test_latent_mask_through_the_engine(model):
    """The request's mask is both the fill mask and the fusion mask. An empty one keeps every latent on
    the source's path (the source's VAE reconstruction; the VAE's attention lets every pixel see every
    latent, so the engine-level check is whole-image); latent+pixel-mask pastes the source far from a
    half mask."""
    image = _image(8, (64, 64))
    engine = Engine(model)

    def edit(mask, mode):
        return np.asarray(engine.edit([EditRequest("make it red", [image], steps=2, mask=mask, fusion=mode,
                                                   feather=2)])[0], dtype=int)

    with torch.no_grad():
        recon = np.asarray(model.to_pil(model.decode_latents(model.encode_images([image], 64, 64)))[0], dtype=int)
    assert np.abs(edit(Image.new("L", (64, 64), 0), "latent-mask") - recon).max() <= 1
    both = edit(_half_mask((64, 64)), "latent+pixel-mask")
    assert np.array_equal(both[:, 40:], np.asarray(image, dtype=int)[:, 40:])
    assert np.abs(both[:, :24] - recon[:, :24]).max() > 0


def _bfl_lora(path, width, rank=4, alpha=2.0):
    """A Flux LoRA in BFL module names with kohya's prefix (ACE++'s file layout), on modules whose
    diffusers conversion has no FLUX.1-sized widths built in (diffusers splits linear1 as 3072 wide)."""
    from safetensors.torch import save_file

    modules = {"double_blocks_0_img_attn_qkv": (width, 3 * width), "double_blocks_0_img_attn_proj": (width, width),
               "double_blocks_0_txt_attn_qkv": (width, 3 * width), "double_blocks_0_img_mlp_0": (width, 4 * width),
               "single_blocks_0_linear2": (5 * width, width)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (fan_in, fan_out) in modules.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = 0.3 * torch.randn(rank, fan_in, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(fan_out, rank, generator=g)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_a_bfl_lora_changes_the_edit_as_diffusers_loads_it(model, tmp_path):
    """A LoRA in BFL names (kohya prefix, alpha != rank) gives diffusers' load_lora_weights' result."""
    path = _bfl_lora(tmp_path / "flux_lora.safetensors", model.transformer.inner_dim)
    image, mask, seed = _image(9, (64, 64)), Image.new("L", (64, 64), 255), 3
    fresh = load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")
    engine = Engine(fresh)
    base, _, _ = _ours(fresh, "x", image, mask, 30.0, 2, seed)
    engine.load_loras([f"{path}:0.7"])
    with_lora, _, _ = _ours(fresh, "x", image, mask, 30.0, 2, seed)
    pipe = _pipeline(fresh)
    engine.unload_loras()
    assert (_ours(fresh, "x", image, mask, 30.0, 2, seed)[0] - base).abs().max().item() == 0
    assert (with_lora - base).abs().max().item() > 1e-2
    pipe.load_lora_weights(str(path), adapter_name="bfl")
    pipe.set_adapters(["bfl"], [0.7])
    ref = pipe(prompt="x", image=image, mask_image=mask, width=64, height=64, guidance_scale=30.0,
               num_inference_steps=2, latents=initial_noise(fresh, 64, 64, [seed], torch.float32),
               generator=_pipeline_generator(fresh, seed, 64, 64), output_type="latent").images
    assert (with_lora - ref).abs().max().item() <= TOL


def test_the_bridge_sampler_is_refused_in_one_line(tmp_path, capsys):
    source, mask = tmp_path / "a.png", tmp_path / "m.png"
    _image(0, (64, 64)).save(source)
    _half_mask((64, 64)).save(mask)
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", source, "--mask", mask, "--prompt", "x", "--out",
                           tmp_path / "o.png", "--sampler", "bridge")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--sampler flow" in lines[0], err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from editkit.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("flux") / "model", family=FAMILY)


def test_save_tiny_folder_loads_in_diffusers_and_editkit(tmp_path, capsys):
    from diffusers import FluxFillPipeline

    folder = tmp_path / "flux"
    code, out, err = run_cli(capsys, "model", "save-tiny", folder, "--family", FAMILY)
    assert code == 0, err
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline" and index["_editkit_family"] == FAMILY
    pipe = FluxFillPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 384 and pipe.transformer.config.guidance_embeds
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert loaded.family.name == FAMILY
    image, mask = _image(4, (64, 64)), _half_mask((64, 64))
    latents, _, _ = _ours(loaded, "make it red", image, mask, 30.0, 3, 1)
    ref = pipe("make it red", image=image, mask_image=mask, width=64, height=64, num_inference_steps=3,
               latents=initial_noise(loaded, 64, 64, [1], torch.float32),
               generator=_pipeline_generator(loaded, 1, 64, 64), output_type="latent").images
    assert (latents - ref).abs().max().item() <= TOL
    # detected without editkit's key, from the pipeline class alone
    del index["_editkit_family"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_model(folder, dtype="fp32", device="cpu").family.name == FAMILY


def _broken(folder, tmp_path, damage):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def _set_config(path, **changes):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


DAMAGES = {
    "missing transformer weights": (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
                                    "missing transformer/*.safetensors*"),
    "truncated T5": (lambda f: (f / "text_encoder_2" / "model.safetensors").write_bytes(b"\x00" * 10),
                     "damaged safetensors file"),
    "missing T5 tokenizer": (lambda f: [p.unlink() for p in (f / "tokenizer_2").iterdir()], "missing tokenizer_2/"),
    "not a fill transformer": (lambda f: _set_config(f / "transformer" / "config.json", in_channels=64),
                               "needs a FluxTransformer2DModel with the fill input"),
    "ACE++ FFT transformer": (lambda f: _set_config(f / "transformer" / "config.json", in_channels=448),
                              "ACE++'s FFT model"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_folder_is_one_line_and_exit_2(folder, tmp_path, capsys, damage):
    broken = _broken(folder, tmp_path, DAMAGES[damage][0])
    source, mask = tmp_path / "a.png", tmp_path / "m.png"
    _image(0, (64, 64)).save(source)
    _half_mask((64, 64)).save(mask)
    code, _, err = run_cli(capsys, "edit", "--model", broken, "--steps", "2", "--dtype", "fp32", "--device", "cpu",
                           "--image", source, "--mask", mask, "--prompt", "x", "--out", tmp_path / "o.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and DAMAGES[damage][1] in lines[0], err


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


def test_speed_bench_runs_on_the_tiny_preset(capsys):
    """bench/baselines_speed.py's flux-fill function on the CPU: both implementations give the same image."""
    from bench import baselines_speed

    result = baselines_speed.main(["--family", FAMILY, "--tiny", "--batch", "2"])
    capsys.readouterr()
    assert result["preset"] == "tiny" and result["size"] == 64 and result["max_pixel_diff"] <= 1
    assert result["editkit_s_per_image"] > 0 and result["diffusers_batch2_s_per_image"] > 0


def test_the_lossless_speed_switches_leave_a_flux_model_as_it_is():
    """`--speed lossless` (the CUDA default of infer/serve) fuses only QwenImage blocks: a Flux
    transformer keeps its own attention processors and gives the same edit."""
    from editkit.models import accel

    fresh = load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")
    image, mask = _image(1, (64, 64)), _half_mask((64, 64))
    before, _, _ = _ours(fresh, "a red ball", image, mask, 30.0, 2, 0)
    processors = [type(p) for p in fresh.transformer.attn_processors.values()]
    accel.apply_accel(fresh, accel.Accel(compile=False))
    assert [type(p) for p in fresh.transformer.attn_processors.values()] == processors
    after, _, _ = _ours(fresh, "a red ball", image, mask, 30.0, 2, 0)
    assert torch.allclose(before, after, atol=1e-6)
