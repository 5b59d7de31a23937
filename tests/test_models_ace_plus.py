"""The ace-plus family (ACE++ on FLUX.1-Fill) on the tiny preset (fp32, CPU): its in-context layout
(sizes, mask halves, the crop back), parity with FluxFillPipeline fed that layout, its prompt token
and defaults, LoRAs in ACE++'s file layout, batches, fusion on the canvas, folders and the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.infer import fusion
from editkit.infer.engine import EditRequest, Engine
from editkit.infer.sampler import initial_noise, sample
from editkit.models import load_model
from editkit.models.ace_plus import AceGeometry, ace_canvas, geometry
from tests.cli_run import run_cli

FAMILY = "ace-plus"
TOL = 1e-4
AREA = 64 * 64
"""The tiny preset's output area: a canvas of at most 16 tokens."""


def _image(seed, size):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _box_mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def model():
    return load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")


def _nearest(out_size, in_size):
    """Source index of each output index under nearest-exact resizing (torchvision's NEAREST_EXACT)."""
    return np.minimum(np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(int), in_size - 1)


def test_the_layout_puts_the_reference_left_of_the_masked_image():
    """64x64 image to edit + 48x64 reference: stacked 112x64 (28 tokens), scaled by sqrt(16 / 28) to
    84.7x48.4 and rounded down to 80x48, the seam at 36.3 -> 32; the output is the 48x48 right part."""
    edit, reference = _image(0, (64, 64)), _image(1, (48, 64))
    mask = _box_mask((64, 64), (8, 16, 40, 48))
    pixels, fill, where = ace_canvas(edit, mask, reference, AREA)
    assert where == AceGeometry(edit=(64, 64), reference=(48, 64), canvas=(80, 48), seam=32, resize_canvas=True)
    assert where.output == (48, 48) and pixels.shape == (3, 48, 80) and fill.shape == (1, 48, 80)
    rows, cols = _nearest(48, 64), _nearest(80, 112)
    stacked_mask = np.concatenate([np.zeros((64, 48)), np.asarray(mask) > 128], axis=1)
    assert np.array_equal(fill[0].numpy(), stacked_mask[rows][:, cols])  # the reference half is never masked
    assert not fill[0, :, :32].any() and fill[0, :, 32:].any()
    source = (np.asarray(edit, dtype=np.float32) / 255 - 0.5) / 0.5
    right = cols >= 48
    expected = source[rows][:, cols[right] - 48].transpose(2, 0, 1)
    got = pixels[:, :, right].numpy()
    keep = fill[0, :, right].numpy() == 0
    assert np.allclose(got[:, keep], expected[:, keep], atol=1e-6)  # the image to edit outside its mask
    assert not got[:, ~keep].any()  # blanked (0 = mid-grey) under the mask


def test_layout_rules_scale_crop_empty_mask_and_repainting():
    assert geometry((64, 64), None, AREA) == AceGeometry((64, 64), None, (64, 64), 0, True)  # fits: not scaled up
    assert geometry((200, 100), None, AREA).canvas == (80, 32)  # 78 tokens scaled to at most 16
    assert geometry((300, 50), None, 300 * 50).edit == (200, 50)  # cropped to an aspect of 4
    edit = _image(2, (64, 64))
    _, fill, _ = ace_canvas(edit, Image.new("L", (64, 64), 0), None, AREA)
    assert fill.all()  # an empty mask means the whole image
    half = _box_mask((64, 64), (0, 0, 32, 64))
    pixels, _, _ = ace_canvas(edit, half, None, AREA, repainting_scale=0.5)
    full, _, _ = ace_canvas(edit, Image.new("L", (64, 64), 0), None, AREA, repainting_scale=0.0)
    assert torch.allclose(pixels[:, :, :32], 0.5 * full[:, :, :32]) and torch.equal(pixels[:, :, 32:], full[:, :, 32:])


