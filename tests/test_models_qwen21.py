"""Qwen-Image-2.1 (`qwen-image-2.1`): parity with diffusers' `QwenImage21Pipeline` on the tiny preset
(fp32, CPU, max abs difference <= 1e-4), its folders, batches, the CLI, RGBA outputs and training."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.infer.sampler import sample
from editkit.models import load_model
from tests.cli_run import run_cli

TOL = 1e-4
FAMILY = "qwen-image-2.1"
TINY = f"tiny:{FAMILY}"


def _image(seed, size, alpha=False):
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 4 if alpha else 3) * 255).astype("uint8")
    if alpha:
        pixels[: size[1] // 2, :, 3] = 0  # the top half transparent
    return Image.fromarray(pixels)


IMAGES = [_image(0, (128, 64)), _image(1, (64, 80)), _image(2, (48, 96), alpha=True)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (the shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread):
    return load_model(TINY, dtype="fp32", device="cpu")


def _pipeline(model, cls=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
                               vae=model.vae, text_encoder=model.text_encoder, processor=model.processor,
                               transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(model, latents, width, height):
    with torch.no_grad():
        return model.image_processor.postprocess(model.decode_packed(latents, width, height), output_type="np")


CASES = [(n, cfg, kv) for n in (1, 3) for cfg in (1.0, 4.0) for kv in (True, False)] + [(0, 4.0, True)]


@pytest.mark.parametrize("num_images,cfg,kv_cache", CASES,
                         ids=[f"{n}img-cfg{c:g}-{'kv' if kv else 'nokv'}" for n, c, kv in CASES])
def test_matches_diffusers_pipeline(model, num_images, cfg, kv_cache):
    images, prompt, negative, steps, seed = IMAGES[:num_images], "make the sky red", " ", 3, 7
    call = dict(image=images or None, prompt=prompt, negative_prompt=negative if cfg > 1 else None,
                true_cfg_scale=cfg, num_inference_steps=steps, output_resolution=64, use_kv_cache=kv_cache)
    pipe = _pipeline(model)
    ref_latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    ref_pixels = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images

    ours = model.with_kv_cache(kv_cache)
    inputs = ours.prepare([prompt], [images], negative_prompts=[negative] if cfg > 1 else None)
    latents = sample(ours, inputs, steps=steps, true_cfg_scale=cfg, seeds=[seed])

    assert latents.shape == ref_latents.shape and ref_latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    pixels = _pixels(model, latents, inputs.width, inputs.height)
    assert pixels.shape[-1] == 4 == ref_pixels.shape[-1]  # RGBA, as the pipeline returns it
    assert np.abs(pixels - ref_pixels).max() <= TOL


def test_kv_cache_computes_the_prefix_once(model):
    """With the cache, the first block sees the prompt + condition tokens at the first step only."""
    seen = []
    hook = model.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    inputs = model.prepare(["add a hat"], [IMAGES[:2]])
    try:
        runs = {}
        for kv in (True, False):
            seen.clear()
            runs[kv] = sample(model.with_kv_cache(kv), inputs, steps=3, true_cfg_scale=1.0, seeds=[3])
            runs[f"seen-{kv}"] = list(seen)
    finally:
        hook.remove()
    target = inputs.width * inputs.height // 16 ** 2
    full = runs["seen-False"][0]
    assert runs["seen-False"] == [full] * 3 and full > target
    assert runs["seen-True"] == [full, target, target]
    assert (runs[True] - runs[False]).abs().max() <= TOL


def test_sizes_and_prompt_layout(model):
    assert model.size_multiple == 32 and model.latent_channels == 16
    assert model.output_size([IMAGES[0], IMAGES[1]]) == (64, 64)  # the last image's aspect, as the pipeline
    assert model.output_size([IMAGES[0]]) == (96, 32) and model.output_size([]) == (64, 64)
    embeds, mask = model.encode_prompt(["a", "a much longer instruction"], [[IMAGES[0]], [IMAGES[0]]])
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] == embeds.shape[1]
    # a 96x32 view is 6x2 latent tokens: 3 VLM image tokens of 2x2, in a row, the same for any instruction
    slots = model.image_slots((3,))
    assert slots == list(range(slots[0], slots[0] + 3))
    assert model.image_slots((3, 3))[:3] == slots and len(model.image_slots((3, 3))) == 6
    with pytest.raises(UserError, match="at most 10 source images"):
        model.encode_prompt(["x"], [[IMAGES[0]] * 11])
    big = load_model(TINY, dtype="fp32", device="cpu", vae_image_size=768)  # above the processor's max_pixels
    with pytest.raises(UserError, match="resized by the VLM's image processor"):
        big.encode_prompt(["x"], [[IMAGES[0]]])


def test_embeddings_are_taken_before_the_final_norm_and_qwen25vl_after_it(model):
    """transformers 5.x ties `hidden_states[-1]` to the normed `last_hidden_state`. Qwen-Image-2.1 was
    trained on the last decoder layer's output before the norm (the pipeline hooks the norm out, so
    does editkit); the Qwen-Image-Edit pipelines read `hidden_states[-1]`, which is the normed state
    on transformers 4.x and 5.x alike, and editkit's Qwen2.5-VL path reads `last_hidden_state`."""
    pipe = _pipeline(model)
    ours, _ = model.encode_prompt(["make the sky red"], [[IMAGES[0]]])
    view = model.vlm_view(IMAGES[0])
    ref, _, _ = pipe.encode_prompt(prompt="make the sky red", image=[view], device="cpu")
    assert (ours - ref).abs().max() <= TOL
    norm = model.text_encoder.model.language_model.norm
    assert (norm(ours) - ours).abs().max() > 0.1  # not normed

    edit = load_model("tiny:qwen-image-edit-2511", dtype="fp32", device="cpu")
    ids = edit.processor(text=["<|im_start|>user\nhello<|im_end|>"], return_tensors="pt")["input_ids"]
    captured = []
    hook = edit.text_encoder.model.language_model.norm.register_forward_hook(
        lambda module, args, output: captured.append(args[0].clone()))
    with torch.no_grad():
        states = edit.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        last = edit.text_encoder.model(input_ids=ids).last_hidden_state
    hook.remove()
    assert torch.equal(states[-1], last)  # what the pipelines read is what editkit reads ...
    assert (captured[-1] - last).abs().max() > 0.1  # ... and it is after the norm


