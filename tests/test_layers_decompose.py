"""`editkit layers decompose` and `editkit layers infer` with the tiny Qwen-Image-Layered model:
the files they write (layers bottom first, PSD, recomposite, PSNR), batching, the dataset layout,
sharding, resume, refusal of changed settings, and bad input as one line with exit code 2."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from editkit.errors import UserError
from editkit.layers.compose import composite, premultiplied, to_uint8
from editkit.layers.decompose import (
    DecomposeSettings,
    infer_dataset,
    layer_files,
    recomposite,
    recomposition_psnr,
)
from tests.cli_run import run_cli

TINY = "tiny:qwen-image-layered"
FAST = ["--steps", "2", "--prompt", "shapes on a plain background"]


@pytest.fixture(scope="module")
def model():
    from editkit.layers.decompose import load_decomposer

    return load_decomposer(TINY, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from editkit.layers.prep import prepare_layers
    from editkit.layers.synth import synthesize_layers

    scenes = synthesize_layers(tmp_path_factory.mktemp("synth") / "scenes", n=4, size=64, seed=3, progress=False)
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare_layers(scenes, out, train_count=3, val_count=1, max_side=64, progress=False)
    return out


def _image(path, seed, size=(64, 64)):
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return path


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA")).astype(int)


def _stamps(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("layer_*.png"))}


# ----- one image -------------------------------------------------------------------------------

def test_decompose_writes_layers_psd_recomposite_and_psnr(tmp_path, capsys, model):
    from editkit.layers.sources import discover, open_sample

    source = _image(tmp_path / "in.png", 0, (80, 48))
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "layers", "decompose", "--model", TINY, "--image", source, "--out", out,
                              "--layers", "3", "--steps", "2", "--device", "cpu")
    assert code == 0, stdout
    files = layer_files(out)
    assert [p.name for p in files] == ["layer_00.png", "layer_01.png", "layer_02.png"]
    loaded, _ = model
    size = loaded.layer_size(Image.open(source))
    layers = [Image.open(p) for p in files]
    assert all(layer.mode == "RGBA" and layer.size == size for layer in layers)

    # the recomposite is the over-composition of the PNGs, bottom first; its PSNR is printed
    recomposed = _pixels(out / "recomposite.png")
    assert np.abs(recomposed - to_uint8(composite([np.asarray(layer) for layer in layers]))).max() == 0
    expected = recomposition_psnr(Image.open(out / "recomposite.png"), loaded.layer_view(Image.open(source)))
    assert f"recomposition PSNR {expected:.2f} dB" in stdout

    # the PSD holds the same layers in the same order (read back with editkit's own PSD reader)
    (tmp_path / "psd").mkdir()
    os.replace(out / "layers.psd", tmp_path / "psd" / "layers.psd")
    _, refs = discover(tmp_path / "psd")
    psd_layers = open_sample(refs[0]).layers
    assert len(psd_layers) == 3
    for png, psd_layer in zip(files, psd_layers):
        ours, theirs = premultiplied(_pixels(png).astype(np.uint8)), premultiplied(np.asarray(psd_layer.image()))
        assert np.abs(ours - theirs).max() * 255 <= 1.0

    # no --prompt: the auto-caption is what ran, and run.json says so
    run = json.loads((out / "run.json").read_text())
    assert run["job"] == "layers decompose" and run["config"]["steps"] == 2
    assert run["images"][0]["prompt"] == loaded.caption([Image.open(source).convert("RGBA")])[0]


def test_several_images_are_batched_into_one_folder_each(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    images = [_image(tmp_path / "a.png", 1), _image(tmp_path / "b" / "a.png", 2),
              _image(tmp_path / "c.png", 3, (96, 48))]
    out = tmp_path / "out"
    args = [a for image in images for a in ("--image", image)]
    code, stdout, _ = run_cli(capsys, "layers", "decompose", "--model", TINY, *args, "--out", out, "--layers", "2",
                              *FAST, "--seed", "5", "--device", "cpu")
    assert code == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == ["a", "a_2", "c", "run.json"]
    assert Image.open(out / "c" / "layer_01.png").size == (96, 32)  # the 64x64 area at 2:1
    assert stdout.count("recomposition PSNR") == 3
    # image i has seed 5 + i: the second image alone with seed 6 gives the same layers
    alone = tmp_path / "alone"
    run_cli(capsys, "layers", "decompose", "--model", TINY, "--image", images[1], "--out", alone, "--layers", "2",
            *FAST, "--seed", "6", "--device", "cpu")
    for a, b in zip(layer_files(alone), layer_files(out / "a_2")):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_a_bad_image_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, _, stderr = run_cli(capsys, "layers", "decompose", "--model", TINY, "--image", bad, "--out", tmp_path / "o",
                              *FAST, "--device", "cpu")
    assert code == 2
    assert "broken.png" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli(capsys, "layers", "decompose", "--model", TINY, "--image", _image(tmp_path / "ok.png", 0),
                              "--out", tmp_path / "o", "--layers", "many", "--device", "cpu")
    assert code == 2 and "--layers" in stderr


def test_an_edit_model_is_refused(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "layers", "decompose", "--model", "tiny:qwen-image-edit-2511", "--image",
                              _image(tmp_path / "in.png", 0), "--out", tmp_path / "o", *FAST, "--device", "cpu")
    assert code == 2 and "does not decompose" in stderr


def test_recomposition_and_psnr():
    rng = np.random.default_rng(0)
    layers = [rng.integers(0, 256, (8, 6, 4), dtype=np.uint8) for _ in range(3)]
    layers[0][..., 3] = 255
    pil = [Image.fromarray(layer, "RGBA") for layer in layers]
    assert np.array_equal(np.asarray(recomposite(pil)), to_uint8(composite(layers)))
    assert math.isinf(recomposition_psnr(pil[0], pil[0]))
    grey, lighter = (Image.new("RGBA", (4, 4), (v, v, v, 255)) for v in (100, 151))
    mse = (51 / 255) ** 2 * 3 / 4  # three colour channels differ, alpha does not
    assert recomposition_psnr(grey, lighter) == pytest.approx(10 * math.log10(1 / mse))


# ----- a dataset -------------------------------------------------------------------------------

def _settings(**kw):
    return DecomposeSettings(steps=2, prompt="shapes", **kw)


def test_infer_writes_one_folder_per_sample_with_the_ground_truth_layer_count(tmp_path, capsys, prepared):
    from editkit.layers.records import read_prepared

    out = tmp_path / "pred"
    code, stdout, _ = run_cli(capsys, "layers", "infer", "--model", TINY, "--data", prepared, "--out", out, *FAST,
                              "--device", "cpu")
    assert code == 0, stdout
    entries = read_prepared(prepared)
    for entry in entries:
        files = layer_files(out / entry.id)
        assert len(files) == len(entry.layers)
        assert Image.open(files[0]).size == tuple(entry.size) and Image.open(files[0]).mode == "RGBA"
    assert (out / "run.json").is_file() and (out / "fingerprint.json").is_file()
    assert f"decomposed {len(entries)} sample(s)" in stdout and "editkit eval --task layers" in stdout

    # --split val: only the val sample, from the manifest file itself
    val = tmp_path / "val"
    code, _, _ = run_cli(capsys, "layers", "infer", "--model", TINY, "--data", prepared / "metadata" / "manifest.json",
                         "--out", val, "--split", "val", "--layers", "2", *FAST, "--device", "cpu")
    assert code == 0
    assert [p.name for p in val.iterdir() if p.is_dir()] == [e.id for e in entries if e.split == "val"]


def test_infer_resumes_keeps_finished_samples_and_refuses_other_settings(tmp_path, model, prepared):
    loaded, identity = model
    out = tmp_path / "pred"
    first = infer_dataset(loaded, identity, prepared, out, _settings(), layers=2, show_progress=False)
    assert len(first.written) == 4
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    import shutil

    shutil.rmtree(folders[0])  # as if killed before this sample: a half-written copy beside it
    (out / f".tmp-{folders[0].name}.abcd1234").mkdir()
    kept = _stamps(out)
    again = infer_dataset(loaded, identity, prepared, out, _settings(), layers=2, show_progress=False)
    assert again.skipped == 3 and again.written == [folders[0]]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in kept.items())  # finished samples untouched
    assert not list(out.glob(".tmp-*"))

    with pytest.raises(UserError, match="other settings"):
        infer_dataset(loaded, identity, prepared, out, _settings(cfg=2.0), layers=2, show_progress=False)
    with pytest.raises(UserError, match="other settings"):
        infer_dataset(loaded, identity, prepared, out, _settings(), layers=3, show_progress=False)
    redone = infer_dataset(loaded, identity, prepared, out, _settings(), layers=3, overwrite=True,
                           show_progress=False)
    assert len(redone.written) == 4 and all(len(layer_files(f)) == 3 for f in folders)


def test_infer_shards_across_processes_with_the_same_layers(tmp_path, model, prepared, monkeypatch):
    loaded, identity = model
    single = tmp_path / "single"
    infer_dataset(loaded, identity, prepared, single, _settings(batch_size=3), layers=2, show_progress=False)
    sharded = tmp_path / "sharded"
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written += infer_dataset(loaded, identity, prepared, sharded, _settings(batch_size=1), layers=2,
                                 show_progress=False).written
    assert sorted(p.name for p in written) == sorted(p.name for p in single.iterdir() if p.is_dir())
    assert (sharded / "run-rank0.json").is_file() and (sharded / "run-rank1.json").is_file()
    for folder in single.iterdir():
        if folder.is_dir():  # seed + sample index: the same layers whatever the shard or batch
            for a, b in zip(layer_files(folder), layer_files(sharded / folder.name)):
                assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_infer_on_a_plain_manifest_and_bad_input(tmp_path, capsys):
    images = [_image(tmp_path / f"img{i}.png", i) for i in range(2)]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "instruction": "", "source_image": str(p)}) + "\n"
                                for i, p in enumerate(images)))
    out = tmp_path / "pred"
    code, stdout, stderr = run_cli(capsys, "layers", "infer", "--model", TINY, "--data", manifest, "--out", out,
                                   "--layers", "2", *FAST, "--device", "cpu")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["s0", "s1"]
    assert len(layer_files(out / "s1")) == 2

    images[1].write_bytes(b"broken")  # a damaged image: one line naming it, exit 2
    code, _, stderr = run_cli(capsys, "layers", "infer", "--model", TINY, "--data", manifest, "--out",
                              tmp_path / "other", "--layers", "2", *FAST, "--device", "cpu")
    assert code == 2 and "img1.png" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(capsys, "layers", "infer", "--model", TINY, "--data", manifest, "--out",
                              tmp_path / "other", "--split", "val", *FAST, "--device", "cpu")
    assert code == 2 and "--split" in stderr