def test_output_size_is_the_layouts_and_explicit_sizes_are_kept(model):
    edit, reference = _image(0, (64, 64)), _image(1, (48, 64))
    assert model.output_size([edit, reference]) == (48, 48)
    assert model.output_size([edit, reference], 48, 48) == (48, 48)  # the layout's own size: its own layout
    assert model.output_size([edit]) == (64, 64)
    assert model.output_size([edit, reference], 64, 32) == (64, 32)
    inputs = model.prepare(["x"], [[edit, reference]], 64, 32, masks=[_box_mask((64, 64), (0, 0, 32, 64))])
    assert inputs.extra["canvas"] == (80, 32)  # the reference at height 32: 24 -> 16 columns, not scaled
    assert (inputs.width, inputs.height) == (64, 32)
    assert model.vae_size(reference) == (48, 64) and model.family.max_images == 2


def test_prompt_token_and_defaults(model):
    vocab = model.tokenizer_2.get_vocab()
    ids = model.tokenizer_2("{image} make it red").input_ids
    assert ids.count(vocab["{image}"]) == 1 and vocab["{image}"] == len(vocab) - 1  # one added special token
    assert model.text_encoder_2.config.vocab_size > vocab["{image}"]
    sampling = model.family.sampling
    assert (sampling.steps, sampling.cfg, sampling.needs_mask) == (28, 50.0, True)