def test_batched_requests_with_their_seeds_equal_each_alone(model):
    from editkit.infer.engine import EditRequest, Engine

    requests = [EditRequest("red", [IMAGES[0]], seed=1, steps=3),
                EditRequest("turn the whole sky into a purple sunset", [IMAGES[0]], seed=2, true_cfg_scale=4.0,
                            steps=3),
                EditRequest("blue", [IMAGES[0]], seed=3, negative_prompt=None, true_cfg_scale=4.0, steps=3)]
    engine = Engine(model)
    assert engine.group(requests) == [[0, 1, 2]]
    batched = engine.edit(requests)
    alone = [engine.edit([r])[0] for r in requests]
    for b, a in zip(batched, alone):
        assert b.mode == "RGBA" and b.size == a.size == (96, 32)
        assert np.abs(np.asarray(b, dtype=int) - np.asarray(a, dtype=int)).max() <= 1
    assert np.abs(np.asarray(batched[0], dtype=int) - np.asarray(batched[2], dtype=int)).max() > 10

    inputs = model.prepare([r.prompt for r in requests], [r.images for r in requests],
                           negative_prompts=[r.negative_prompt for r in requests])
    together = sample(model, inputs, steps=3, true_cfg_scale=[1.0, 4.0, 4.0], seeds=[1, 2, 3])
    for i, r in enumerate(requests):
        one = model.prepare([r.prompt], [r.images], negative_prompts=[r.negative_prompt])
        assert (sample(model, one, steps=3, true_cfg_scale=[[1.0, 4.0, 4.0][i]], seeds=[r.seed])
                - together[i:i + 1]).abs().max() <= TOL
    # under `with_cfg_parallel` (here one process: the split runs the whole batch) the passes go
    # through `predict`, without the KV cache: the same function
    shared = model.with_cfg_parallel(lambda predict, *args: predict(*args))
    assert (sample(shared, inputs, steps=3, true_cfg_scale=[1.0, 4.0, 4.0], seeds=[1, 2, 3])
            - together).abs().max() <= TOL


def test_latent_mask_fusion_keeps_the_source_outside_the_mask(model):
    """With an all-black mask (nothing to edit) the guided velocity is the source's everywhere: the
    edit decodes to the source's latents (the velocity hooks act on the guided velocity)."""
    from editkit.infer.engine import EditRequest, Engine
    from editkit.infer.sampler import bridge_start

    mask = Image.new("L", IMAGES[0].size, 0)
    request = EditRequest("make it red", [IMAGES[0]], seed=5, steps=3, true_cfg_scale=4.0, mask=mask,
                          fusion="latent-mask")
    edited = Engine(model).edit([request])[0]
    with torch.no_grad():
        source = model.to_pil(model.decode_latents(bridge_start(model, [IMAGES[0]], 96, 32)))[0]
    assert np.abs(np.asarray(edited, dtype=int) - np.asarray(source, dtype=int)).max() <= 1
    unfused = Engine(model).edit([EditRequest("make it red", [IMAGES[0]], seed=5, steps=3, true_cfg_scale=4.0)])[0]
    assert np.abs(np.asarray(unfused, dtype=int) - np.asarray(source, dtype=int)).max() > 10


