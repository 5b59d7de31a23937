"""Layered RGBA data: synth, the readers (PSD, Crello-style, split layers), prep -> validate,
resume and the fingerprint, validate's problems, the component dataloader."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.layers.compose import composite, composite_error, to_uint8
from editkit.layers.prep import bucket_size, prepare_layers
from editkit.layers.records import read_prepared
from editkit.layers.sources import discover, open_sample
from editkit.layers.synth import MAX_LAYERS, MIN_LAYERS, synthesize_layers
from editkit.layers.validate import validate_prepared
from tests.cli_run import run_cli


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _rgba(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 4), dtype=np.uint8)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synthesize_layers(tmp_path_factory.mktemp("synth") / "scenes", n=10, size=96, seed=1, progress=False)


@pytest.fixture(scope="module")
def prepared(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare_layers(synth_root, out, train_count=8, val_count=2, max_side=64, progress=False)
    return out


# -- over-composition ---------------------------------------------------------------------------

def test_composite_is_straight_alpha_over_and_agrees_with_pillow():
    red = np.zeros((2, 2, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 128
    out = composite([np.zeros((2, 2, 4), np.uint8), red])
    np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.0, 128 / 255], atol=1e-6)  # not darkened by the empty canvas
    layers = [_rgba((16, 12), s) for s in range(4)]
    pil = Image.fromarray(layers[0], "RGBA")
    for layer in layers[1:]:
        pil = Image.alpha_composite(pil, Image.fromarray(layer, "RGBA"))
    assert composite_error(layers, np.asarray(pil)) <= 2.0  # Pillow rounds to 8 bits after every layer
    assert composite_error(layers, to_uint8(composite(layers))) <= 1.0


# -- synth ----------------------------------------------------------------------------------------

def test_synth_is_deterministic_by_seed(tmp_path, synth_root):
    again = synthesize_layers(tmp_path / "again", n=10, size=96, seed=1, progress=False)
    assert _files(again, skip=("synth.json",)) == _files(synth_root, skip=("synth.json",))
    other = synthesize_layers(tmp_path / "other", n=10, size=96, seed=2, progress=False)
    assert _files(other, skip=("synth.json",)) != _files(synth_root, skip=("synth.json",))
    counts = []
    for folder in sorted(p for p in synth_root.iterdir() if p.is_dir()):
        layers = sorted(folder.glob("layer_*.png"))
        texts = json.loads((folder / "descriptions.json").read_text())
        counts.append(len(layers))
        assert MIN_LAYERS <= len(layers) <= MAX_LAYERS and len(texts) == len(layers) and all(texts)
        background = np.asarray(Image.open(layers[0]))
        assert Image.open(layers[0]).mode == "RGBA" and background[..., 3].min() == 255  # opaque background
        alphas = np.concatenate([np.asarray(Image.open(p))[..., 3].ravel() for p in layers[1:]])
        assert ((alphas > 0) & (alphas < 255)).any()  # soft or semi-transparent edges
    assert len(set(counts)) > 1
    with pytest.raises(UserError, match="not a synthetic layers folder"):
        synthesize_layers(tmp_path, n=1, progress=False)  # a folder it did not write is never replaced


# -- prep -> validate ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, caps", [((1000, 500), (32, 1024, 1 << 20)), ((4000, 3000), (32, 1024, 1 << 20)),
                                        ((2000, 2000), (32, 4096, 1_040_000)), ((50, 40), (32, 1024, 1 << 20)),
                                        ((3000, 200), (16, 512, 65536))])
def test_bucket_size_keeps_aspect_within_the_caps(size, caps):
    multiple, max_side, max_pixels = caps
    w, h = bucket_size(*size, multiple, max_side, max_pixels)
    assert w % multiple == 0 and h % multiple == 0 and max(w, h) <= max_side and w * h <= max_pixels
    scale = min(1.0, max_side / max(size), (max_pixels / (size[0] * size[1])) ** 0.5)
    assert abs(w - size[0] * scale) <= multiple and abs(h - size[1] * scale) <= multiple


def test_prep_then_validate_on_synth(prepared, synth_root):
    entries = read_prepared(prepared)
    assert [e.split for e in entries].count("train") == 8 and [e.split for e in entries].count("val") == 2
    assert len({e.bucket for e in entries}) > 1  # several aspect ratios, several buckets
    for entry in entries:
        source = synth_root / entry.id
        assert entry.descriptions == json.loads((source / "descriptions.json").read_text())
        assert len(entry.layers) == len(list(source.glob("layer_*.png")))
        assert max(entry.size) <= 64 and entry.bucket == f"{entry.size[0]}x{entry.size[1]}"
        layers = [np.asarray(Image.open(prepared / p)) for p in entry.layers]
        assert all(layer.shape == (entry.size[1], entry.size[0], 4) for layer in layers)
        assert composite_error(layers, np.asarray(Image.open(prepared / entry.composite))) <= 1.0
    report = validate_prepared(prepared, progress=False)
    assert report.ok and report.samples == 10 and report.errors[0][1] <= 1.0


def test_prep_is_resumable_after_an_interruption(tmp_path, synth_root, prepared, monkeypatch):
    import editkit.layers.prep as prep

    real, calls = prep.prep_sample, []
    reference = {e.id: e for e in read_prepared(prepared)}

    def interrupted(args):
        calls.append(args[0].id)
        if len(calls) == 4:  # killed while writing the 4th sample: a half-written PNG is left
            entry = reference[args[0].id]
            folder = tmp_path / "out" / entry.split / entry.bucket
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".tmp-{args[0].id}_comp000.png.abcd1234.png").write_bytes(b"half a png")
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(prep, "prep_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_layers(synth_root, tmp_path / "out", train_count=8, val_count=2, max_side=64, progress=False)
    assert not (tmp_path / "out" / "metadata" / "manifest.json").exists()  # the manifest comes last
    monkeypatch.setattr(prep, "prep_sample", real)
    result = prepare_layers(synth_root, tmp_path / "out", train_count=8, val_count=2, max_side=64, progress=False)
    assert result.reused == 3
    assert _files(tmp_path / "out", skip=("prep.json",)) == _files(prepared, skip=("prep.json",))


def test_a_rerun_with_other_settings_or_inputs_is_refused(tmp_path, synth_root, capsys):
    src = tmp_path / "scenes"
    shutil.copytree(synth_root, src)
    out = tmp_path / "out"
    args = ["layers", "prep", "--input", src, "--out", out, "--train-count", 3, "--val-count", 1, "--workers", 1]
    assert run_cli(capsys, *args, "--max-side", 64)[0] == 0
    code, _, err = run_cli(capsys, *args, "--max-side", 32)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "differs in: max_side" in err and "--overwrite" in err
    changed = src / "scene-000000" / "layer_000.png"
    Image.new("RGBA", Image.open(changed).size, (1, 2, 3, 4)).save(changed)
    code, _, err = run_cli(capsys, *args, "--max-side", 64)
    assert code == 2 and "differs in: inputs" in err
    assert run_cli(capsys, *args, "--max-side", 32, "--overwrite")[0] == 0
    assert {max(e.size) for e in read_prepared(out)} == {32}
    assert {max(Image.open(p).size) for p in out.rglob("*.png")} == {32}  # the 64 px outputs were removed


def test_prep_user_errors_are_one_line(tmp_path, synth_root, capsys):
    cases = [
        (["--input", tmp_path / "nowhere"], "not found"),
        (["--input", synth_root, "--train-count", 50], "ask for 51"),
        (["--input", synth_root, "--format", "jpeg"], "--format 'jpeg'"),
        (["--input", synth_root, "--multiple", 7], "--multiple"),
    ]
    for extra, message in cases:
        base = {"--train-count": 1, "--val-count": 1}
        flags = [str(a) for a in extra]
        for flag, value in base.items():
            if flag not in flags:
                flags += [flag, str(value)]
        code, _, err = run_cli(capsys, "layers", "prep", "--out", tmp_path / "o", *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)


# -- validate's problems ------------------------------------------------------------------------------

def _lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def test_validate_finds_a_corrupted_composite_a_gap_and_a_missing_alpha(tmp_path, prepared, capsys):
    entries = read_prepared(prepared)
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    target = entries[0]
    img = np.asarray(Image.open(bad / target.composite)).copy()
    img[:8, :8] = (0, 0, 0, 255)
    Image.fromarray(img, "RGBA").save(bad / target.composite)
    code, out, _ = run_cli(capsys, "layers", "validate", bad, "--workers", 1)
    assert code == 2 and len(_lines_naming(out, Path(target.composite).name)) == 1
    assert "over-composition" in _lines_naming(out, Path(target.composite).name)[0]
    assert out.strip().splitlines()[-1].endswith("1 problems")

    gap = tmp_path / "gap"
    shutil.copytree(prepared, gap)
    deep = next(e for e in entries if len(e.layers) >= 3)
    (gap / deep.layers[1]).unlink()
    flat = next(e for e in entries if e.id != deep.id)
    Image.open(gap / flat.layers[0]).convert("RGB").save(gap / flat.layers[0])
    code, out, _ = run_cli(capsys, "layers", "validate", gap, "--workers", 1)
    assert code == 2
    [line] = _lines_naming(out, Path(deep.layers[1]).name)
    assert "gap in the z-order" in line
    [line] = _lines_naming(out, Path(flat.layers[0]).name)
    assert "no alpha channel" in line
    assert validate_prepared(prepared, progress=False).ok  # nothing was written to the original

    (gap / "metadata" / "manifest.json").write_text("{not json")
    code, _, err = run_cli(capsys, "layers", "validate", gap)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "manifest.json" in err


# -- the readers ---------------------------------------------------------------------------------------

def _placed(size, img, left, top, alpha_scale=1.0):
    canvas = np.zeros((size[1], size[0], 4), np.float32)
    arr = np.asarray(img, dtype=np.float32)
    canvas[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    canvas[..., 3] *= alpha_scale
    return canvas


def test_a_layered_psd_reads_back_into_its_layers(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    size = (64, 48)
    background = Image.fromarray(np.dstack([_rgba((48, 64), 0)[..., :3], np.full((48, 64), 255, np.uint8)]), "RGBA")
    soft = _rgba((20, 30), 1)
    soft[..., 3] = np.linspace(0, 255, 30, dtype=np.uint8)[None, :]
    top = _rgba((10, 12), 2)
    top[..., 3] = 255
    psd = PSDImage.new("RGBA", size)
    PixelLayer.frompil(background, psd, name="sky")
    group = psd.create_group(name="group", opacity=128)
    PixelLayer.frompil(Image.fromarray(soft, "RGBA"), group, name="soft glow", top=5, left=10)
    hidden = PixelLayer.frompil(Image.fromarray(top, "RGBA"), psd, name="hidden", top=0, left=0)
    hidden.visible = False
    label = PixelLayer.frompil(Image.fromarray(top, "RGBA"), psd, name="label", top=30, left=40)
    label.opacity = 200
    (tmp_path / "psds" / "big").mkdir(parents=True)
    psd.save(tmp_path / "psds" / "poster.psd")
    psb = PSDImage.new("RGBA", (40, 30))
    psb._record.header.version = 2  # PSB (psd-tools writes it on its own only beyond 30000 px)
    PixelLayer.frompil(Image.new("RGBA", (10, 10), (255, 0, 0, 200)), psb, name="dot", top=3, left=4)
    psb.save(tmp_path / "psds" / "big" / "banner.psb")

    fmt, refs = discover(tmp_path / "psds")
    assert fmt == "psd" and [r.id for r in refs] == ["big__banner", "poster"]
    [dot] = open_sample(refs[0]).layers
    assert tuple(np.asarray(dot.image())[5, 5]) == (255, 0, 0, 200) and np.asarray(dot.image())[2, 4, 3] == 0
    sample = open_sample(refs[1])
    assert sample.size == size
    assert [layer.description for layer in sample.layers] == ["sky", "soft glow", "label"]  # bottom to top
    assert {layer.kind for layer in sample.layers} == {"pixel"}
    expected = [_placed(size, background, 0, 0), _placed(size, soft, 10, 5, 128 / 255),
                _placed(size, top, 40, 30, 200 / 255)]
    for layer, want in zip(sample.layers, expected):
        got = np.asarray(layer.image(), dtype=np.float32)
        np.testing.assert_allclose(got[..., 3], want[..., 3], atol=1.01)
        seen = want[..., 3] >= 16  # colour is only defined where there is coverage
        np.testing.assert_allclose(got[..., :3][seen], want[..., :3][seen], atol=1.01)

    out = tmp_path / "out"
    prepare_layers(tmp_path / "psds", out, train_count=2, val_count=0, progress=False)
    entry = next(e for e in read_prepared(out) if e.id == "poster")
    assert entry.size == bucket_size(*size) and entry.source_size == size
    assert entry.descriptions == ["sky", "soft glow", "label"]
    assert validate_prepared(out, progress=False).ok


def _crello_sample(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.new("RGBA", (80, 60), (200, 220, 240, 255)).save(folder / "bg.png")
    Image.new("RGBA", (20, 10), (255, 0, 0, 255)).save(folder / "badge.png")
    Image.new("RGBA", (80, 60), (0, 0, 255, 255)).save(folder / "title.png")
    layout = {"canvas_width": 80, "canvas_height": 60, "components": [
        {"file": "title.png", "bbox": [60, 50, 30, 20], "z": 2, "type": "text", "description": "the title",
         "opacity": 0.5},
        {"file": "bg.png", "z": 0, "type": "background", "description": "a pale blue background"},
        {"file": "badge.png", "bbox": [10, 5, 40, 20], "z": 1, "type": "image", "description": "a red badge"},
    ]}
    (folder / "layout.json").write_text(json.dumps(layout))


def test_a_crello_style_folder_reads_in_z_order_with_boxes(tmp_path):
    _crello_sample(tmp_path / "crello" / "card-1")
    fmt, refs = discover(tmp_path / "crello")
    assert fmt == "crello" and [r.id for r in refs] == ["card-1"]
    sample = open_sample(refs[0])
    assert [layer.kind for layer in sample.layers] == ["background", "image", "text"]
    assert sample.layers[1].description == "a red badge"
    badge = np.asarray(sample.layers[1].image())
    assert badge.shape == (60, 80, 4)
    assert tuple(badge[5, 10]) == (255, 0, 0, 255) and tuple(badge[24, 49]) == (255, 0, 0, 255)  # its bbox corners
    assert badge[25, 10, 3] == 0 and badge[5, 50, 3] == 0 and badge[4, 10, 3] == 0  # outside its bbox
    title = np.asarray(sample.layers[2].image())
    assert title[55, 70, 3] == 128 and title[49, 70, 3] == 0  # opacity 0.5, clipped to the canvas

    out = tmp_path / "out"
    prepare_layers(tmp_path / "crello", out, train_count=0, val_count=1, progress=False)
    [entry] = read_prepared(out)
    assert entry.split == "val" and entry.kinds == ["background", "image", "text"] and entry.size == (64, 64)
    assert validate_prepared(out, progress=False).ok

    layout = json.loads((tmp_path / "crello" / "card-1" / "layout.json").read_text())
    layout["components"][2]["bbox"] = [10, 5, 0, 20]
    (tmp_path / "crello" / "card-1" / "layout.json").write_text(json.dumps(layout))
    with pytest.raises(UserError, match=r"layout\.json: components\[2\]\.bbox width and height"):
        open_sample(refs[0])


def test_split_layer_folders_need_one_canvas_and_one_description_per_layer(tmp_path):
    folder = tmp_path / "layers" / "s1"
    folder.mkdir(parents=True)
    for name in ("layer2.png", "layer10.png", "layer1.png"):
        Image.new("RGBA", (40, 30), (10, 20, 30, 255)).save(folder / name)
    (folder / "descriptions.txt").write_text("one\ntwo\nten\n")
    sample = open_sample(discover(tmp_path / "layers")[1][0])
    assert [layer.description for layer in sample.layers] == ["one", "two", "ten"]  # layer1, layer2, layer10
    (folder / "descriptions.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match="2 descriptions for 3 layers"):
        open_sample(discover(tmp_path / "layers")[1][0])
    Image.new("RGBA", (41, 30)).save(folder / "layer3.png")
    with pytest.raises(UserError, match=r"layer3\.png: is 41x30"):
        open_sample(discover(tmp_path / "layers")[1][0])


# -- the dataloader ------------------------------------------------------------------------------------

def test_the_dataloader_yields_one_bucket_per_batch_deterministically(prepared):
    from editkit.layers.dataset import ComponentDataset, component_dataloader

    entries = {e.id: e for e in read_prepared(prepared) if e.split == "train"}
    loader = component_dataloader(prepared, "train", batch_size=3, seed=5)
    ids = []
    for batch in loader:
        b, c, h, w = batch["component"].shape
        assert c == 4 and batch["composite"].shape == (b, 4, h, w) and b <= 3
        assert batch["component"].dtype == torch.float32
        assert batch["component"].min() >= -1 and batch["component"].max() <= 1
        assert {entries[i.split("/")[0]].size for i in batch["ids"]} == {(w, h)}  # one bucket
        ids += batch["ids"]
    assert sorted(ids) == sorted(f"{e.id}/comp{k:03d}" for e in entries.values() for k in range(len(e.layers)))
    again = [i for batch in component_dataloader(prepared, "train", batch_size=3, seed=5) for i in batch["ids"]]
    assert again == ids
    next_epoch = [i for batch in loader for i in batch["ids"]]
    assert sorted(next_epoch) == sorted(ids) and next_epoch != ids  # a new epoch, a new order

    first = ComponentDataset(prepared, "train")[0]
    entry = entries[first["id"].split("/")[0]]
    pixels = np.asarray(Image.open(prepared / entry.layers[0]), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(first["component"], torch.from_numpy(pixels).permute(2, 0, 1))
    with_composites = ComponentDataset(prepared, "val", include_composites=True)
    assert sum(1 for i in range(len(with_composites)) if with_composites[i]["id"].endswith("/composite")) == 2


def test_the_batch_sampler_resumes_from_its_state(prepared):
    from editkit.layers.dataset import BucketBatchSampler, ComponentDataset

    buckets = ComponentDataset(prepared, "train").buckets
    sampler = BucketBatchSampler(buckets, 2, seed=1)
    drawn = [sampler.next_batch() for _ in range(len(sampler) + 2)]  # into the second epoch
    state = sampler.state_dict()
    ahead = [sampler.next_batch() for _ in range(3)]
    resumed = BucketBatchSampler(buckets, 2, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == ahead
    assert all(len({buckets[i] for i in batch}) == 1 for batch in drawn)
    ranks = [BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2).batches(0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_a_sample_that_cannot_be_read_is_skipped_whole(tmp_path, capsys):
    for name in ("good", "broken"):
        (tmp_path / "in" / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGBA", (40, 40), (50 * k, 0, 0, 255)).save(tmp_path / "in" / name / f"{k}.png")
    (tmp_path / "in" / "broken" / "1.png").unlink()  # a float TIFF out of [0, 1]: its size reads, its pixels do not
    Image.fromarray(np.full((40, 40), 5.0, np.float32), "F").save(tmp_path / "in" / "broken" / "1.tif")
    code, out, err = run_cli(capsys, "layers", "prep", "--input", tmp_path / "in", "--out", tmp_path / "out",
                             "--train-count", 2, "--val-count", 0, "--workers", 1)
    assert code == 0 and "1 skipped" in out
    [line] = _lines_naming(err, "skipped")
    assert "1.tif" in line and "float image" in line
    assert [e.id for e in read_prepared(tmp_path / "out")] == ["good"]
    assert not list((tmp_path / "out").rglob("broken_*.png"))  # its first component was written, then removed
    assert validate_prepared(tmp_path / "out", progress=False).ok