def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("with_reference", [True, False], ids=["reference", "local-edit"])
def test_matches_flux_fill_pipeline_fed_the_layout(model, with_reference):
    """The pipeline gets the canvas and its mask (as tensors: `ace_canvas`'s output), editkit's canvas
    noise and the generator after it (the output's noise, then the reference part's); the canvas
    latents and pixels agree within 1e-4, the output with ACE++'s postprocess (crop 30 px past the
    seam, PIL resize back) within 2/255."""
    from diffusers.utils.torch_utils import randn_tensor

    edit, reference = _image(0, (64, 64)), _image(1, (48, 64))
    mask = _box_mask((64, 64), (8, 16, 40, 48))
    images = [edit, reference] if with_reference else [edit]
    prompt, steps, seed, cfg = "{image} make the sky red", 3, 7, 50.0
    width, height = model.output_size(images)
    inputs = model.prepare([prompt], [images], width, height, masks=[mask])
    noise = initial_noise(model, width, height, [seed], torch.float32)
    latents = sample(model, inputs, steps=steps, true_cfg_scale=cfg, seeds=[seed], latents=noise)

    pixels, fill, where = ace_canvas(edit, mask, images[1] if with_reference else None, AREA)
    canvas_w, canvas_h = where.canvas
    generator = torch.Generator("cpu").manual_seed(seed)
    randn_tensor((1, 16, height // 8, width // 8), generator=generator)
    left = randn_tensor((1, 16, canvas_h // 8, (canvas_w - width) // 8), generator=generator)
    canvas_noise = model.pack(torch.cat([left, model.unpack(noise, height // 8, width // 8)], dim=-1))
    pipe = _pipeline(model)
    state = generator.get_state()
    call = dict(prompt=prompt, image=((pixels + 1) / 2)[None], mask_image=fill[None], width=canvas_w,
                height=canvas_h, guidance_scale=cfg, num_inference_steps=steps, latents=canvas_noise)
    ref_latents = pipe(**call, generator=generator, output_type="latent").images
    ref_pil = pipe(**call, generator=torch.Generator("cpu").set_state(state), output_type="pil").images[0]

    assert latents.shape == ref_latents.shape == (1, canvas_w * canvas_h // 256, 64)
    assert (latents - ref_latents).abs().max().item() <= TOL
    with torch.no_grad():
        canvas_pixels = model.decode_latents(model.unpack(latents, canvas_h // 8, canvas_w // 8))
        out = np.asarray(model.to_pil(model.decode_packed(latents, width, height))[0], dtype=int)
    ref_np = pipe.image_processor.pil_to_numpy(ref_pil)
    ours_np = model.image_processor.postprocess(canvas_pixels, output_type="np")
    assert np.abs(np.rint(ours_np * 255) - np.rint(ref_np * 255)).max() <= 1
    if with_reference:  # ACE++'s postprocess: the crop 30 px past the seam, resized to the output
        ref_pil = ref_pil.crop((where.seam + 30, 0, canvas_w, canvas_h)).resize((width, height))
    assert out.shape == (height, width, 3)
    assert np.abs(out - np.asarray(ref_pil, dtype=int)).max() <= 2


def test_a_batch_of_two_equals_each_alone(model):
    edits, reference = [_image(2, (64, 64)), _image(3, (64, 64))], _image(4, (48, 64))
    masks = [_box_mask((64, 64), (0, 0, 32, 64)), _box_mask((64, 64), (16, 16, 64, 64))]
    prompts, seeds, cfgs = ["make it red", "{image} add a hat"], [11, 12], [50.0, 10.0]
    inputs = model.prepare(prompts, [[e, reference] for e in edits], masks=masks)
    batch = sample(model, inputs, steps=3, true_cfg_scale=cfgs, seeds=seeds,
                   latents=initial_noise(model, 48, 48, seeds, torch.float32))
    for i in range(2):
        alone = model.prepare([prompts[i]], [[edits[i], reference]], masks=[masks[i]])
        single = sample(model, alone, steps=3, true_cfg_scale=cfgs[i], seeds=[seeds[i]])
        assert (batch[i : i + 1] - single).abs().max().item() <= 1e-5 * single.abs().max().item()
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_latent_mask_fusion_acts_on_the_output_part_of_the_canvas(model):
    """The engine's hook sees the output's tokens (the canvas right of the seam): outside the fusion
    mask they end on the source's latents; a mask covering everything changes nothing."""
    edit, reference = _image(5, (64, 64)), _image(6, (48, 64))
    mask = _box_mask((64, 64), (0, 0, 32, 64))
    inputs = model.prepare(["make it red"], [[edit, reference]], masks=[mask])
    noise = initial_noise(model, 48, 48, [3], torch.float32)
    source = model.encode_images([edit], 48, 48)

    def output_part(fusion_mask):
        weight = fusion.latent_mask(fusion_mask, (6, 6))[None, None].expand(1, 16, 6, 6).contiguous()
        background, packed_weight = noise - model.pack(source), model.pack(weight)
        hook = model.with_velocity_hook(lambda v: fusion.blend_latents(v, background, packed_weight))
        canvas = sample(hook, inputs, steps=3, true_cfg_scale=50.0, seeds=[3], latents=noise)
        return model.unpack(canvas, 6, 10)[..., 4:]

    half = output_part(mask)
    assert (half[..., 4:] - source[..., 4:]).abs().max().item() <= 1e-5
    assert (half[..., :2] - source[..., :2]).abs().max().item() > 0.1
    free = model.unpack(sample(model, inputs, steps=3, true_cfg_scale=50.0, seeds=[3], latents=noise), 6, 10)[..., 4:]
    assert (output_part(Image.new("L", (64, 64), 255)) - free).abs().max().item() <= 1e-6


def test_engine_with_reference_and_pixel_fusion(model):
    edit, reference = _image(7, (64, 64)), _image(8, (48, 64))
    mask = _box_mask((64, 64), (0, 0, 24, 64))
    out = Engine(model).edit([EditRequest("make it red", [edit, reference], steps=2, mask=mask, fusion="pixel-mask",
                                          feather=1)])[0]
    assert out.size == (48, 48)
    src = np.asarray(edit.resize((48, 48), Image.Resampling.LANCZOS), dtype=int)
    assert np.array_equal(np.asarray(out, dtype=int)[:, 30:], src[:, 30:])


def _ace_lora(path, width, rank=4, alpha=2.0):
    """A tiny LoRA in ACE++'s file layout: kohya-prefixed BFL names (its training targets), alpha per module."""
    from safetensors.torch import save_file

    modules = {"double_blocks_0_img_attn_qkv": (width, 3 * width), "double_blocks_0_img_attn_proj": (width, width),
               "double_blocks_0_txt_attn_qkv": (width, 3 * width), "double_blocks_0_img_mlp_0": (width, 4 * width),
               "double_blocks_0_img_mod_lin": (width, 6 * width), "single_blocks_0_linear1": (width, 7 * width),
               "single_blocks_0_linear2": (5 * width, width), "single_blocks_0_modulation_lin": (width, 3 * width)}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (fan_in, fan_out) in modules.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = 0.2 * torch.randn(rank, fan_in, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = 0.2 * torch.randn(fan_out, rank, generator=g)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def test_an_ace_lora_is_the_fused_weight_change(tmp_path):
    """Single blocks' fused linear1 (q, k, v, MLP) becomes four diffusers LoRAs whose merged weight
    changes stack to the fused one: scale * alpha / rank * up @ down."""
    from editkit.models import lora as L

    model = load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")
    width = model.transformer.inner_dim
    tensors = _ace_lora(tmp_path / "ace.safetensors", width)
    block = model.transformer.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    before = torch.cat([p.weight.detach().clone() for p in parts])
    L.apply_loras(model.transformer, [L.LoraSpec(str(tmp_path / "ace.safetensors"), 0.5)], fuse=True)
    after = torch.cat([p.weight.detach().clone() for p in parts])
    up, down = (tensors[f"lora_unet_single_blocks_0_linear1.{w}.weight"] for w in ("lora_up", "lora_down"))
    assert torch.allclose(after - before, 0.5 * (2.0 / 4) * up @ down, atol=1e-6)
    L.unload_loras(model.transformer)
    assert torch.allclose(torch.cat([p.weight for p in parts]), before)


def test_edit_cli_with_reference_mask_and_an_ace_lora(tmp_path, capsys):
    from editkit.infer.outputs import read_settings

    paths = {name: tmp_path / f"{name}.png" for name in ("edit", "reference", "mask")}
    _image(0, (64, 64)).save(paths["edit"])
    _image(1, (48, 64)).save(paths["reference"])
    _box_mask((64, 64), (0, 0, 32, 64)).save(paths["mask"])
    _ace_lora(tmp_path / "lora.safetensors", 32)
    common = ["edit", "--model", f"tiny:{FAMILY}", "--steps", "2", "--dtype", "fp32", "--device", "cpu",
              "--image", paths["edit"], "--image", paths["reference"], "--mask", paths["mask"], "--prompt",
              "{image} the item is put on the table", "--seed", "5"]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "base.png")
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "lora.png", "--lora", tmp_path / "lora.safetensors")
    assert code == 0, err
    settings = read_settings(tmp_path / "lora.png")
    assert settings["family"] == FAMILY and settings["true_cfg_scale"] == 50.0 and len(settings["lora"]) == 1
    base, with_lora = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("base", "lora"))
    assert base.shape == (48, 48, 3) and np.abs(base - with_lora).max() > 0


def test_save_tiny_folder_loads_in_diffusers_and_editkit(tmp_path, capsys):
    from diffusers import FluxFillPipeline

    folder = tmp_path / "ace"
    code, _, err = run_cli(capsys, "model", "save-tiny", folder, "--family", FAMILY)
    assert code == 0, err
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline" and index["_editkit_family"] == FAMILY
    pipe = FluxFillPipeline.from_pretrained(folder, local_files_only=True)
    assert "{image}" in pipe.tokenizer_2.get_vocab()
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert loaded.family.name == FAMILY
    # without editkit's key the same folder is FLUX.1 Fill's; ACE++ is chosen with --family
    del index["_editkit_family"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_model(folder, dtype="fp32", device="cpu").family.name == "flux-fill"
    assert load_model(folder, family=FAMILY, dtype="fp32", device="cpu").family.name == FAMILY


def test_three_images_or_a_missing_mask_are_one_line(tmp_path, capsys):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        _image(i, (64, 64)).save(path)
    common = ["edit", "--model", f"tiny:{FAMILY}", "--steps", "2", "--dtype", "fp32", "--device", "cpu",
              "--prompt", "x", "--out", tmp_path / "o.png"]
    code, _, err = run_cli(capsys, *common, "--image", paths[0], "--image", paths[1])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "give a mask" in err, err
    _box_mask((64, 64), (0, 0, 8, 8)).save(tmp_path / "m.png")
    code, _, err = run_cli(capsys, *common, "--image", paths[0], "--image", paths[1], "--image", paths[2],
                           "--mask", tmp_path / "m.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "at most 2" in err, err
