"""Regression tests of issue "Trust first" (data part): every pixel mode read right, colour masks,
record origins, empty manifests, plain output names, bad flag values, fingerprinted build resume."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from editkit.data import read_manifest, write_manifest
from editkit.data.build import build_dataset
from editkit.data.images import (
    binarize_mask,
    load_image,
    load_mask,
    mask_size_problem,
    open_8bit,
    oriented_size,
    to_8bit,
)
from editkit.data.records import EditRecord
from editkit.data.tools import plain_name
from editkit.data.validate import check_image, validate_manifest
from editkit.errors import UserError
from tests.cli_run import run_cli

W, H = 64, 8
GRADIENT16 = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)
MEAN8 = GRADIENT16.mean() / 257  # the gradient's mean in 8-bit grey levels


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/RGBA): 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def _cli(capsys, *args):
    """(exit code, stdout, stderr lines) of an in-process CLI run."""
    code, out, err = run_cli(capsys, *args)
    return code, out, err.strip().splitlines()


# -- 1. every mode Pillow decodes ------------------------------------------------------------------

def _write_high_depth(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "png16":
        Image.fromarray(GRADIENT16).save(path)  # decodes as I;16
    elif kind == "tiff16b":
        path = path.with_suffix(".tif")
        Image.frombytes("I;16B", (W, H), GRADIENT16.astype(">u2").tobytes()).save(path)
    elif kind == "pgm16":
        path = path.with_suffix(".pgm")  # decodes as "I" with 16-bit values
        path.write_bytes(b"P5\n%d %d\n65535\n" % (W, H) + GRADIENT16.astype(">u2").tobytes())
    elif kind == "tiff32":
        tifffile = pytest.importorskip("tifffile")
        path = path.with_suffix(".tif")
        tifffile.imwrite(path, GRADIENT16.astype(np.uint32) * 65537)  # the same grey levels in 32 bits
    elif kind == "float":
        path = path.with_suffix(".tif")
        Image.fromarray((GRADIENT16 / 65535).astype(np.float32)).save(path)
    elif kind in ("rgb16", "rgba16", "la16"):
        channels = {"rgb16": (2, 3), "rgba16": (6, 4), "la16": (4, 2)}[kind]
        arr = np.stack([GRADIENT16] * channels[1], -1)
        if kind != "rgb16":
            arr[..., -1] = 65535
        path.write_bytes(_png16(arr, channels[0]))
    return path


@pytest.mark.parametrize("kind", ["png16", "tiff16b", "pgm16", "tiff32", "float", "rgb16", "rgba16", "la16"])
def test_high_bit_depth_keeps_its_grey_levels(tmp_path, kind):
    path = _write_high_depth(tmp_path, kind)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (W, H)
    grey = _grey(img)
    assert abs(grey.mean() - MEAN8) < 1.0  # before the fix: min 252, max 255 (clipped to white)
    assert np.abs(grey - GRADIENT16 / 257).max() <= 1.0  # every pixel, not just on average


def test_sixteen_bit_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(GRADIENT16)
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    img.save(tmp_path / "r.png", exif=exif)
    got = load_image(tmp_path / "r.png")
    assert got.size == (H, W) and abs(_grey(got).mean() - MEAN8) < 1.0


def test_sixteen_bit_in_memory_layouts():
    for mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        raw = GRADIENT16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        img, note = to_8bit(Image.frombytes(mode, (W, H), raw))
        assert img.mode == "L" and abs(_grey(img).mean() - MEAN8) < 1.0 and "16-bit" in note


def test_sixteen_bit_transparent_colour_becomes_alpha(tmp_path):
    arr = GRADIENT16.copy()
    arr[:, :8] = 1000
    Image.fromarray(arr).save(tmp_path / "t.png", transparency=1000)
    rgb = np.asarray(load_image(tmp_path / "t.png"))
    assert (rgb[:, :8] == 255).all() and rgb[:, 20:].min() < 255  # transparent -> over white


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "LAB", "RGBX"])
def test_eight_bit_modes_read_as_pillow_converts_them(tmp_path, mode):
    base = Image.fromarray(np.stack([GRADIENT16 // 257] * 3, -1).astype(np.uint8))
    img = base.convert(mode) if mode != "LAB" else Image.new("LAB", (W, H), (255, 128, 128))
    path = tmp_path / ("m.tif" if mode in ("CMYK", "LAB", "RGBX") else "m.png")
    img.save(path)
    got = load_image(path)
    assert got.mode == "RGB" and got.size == (W, H)
    expected = 255 if mode == "LAB" else (_grey(base.convert("1")).mean() if mode == "1" else MEAN8)
    assert abs(_grey(got).mean() - expected) < 2.5  # palette quantisation and CMYK/LAB round trips


@pytest.mark.parametrize("mode", ["YCbCr", "HSV"])
def test_colour_space_modes_convert(mode):
    red = Image.new("RGB", (4, 4), (200, 30, 30))
    img, note = to_8bit(red.convert(mode))
    assert note is None and np.abs(np.asarray(img.convert("RGB"), dtype=int) - (200, 30, 30)).max() <= 3


def test_transparency_is_composited_over_white(tmp_path):
    cases = {
        "rgba.png": Image.new("RGBA", (4, 4), (255, 0, 0, 0)),
        "la.png": Image.new("LA", (4, 4), (0, 0)),
        "pa.tif": Image.new("PA", (4, 4), (0, 0)),
    }
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    cases["p_trns.png"] = palette
    grey = Image.new("L", (4, 4), 7)
    cases["l_trns.png"] = grey
    for name, img in cases.items():
        extra = {"transparency": 0} if name == "p_trns.png" else {"transparency": 7} if name == "l_trns.png" else {}
        img.save(tmp_path / name, **extra)
        assert load_image(tmp_path / name).getpixel((0, 0)) == (255, 255, 255), name
        assert load_image(tmp_path / name, mode="RGBA").getpixel((0, 0))[3] == 0, name
    palette.save(tmp_path / "p.png")  # without transparency: the palette colour
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)


def test_unreadable_modes_are_one_line_naming_the_file(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "signed.tif", np.full((4, 4), -5, np.int16))
    Image.fromarray(np.full((4, 4), 200.0, np.float32)).save(tmp_path / "float255.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    for name, words in (("signed.tif", "signed"), ("float255.tif", "0..1"), ("nan.tif", "NaN")):
        with pytest.raises(UserError, match=words) as info:
            load_image(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="pixel mode 'La'"):
        to_8bit(Image.new("La", (2, 2)), where="x.png: image")


def test_build_writes_eight_bit_and_validate_warns(tmp_path):
    path = _write_high_depth(tmp_path, "png16")
    manifest = tmp_path / "m.jsonl"
    write_manifest([EditRecord("g", "brighten", [path], path)], manifest, "pairs")
    report = validate_manifest(manifest, progress=False)
    assert report.ok and report.warning_counts() == {"high-bit-depth": 2}
    assert "16-bit grey (I;16)" in report.warnings[0].line()
    built = read_manifest(build_dataset(read_manifest(manifest), tmp_path / "out", progress=False))
    out = Image.open(built[0].sources[0])
    assert out.mode == "RGB" and abs(_grey(out).mean() - MEAN8) < 1.0
    assert open_8bit(built[0].sources[0])[1] is None  # the built file is plain 8-bit


# -- 2. masks ---------------------------------------------------------------------------------

def _square(value, mode="RGB", background=0):
    arr = np.full((8, 8) if mode == "L" else (8, 8, len(mode)), background, np.uint8)
    arr[2:6, 2:6] = value
    return Image.fromarray(arr)


SQUARE = np.zeros((8, 8), np.uint8)
SQUARE[2:6, 2:6] = 255


@pytest.mark.parametrize("name, img", [
    ("red", _square((255, 0, 0))),                 # before the fix: luma 76 -> an empty mask
    ("blue", _square((0, 0, 200))),
    ("white", _square((255, 255, 255))),
    ("grey_l", _square(200, "L")),
    ("alpha", _square((0, 0, 0, 255), "RGBA")),    # black strokes on a transparent layer
    ("alpha_colour", _square((9, 200, 40, 255), "RGBA", background=(255, 255, 255, 0))),
    ("opaque_rgba", _square((255, 0, 0, 255), "RGBA", background=(0, 0, 0, 255))),
])
def test_mask_rule(tmp_path, name, img):
    img.save(tmp_path / f"{name}.png")
    assert np.array_equal(np.asarray(load_mask(tmp_path / f"{name}.png")), SQUARE)


def test_mask_modes_binary_palette_and_sixteen_bit(tmp_path):
    _square(255, "L").convert("1").save(tmp_path / "one.png")
    _square((255, 0, 0)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(SQUARE.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    for name in ("one.png", "p.png", "m16.png"):
        assert np.array_equal(np.asarray(load_mask(tmp_path / name)), SQUARE), name
    assert np.array_equal(np.asarray(binarize_mask(_square((255, 0, 0)))), SQUARE)


def test_validate_warns_about_an_empty_mask_and_flags_its_size(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "black.png")
    _square((255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "small.png")
    rows = [{"instruction": "x", "source_image": "a.png", "mask": m} for m in ("black.png", "red.png", "small.png")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_manifest(tmp_path / "m.jsonl", progress=False)
    assert [(w.where.rsplit(":", 1)[1], w.kind) for w in report.warnings] == [("1", "empty-mask")]
    assert report.counts() == {"mask-size": 1} and report.problems[0].where.endswith(":3")


def test_mask_size_problem_for_infer(tmp_path):
    img = Image.new("L", (4, 6), 255)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "m.jpg", exif=exif)
    assert oriented_size(tmp_path / "m.jpg") == (6, 4)  # as shown, from the header
    assert check_image((tmp_path / "m.jpg", True)).size == (6, 4)  # validate's decoded size agrees
    assert mask_size_problem((6, 4), (6, 4)) is None
    assert mask_size_problem((6, 4), (8, 8), "first source image") == \
        "mask is 6x4 but the first source image is 8x8; resize the mask to its image"


# -- 3. record origin ---------------------------------------------------------------------------

def test_every_reader_fills_origin(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n')
    (tmp_path / "m.json").write_text('[{"prompt": "a"}, {"prompt": "b"}]')
    (tmp_path / "m.csv").write_text('prompt,image\n"two\nlines",t.png\nb,t.png\n')
    folder = tmp_path / "ds"
    (folder / "sources").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "sources" / "k.png")
    (folder / "prompts.txt").write_text("\nk\tmake it red\n")
    assert [r.origin for r in read_manifest(tmp_path / "m.jsonl")] == [f"{tmp_path / 'm.jsonl'}:{n}" for n in (1, 3)]
    assert [r.origin for r in read_manifest(tmp_path / "m.json")] == [f"{tmp_path / 'm.json'}[{i}]" for i in (0, 1)]
    assert [r.origin for r in read_manifest(tmp_path / "m.csv")] == [f"{tmp_path / 'm.csv'}:{n}" for n in (2, 4)]
    assert [r.origin for r in read_manifest(folder)] == [f"{folder / 'prompts.txt'}:2"]
    assert read_manifest(tmp_path / "m.jsonl")[0] == EditRecord("row", "a")  # origin is not content


def test_build_names_a_failed_record_by_its_origin(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"instruction": "x", "source_image": "a.png"}\n'
                                      '{"instruction": "y", "source_image": "gone.png"}\n')
    build_dataset(read_manifest(tmp_path / "m.jsonl"), tmp_path / "out", progress=False)
    assert f"skipped {tmp_path / 'm.jsonl'}:2: " in capsys.readouterr().err


# -- 4. empty manifests ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"),
                                        ("e.csv", "prompt,image\n"), ("e.csv", "")])
def test_empty_manifest_is_refused(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    for call in (read_manifest, lambda p: validate_manifest(p, progress=False)):
        with pytest.raises(UserError, match=f"^no records in {path}; "):
            call(path)
    for args in (("data", "validate", path), ("data", "convert", path, tmp_path / "o.jsonl")):
        code, _, err = _cli(capsys, *args)
        assert code == 2 and len(err) == 1 and err[0].startswith("editkit: error: no records in")
    assert not (tmp_path / "o.jsonl").exists()


def test_empty_folder_dataset_and_empty_split(tmp_path, capsys):
    (tmp_path / "ds" / "sources").mkdir(parents=True)
    (tmp_path / "ds" / "prompts.txt").write_text("")
    with pytest.raises(UserError, match="no records in"):
        read_manifest(tmp_path / "ds")
    write_manifest([EditRecord(str(i), "x") for i in range(3)], tmp_path / "m.jsonl")
    code, out, _ = _cli(capsys, "data", "split", tmp_path / "m.jsonl", "--out", tmp_path / "s",
                        "--fractions", "train=0.9,val=0.1")
    assert code == 0 and "val: 0" in out and "note: val got no records" in out
    assert len(read_manifest(tmp_path / "s" / "train.jsonl")) == 3
    with pytest.raises(UserError, match="no records in"):
        read_manifest(tmp_path / "s" / "val.jsonl")


# -- 5. names that become paths -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "..", ".", "a/b", "a\\b", "", "x\x00y", "/abs"])
def test_plain_name_refuses_paths(name):
    with pytest.raises(UserError, match="not a plain name"):
        plain_name(name, "--fractions")


def test_split_and_mix_stay_inside_their_folders(tmp_path, capsys):
    write_manifest([EditRecord(str(i), "x") for i in range(4)], tmp_path / "m.jsonl")
    out = tmp_path / "deep" / "out"
    for extra in (["--fractions", "../evil=1"], ["--fractions", "train=1,../../x=1"], ["--ext", "/../../evil.jsonl"]):
        code, _, err = _cli(capsys, "data", "split", tmp_path / "m.jsonl", "--out", out, *extra)
        assert code == 2 and len(err) == 1, extra
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.jsonl"]
    (tmp_path / "ds").mkdir()
    code, _, err = _cli(capsys, "data", "mix", tmp_path, "--split", "../m")
    assert code == 2 and err == ["editkit: error: --split: '../m' is not a plain name (it becomes a file name inside "
                                 "the output folder); use letters, digits, '-', '_' or '.', without '/', '\\' or '..'"]


@pytest.mark.parametrize("bad_id", ["..", "../escape", "a/b"])
def test_build_refuses_ids_that_are_not_folder_names(tmp_path, bad_id):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": bad_id, "instruction": "x", "source_image": "a.png"}) + "\n")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'm.jsonl'}:1: id: .* is not a plain name"):
        build_dataset(read_manifest(tmp_path / "m.jsonl"), tmp_path / "out", progress=False)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "images").exists()


# -- 6. bad flag values and malformed lines: one line, no traceback ---------------------------------

@pytest.mark.parametrize("args, words", [
    (["data", "mix", "{d}", "--steps", "0"], "--steps must be at least 1"),
    (["data", "mix", "{d}", "--steps", "-3"], "--steps must be at least 1"),
    (["data", "mix", "{d}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["data", "mix", "{d}", "--weights", "a"], "--weights 'a'"),
    (["data", "synth", "--out", "{d}/syn", "--size", "100000"], "--size must be between 24"),
    (["data", "synth", "--out", "{d}/syn", "--n", "0"], "--n must be between 1"),
    (["data", "synth", "--out", "{d}/syn", "--workers", "0"], "--workers must be at least 1"),
    (["data", "validate", "{d}/ds/train.jsonl", "--workers", "-1"], "--workers must be at least 1"),
    (["data", "build", "{d}/ds/train.jsonl", "--out", "{d}/b", "--area", "100000000000"],
     "--area 100000000000 is more"),
    (["data", "split", "{d}/ds/train.jsonl", "--out", "{d}/s", "--seed", "-1"], "--seed must be a non-negative"),
    (["data", "convert", "{d}/bad.jsonl", "{d}/o.jsonl"], "{d}/bad.jsonl:2: invalid JSON"),
    (["data", "convert", "{d}/bad.csv", "{d}/o.jsonl"], "{d}/bad.csv:2: field 'prompt': is missing"),
    (["data", "convert", "{d}/num.jsonl", "{d}/o.jsonl"], "{d}/num.jsonl:1: field 'instruction': must be text"),
])
def test_bad_values_are_one_line(tmp_path, capsys, args, words):
    (tmp_path / "ds").mkdir()
    write_manifest([EditRecord("r", "x")], tmp_path / "ds" / "train.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n{"instruction": \n')
    (tmp_path / "bad.csv").write_text("image,edit_image\na.png,b.png\n")
    (tmp_path / "num.jsonl").write_text('{"instruction": 5, "target_image": "t.png"}\n')
    code, _, err = _cli(capsys, *[a.format(d=tmp_path) for a in args])
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("editkit: error: ") and words.format(d=tmp_path) in err[0]
    assert not (tmp_path / "syn").exists() and not (tmp_path / "o.jsonl").exists()


# -- 7. build resumes only under its fingerprint ------------------------------------------------------

def test_build_resume_trusts_only_the_fingerprint(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "blue").save(src)
    records = [EditRecord("r", "x", [src])]
    out = tmp_path / "out"
    built = read_manifest(build_dataset(records, out, progress=False))[0].sources[0]
    stamp = built.stat().st_mtime_ns
    build_dataset(records, out, progress=False)
    assert built.stat().st_mtime_ns == stamp  # same settings and data: resumed
    with pytest.raises(UserError, match=r"differs in: area.*--overwrite"):
        build_dataset(records, out, area=32 * 32, progress=False)
    Image.new("RGB", (64, 64), "red").save(src)  # the same record, new pixels
    with pytest.raises(UserError, match=r"differs in: records"):
        build_dataset(records, out, progress=False)
    build_dataset(records, out, area=32 * 32, progress=False, overwrite=True)
    assert Image.open(built).size == (32, 32) and Image.open(built).getpixel((0, 0)) == (255, 0, 0)

    (out / "fingerprint.json").unlink()  # outputs of unknown settings (an older editkit, by hand)
    with pytest.raises(UserError, match="without a fingerprint"):
        build_dataset(records, out, progress=False)
    write_manifest(records, tmp_path / "m.jsonl")
    code, _, err = _cli(capsys, "data", "build", tmp_path / "m.jsonl", "--out", out, "--overwrite", "--workers", "1")
    assert code == 0 and Image.open(built).size == (64, 64) and (out / "fingerprint.json").is_file()


def test_a_resumed_build_removes_what_a_killed_write_left(tmp_path):
    """found by bench/reliability: a build killed mid-PNG left `.tmp-*` files that no re-run removed."""
    from editkit.data import read_manifest
    from editkit.data.build import build_dataset
    from editkit.data.synth import synthesize

    paths = synthesize(tmp_path / "raw", n=3, size=32, seed=0, val_fraction=0.0, test_fraction=0.0, progress=False)
    out = tmp_path / "built"
    records = read_manifest(paths["train"])
    build_dataset(records, out, progress=False)
    stale = next((out / "images").rglob("*.png"))
    leftover = stale.parent / f".tmp-{stale.name}.abcd1234.png"
    leftover.write_bytes(b"half a png")
    stale.unlink()  # the record the kill interrupted
    build_dataset(records, out, progress=False)
    assert stale.is_file() and not list(out.rglob(".tmp-*"))