def test_save_tiny_folder_loads_in_diffusers_and_editkit(model, tmp_path):
    from diffusers import QwenImage21Pipeline

    from editkit.models import save_tiny
    from editkit.models.families import detect_family

    assert detect_family({"_class_name": "QwenImage21Pipeline"}, {}) == FAMILY
    assert detect_family({}, {"_class_name": "QwenImage21Transformer2DModel"}) == FAMILY
    folder = save_tiny(tmp_path / "q21", family=FAMILY)
    loaded = load_model(folder, dtype="fp32", device="cpu")
    assert loaded.family.name == FAMILY and type(loaded).__name__ == "QwenImage21Model"
    assert loaded.drop_idx == model.drop_idx and loaded.sample_sigmas is None
    # transformers builds a Qwen3VLProcessor only with torchvision (its video processor), which this
    # environment lacks: the processor is passed in, every other component comes from the folder
    pipe = QwenImage21Pipeline.from_pretrained(folder, processor=loaded.processor, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(model, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # a distilled checkpoint: its sample_sigmas are the schedule and the default step count
    index = json.loads((folder / "model_index.json").read_text())
    sigmas = [1.0, 0.8, 0.55, 0.3]
    (folder / "model_index.json").write_text(json.dumps({**index, "sample_sigmas": sigmas}))
    distilled = load_model(folder, dtype="fp32", device="cpu")
    assert distilled.family.sampling.steps == 4 and distilled.sample_sigmas == sigmas
    pipe = QwenImage21Pipeline.from_pretrained(folder, processor=loaded.processor, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.sample_sigmas == sigmas
    ref = pipe(image=[IMAGES[1]], prompt="a cat", output_resolution=64, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(0)).images  # 40 steps asked, the 4 sigmas run
    inputs = distilled.prepare(["a cat"], [[IMAGES[1]]])
    ours = sample(distilled, inputs, steps=distilled.family.sampling.steps, true_cfg_scale=1.0, seeds=[0])
    assert (ours - ref).abs().max().item() <= TOL
    assert distilled.schedule_sigmas(3) == pytest.approx([1.0, 2 / 3, 1 / 3])  # other step counts: the grid

    (folder / "model_index.json").write_text(json.dumps({**index, "sample_sigmas": [1.0, 0]}))
    with pytest.raises(UserError, match="sample_sigmas must be a list of sigmas"):
        load_model(folder, dtype="fp32", device="cpu")
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "processor" / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="missing processor/preprocessor_config.json"):
        load_model(folder, dtype="fp32", device="cpu")


def test_cli_edit_and_infer_write_rgba_pngs(tmp_path, capsys):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord
    from editkit.infer.outputs import read_settings

    sources = []
    for i, image in enumerate(IMAGES):
        sources.append(tmp_path / f"src{i}.png")
        image.save(sources[-1])
    common = ["--model", TINY, "--steps", "2", "--dtype", "fp32", "--device", "cpu"]
    out = tmp_path / "edit.png"
    code, _, err = run_cli(capsys, "edit", *common, "--image", sources[0], "--image", sources[2], "--prompt",
                           "put the cat on the sofa", "--out", out)
    assert code == 0, err
    with Image.open(out) as saved:
        assert saved.mode == "RGBA" and saved.size == (32, 96)  # the last image's aspect at the 64x64 area
        alpha = np.asarray(saved)[..., 3]
    assert alpha.min() < 255  # the model's alpha is kept, not flattened
    assert read_settings(out)["family"] == FAMILY and read_settings(out)["true_cfg_scale"] == 1.0

    manifest = tmp_path / "set.jsonl"
    write_manifest([EditRecord(id="one", instruction="blue", sources=[sources[0]]),
                    EditRecord(id="two", instruction="red", sources=[sources[1], sources[0]])], manifest, "pairs")
    code, _, err = run_cli(capsys, "infer", *common, "--data", manifest, "--out", tmp_path / "preds")
    assert code == 0, err
    written = sorted((tmp_path / "preds").glob("cfg-*/*.png"))
    assert [p.stem for p in written] == ["one", "two"]
    assert all(Image.open(p).mode == "RGBA" for p in written)

    from typer.testing import CliRunner

    from editkit.cli import app

    result = CliRunner().invoke(app, ["chat", *common, "--image", str(sources[0]), "--save", str(tmp_path / "chat")],
                                input="make it blue\n/quit\n")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "chat" / "turn-01.png").mode == "RGBA"


def test_transparent_sources_reach_the_model_with_their_alpha(model, tmp_path, capsys, monkeypatch):
    from editkit.data.images import load_image
    from editkit.models.qwen_image_21 import QwenImage21Model

    seen = []
    prepare = QwenImage21Model.prepare

    def spy(self, prompts, images, *args, **kwargs):
        seen.extend(image for sample in images for image in sample)
        return prepare(self, prompts, images, *args, **kwargs)

    monkeypatch.setattr(QwenImage21Model, "prepare", spy)
    path = tmp_path / "half.png"
    IMAGES[2].save(path)
    code, _, err = run_cli(capsys, "edit", "--model", TINY, "--steps", "2", "--dtype", "fp32", "--device", "cpu",
                           "--image", path, "--prompt", "make it red", "--out", tmp_path / "cli.png")
    assert code == 0, err
    assert [image.mode for image in seen] == ["RGBA"]
    assert np.array_equal(np.asarray(seen[0]), np.asarray(IMAGES[2]))  # the file's alpha, not a white composite

    from editkit.infer.engine import EditRequest, Engine

    flat = load_image(path)
    rgb_engine = Engine(load_model("tiny", dtype="fp32", device="cpu"))  # an RGB family: over white
    resolved = rgb_engine.resolve(EditRequest("x", [load_image(path, "keep")], steps=2))
    assert resolved.images[0].mode == "RGB" and np.array_equal(np.asarray(resolved.images[0]), np.asarray(flat))
    assert np.asarray(flat)[0, 0].tolist() == [255, 255, 255]  # a transparent pixel became white


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread):
    from editkit.data.synth import synthesize
    from editkit.train.cache import build_cache

    root = tmp_path_factory.mktemp("q21-train")
    data = synthesize(root / "data", n=4, size=64, seed=0, val_fraction=0.0, test_fraction=0.0, progress=False)
    build_cache(TINY, data["train"], root / "cache", area=64 * 64, multiple=32, dtype="fp32", device="cpu",
                progress=False)
    return root / "cache", data


def _train(out, cache_dir, mode="lora", kind="flow_matching", steps=3, lr=1e-3):
    import csv

    from editkit.train.config import validate_config
    from editkit.train.trainer import train

    cfg = validate_config({
        "model": TINY, "output_dir": str(out), "seed": 0,
        "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 32},
        "train": {"mode": mode, "lora": {"rank": 4}},
        "objective": {"kind": kind, **({"timesteps": {"sampling": "discrete"}} if kind == "lbm" else {})},
        "optim": {"lr": lr, "schedule": "constant"},
        "loop": {"max_steps": steps, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no"}})
    train(cfg, progress=False)
    with open(out / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_full_fine_tuning_and_lbm_train(cache, tmp_path):
    losses = _train(tmp_path / "full", cache[0], mode="full", steps=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    tuned = load_model(TINY, transformer=tmp_path / "full" / "final" / "transformer", dtype="fp32", device="cpu")
    assert type(tuned.transformer).__name__ == "QwenImage21Transformer2DModel"
    losses = _train(tmp_path / "lbm", cache[0], kind="lbm", steps=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "lbm" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_trained_lora_changes_editkit_and_diffusers_identically(cache, tmp_path):
    from editkit.infer.engine import Engine

    out = tmp_path / "lora"
    losses = _train(out, cache[0], steps=4, lr=2e-2)
    assert len(losses) == 4 and all(np.isfinite(losses))
    names = ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "lora_diffsynth.safetensors")
    assert all((out / "final" / name).is_file() for name in names)

    model = load_model(TINY, dtype="fp32", device="cpu")
    inputs = model.prepare(["make it red"], [[IMAGES[0]]])
    base = sample(model, inputs, steps=3, true_cfg_scale=1.0, seeds=[0])
    engine = Engine(model)
    results = {}
    for name in names:
        engine.load_loras([str(out / "final" / name)])
        results[name] = sample(model, inputs, steps=3, true_cfg_scale=1.0, seeds=[0])
    pipe = _pipeline(load_model(TINY, dtype="fp32", device="cpu"))
    pipe.load_lora_weights(str(out / "final"))
    ref = pipe(image=[IMAGES[0]], prompt="make it red", num_inference_steps=3, output_resolution=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    ours = results[names[0]]
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the edit
    assert (ours - ref).abs().max() <= TOL  # exactly as diffusers applies it
    assert all(torch.equal(other, ours) for other in results.values())
