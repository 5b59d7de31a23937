"""Benchmark readers: small copies of GEdit-Bench, ImgEdit, MagicBrush and PIE-Bench written in their own
layouts, converted with `editkit data convert --from NAME`, checked field by field, then validated."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from editkit.data import read_manifest
from editkit.data.benchmarks import BENCHMARKS, assets_dir_for, decode_pie_mask, read_benchmark
from editkit.errors import UserError
from tests.cli_run import run_cli


def _png(path, colour, size=(8, 6), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _png_bytes(colour, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _mask(path):
    return np.asarray(Image.open(path).convert("L")) > 127


def _convert_and_validate(capsys, name, source, out):
    code, stdout, stderr = run_cli(capsys, "data", "convert", source, out, "--from", name)
    assert code == 0, stderr
    assert f"wrote 3 {name} records to {out}" in stdout
    code, stdout, stderr = run_cli(capsys, "data", "validate", out, "--workers", "1")
    assert code == 0, stdout + stderr
    assert "3 records, no problems" in stdout
    return {r.id: r for r in read_manifest(out)}


# ---------------------------------------------------------------- GEdit-Bench

@pytest.fixture
def gedit(tmp_path):
    root = tmp_path / "GEdit-Bench"
    _png(root / "img" / "a.png", "red")
    rows = [
        {"key": "k1", "task_type": "background_change", "instruction": "make the sky purple",
         "instruction_language": "en", "input_image": "img/a.png", "intersection_exist": True},
        {"key": "k1", "task_type": "background_change", "instruction": "把天空变成紫色",
         "instruction_language": "cn", "input_image": {"bytes": base64.b64encode(_png_bytes("blue")).decode(),
                                                       "path": None}, "intersection_exist": False},
        {"key": "k2", "task_type": "subject-remove", "instruction": "remove the <b>cat</b>",
         "instruction_language": "en", "input_image": {"bytes": None, "path": "img/a.png"}},
    ]
    (root / "gedit.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    (root / "dataset_info.json").write_text("{}")  # `datasets` bookkeeping beside the data is ignored
    return root


def test_gedit_rows_become_records_per_language(capsys, gedit, tmp_path):
    out = tmp_path / "out" / "gedit.jsonl"
    records = _convert_and_validate(capsys, "gedit", gedit, out)
    assert sorted(records) == ["k1_cn", "k1_en", "k2_en"]
    en, cn = records["k1_en"], records["k1_cn"]
    assert en.instruction == "make the sky purple" and cn.instruction == "把天空变成紫色"
    assert en.task == cn.task == "background_change" and records["k2_en"].task == "subject-remove"
    assert en.metadata["instruction_language"] == "en" and en.metadata["intersection_exist"] is True
    assert en.sources == [(gedit / "img" / "a.png").resolve()]
    # embedded bytes are written out unchanged, beside the manifest
    assert cn.sources[0].parent == (assets_dir_for(out) / "images").resolve()
    assert cn.sources[0].read_bytes() == _png_bytes("blue")
    assert en.target is None and en.mask is None


def test_gedit_lang_keeps_one_language(gedit, tmp_path):
    records = read_benchmark("gedit", gedit, tmp_path / "files", languages=["cn"])
    assert [r.id for r in records] == ["k1_cn"]
    with pytest.raises(UserError, match="GEdit-Bench's languages are en, cn"):
        read_benchmark("gedit", gedit, tmp_path / "files", languages=["fr"])


def test_gedit_row_without_a_field_is_one_line(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"key": "k", "instruction": "x"}) + "\n")
    with pytest.raises(UserError, match=r"g.jsonl\[0\]: missing field\(s\) task_type, instruction_language, "
                                        "input_image"):
        read_benchmark("gedit", tmp_path / "g.jsonl", tmp_path / "files")


def test_gedit_parquet_needs_pyarrow_or_reads(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "train-00000.parquet").write_bytes(b"PAR1")
        with pytest.raises(UserError, match="needs pyarrow"):
            read_benchmark("gedit", tmp_path, tmp_path / "files")
        return
    import pyarrow.parquet

    table = pyarrow.table({"key": ["k"], "task_type": ["color_alter"], "instruction": ["make it red"],
                           "instruction_language": ["en"],
                           "input_image": [{"bytes": _png_bytes("green"), "path": None}]})
    pyarrow.parquet.write_table(table, tmp_path / "train-00000.parquet")
    (record,) = read_benchmark("gedit", tmp_path, tmp_path / "files")
    assert record.id == "k_en" and record.sources[0].read_bytes() == _png_bytes("green")


# ---------------------------------------------------------------- ImgEdit

@pytest.fixture
def imgedit(tmp_path):
    root = tmp_path / "ImgEdit"
    for name, colour in (("animal/1.jpg", "red"), ("style/2.jpg", "green"), ("human/3.jpg", "blue")):
        _png(root / "Benchmark" / "singleturn" / name, colour)
    edits = {"1": {"id": "animal/1.jpg", "prompt": "Add a hat to the dog.", "edit_type": "add"},
             "2": {"id": "style/2.jpg", "prompt": "Turn it into a watercolour.", "edit_type": "style"},
             "3": {"id": "human/3.jpg", "prompt": "Remove the man's glasses.", "edit_type": "remove"}}
    (root / "basic_edit.json").write_text(json.dumps(edits))
    return root


def test_imgedit_entries_keep_their_edit_type(capsys, imgedit, tmp_path):
    records = _convert_and_validate(capsys, "imgedit", imgedit, tmp_path / "imgedit.jsonl")
    assert {k: (r.task, r.instruction) for k, r in records.items()} == {
        "1": ("add", "Add a hat to the dog."), "2": ("style", "Turn it into a watercolour."),
        "3": ("remove", "Remove the man's glasses.")}
    assert records["2"].sources == [(imgedit / "Benchmark" / "singleturn" / "style" / "2.jpg").resolve()]
    assert records["2"].metadata["image_id"] == "style/2.jpg"


def test_imgedit_missing_image_names_the_entry(imgedit, tmp_path):
    (imgedit / "Benchmark" / "singleturn" / "style" / "2.jpg").unlink()
    with pytest.raises(UserError, match=r"basic_edit.json\['2'\]: image style/2.jpg not found"):
        read_benchmark("imgedit", imgedit / "basic_edit.json", tmp_path / "files")


# ---------------------------------------------------------------- MagicBrush

@pytest.fixture
def magicbrush(tmp_path):
    root = tmp_path / "MagicBrush"
    test = root / "test"
    images = test / "images"
    # session 101: two turns; the masks are the input with a transparent hole (DALL-E 2's convention)
    for name, colour in (("101-input.png", "red"), ("101-output1.png", "green"), ("101-output2.png", "blue")):
        _png(images / "101" / name, colour)
    for turn, box in ((1, (1, 1, 4, 3)), (2, (5, 2, 8, 6))):
        hole = Image.new("RGBA", (8, 6), (200, 10, 10, 255))
        hole.paste((0, 0, 0, 0), box)
        hole.save(images / "101" / f"101-mask{turn}.png")
    # session 202: one turn, its mask a plain white-on-black PNG
    _png(images / "202" / "202-input.png", "white")
    _png(images / "202" / "202-output1.png", "black")
    plain = Image.new("L", (8, 6), 0)
    plain.paste(255, (0, 0, 2, 6))
    plain.save(images / "202" / "202-mask1.png")
    sessions = {
        "101": [{"input": "101-input.png", "mask": "101-mask1.png", "output": "101-output1.png",
                 "instruction": "put a hat on him"},
                {"input": "101-output1.png", "mask": "101-mask2.png", "output": "101-output2.png",
                 "instruction": "make the sky blue"}],
        "202": [{"input": "202-input.png", "mask": "202-mask1.png", "output": "202-output1.png",
                 "instruction": "paint the wall black"}],
    }
    (test / "edit_sessions.json").write_text(json.dumps(sessions))
    (test / "global_descriptions.json").write_text(json.dumps({
        "101": {"101-input.png": "a man", "101-output1.png": "a man with a hat, globally"}}))
    (test / "local_descriptions.json").write_text(json.dumps({"101": {"101-output1.png": "a hat"}}))
    return root


def test_magicbrush_turns_masks_and_captions(capsys, magicbrush, tmp_path):
    records = _convert_and_validate(capsys, "magicbrush", magicbrush, tmp_path / "mb.jsonl")
    assert sorted(records) == ["101_1", "101_2", "202_1"]
    first, second = records["101_1"], records["101_2"]
    images = (magicbrush / "test" / "images").resolve()
    assert first.sources == [images / "101" / "101-input.png"] and first.target == images / "101" / "101-output1.png"
    # the second turn edits the first turn's ground truth
    assert second.sources == [images / "101" / "101-output1.png"]
    assert (first.task, second.task, records["202_1"].task) == ("turn-1", "turn-2", "turn-1")
    assert second.instruction == "make the sky blue"
    assert first.metadata["target_caption"] == "a hat"  # the local description, as MagicBrush's CLIP-T
    assert first.metadata["global_description"] == "a man with a hat, globally"
    assert first.metadata["source_caption"] == "a man"
    assert "target_caption" not in second.metadata
    # transparent hole -> white edit region; a plain mask keeps the editkit rule
    expected = np.zeros((6, 8), bool)
    expected[1:3, 1:4] = True
    assert (_mask(first.mask) == expected).all()
    expected = np.zeros((6, 8), bool)
    expected[2:6, 5:8] = True
    assert (_mask(second.mask) == expected).all()
    expected = np.zeros((6, 8), bool)
    expected[:, :2] = True
    assert (_mask(records["202_1"].mask) == expected).all()


# ---------------------------------------------------------------- PIE-Bench

def test_pie_rle_decodes_by_hand():
    # 6 wide, 5 high: runs at flat index 7..8 (row 1, columns 1-2) and 20 (row 3, column 2); the border is set
    mask = decode_pie_mask([7, 2, 20, 1], width=6, height=5)
    expected = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 1],
                         [1, 0, 0, 0, 0, 1],
                         [1, 0, 1, 0, 0, 1],
                         [1, 1, 1, 1, 1, 1]], bool)
    assert (mask == expected).all()
    # a run past the end is clipped, as PIE-Bench's mask_decode does
    assert decode_pie_mask([28, 100], width=6, height=5)[4].all()
    with pytest.raises(UserError, match="run-length list"):
        decode_pie_mask([7, 2, 20], width=6, height=5)


@pytest.fixture
def piebench(tmp_path):
    root = tmp_path / "PIE-Bench"
    mapping = {}
    for i, (folder, type_id) in enumerate((("0_random_140", "0"), ("1_change_object_80/1_artificial", "1"),
                                           ("9_change_style_80/2_natural", "9"))):
        relative = f"{folder}/00000000000{i}.jpg"
        path = root / "annotation_images" / relative
        path.parent.mkdir(parents=True)
        Image.new("RGB", (6, 5), (40 * i, 80, 120)).save(path, quality=95)
        mapping[f"00000000000{i}"] = {
            "image_path": relative, "original_prompt": f"a [cat] sitting {i}", "editing_prompt": f"a [dog] sitting {i}",
            "editing_instruction": f"Change the cat to a dog {i}", "editing_type_id": type_id,
            "blended_word": "cat dog", "mask": [7, 2, 20, 1] if i == 0 else [],
        }
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def test_piebench_entries_masks_and_protocol_fields(capsys, piebench, tmp_path):
    records = _convert_and_validate(capsys, "piebench", piebench, tmp_path / "pie.jsonl")
    first = records["000000000000"]
    assert first.instruction == "Change the cat to a dog 0"
    assert [records[k].task for k in sorted(records)] == ["random", "change_object", "change_style"]
    source = (piebench / "annotation_images" / "0_random_140" / "000000000000.jpg").resolve()
    assert first.sources == [source] and first.target == source and first.metadata["target_is_source"] is True
    assert first.metadata["target_caption"] == "a dog sitting 0"  # brackets removed, for CLIP-T
    assert first.metadata["original_prompt"] == "a cat sitting 0"
    assert (_mask(first.mask) == decode_pie_mask([7, 2, 20, 1], 6, 5)).all()
    border_only = _mask(records["000000000001"].mask)
    assert border_only[0].all() and not border_only[1:-1, 1:-1].any()


def test_piebench_bad_mask_names_the_entry(piebench, tmp_path):
    mapping = json.loads((piebench / "mapping_file.json").read_text())
    mapping["000000000001"]["mask"] = "0 262144"
    (piebench / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(UserError, match=r"mapping_file.json\['000000000001'\]: field 'mask': expected a run-length"):
        read_benchmark("piebench", piebench, tmp_path / "files")


def test_piebench_background_columns_of_eval_are_the_protocols(tmp_path):
    """With the source as target, `editkit eval`'s `_out` columns score the background only: an edit that
    changes nothing outside the mask has zero background error, whatever it does inside."""
    from editkit.eval.runner import evaluate

    root = tmp_path / "PIE-Bench"
    (root / "annotation_images" / "0_random_140").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
        root / "annotation_images" / "0_random_140" / "a.png")
    rle = [v for row in range(8, 16) for v in (row * 24 + 8, 8)]  # rows 8-15, columns 8-15
    (root / "mapping_file.json").write_text(json.dumps({"a": {
        "image_path": "0_random_140/a.png", "original_prompt": "a", "editing_prompt": "b",
        "editing_instruction": "change it", "editing_type_id": "0", "mask": rle}}))
    (record,) = read_benchmark("piebench", root, tmp_path / "files")
    edited = np.asarray(Image.open(record.sources[0]).convert("RGB")).copy()
    edited[8:16, 8:16] = 255 - edited[8:16, 8:16]
    (tmp_path / "pred").mkdir()
    Image.fromarray(edited).save(tmp_path / "pred" / "a.png")
    summary = evaluate([tmp_path / "pred"], [record], tmp_path / "eval", ["pixel"], show_progress=False)
    means = summary["runs"]["pred"]["means"]
    assert means["mse_out"] == 0 and means["psnr_out"] == 100  # 100 dB: the cap for identical pixels
    assert means["mse_in"] > 0.05


# ---------------------------------------------------------------- the command

def test_convert_to_a_folder_dataset_holds_the_masks(capsys, piebench, tmp_path):
    out = tmp_path / "pie_folder"
    code, _, stderr = run_cli(capsys, "data", "convert", piebench, out, "--from", "piebench")
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"00000000000{i}.png" for i in range(3)]
    assert not list(tmp_path.glob(".tmp-*"))  # the scratch folder is gone
    code, stdout, _ = run_cli(capsys, "data", "validate", out, "--workers", "1")
    assert code == 0 and "3 records, no problems" in stdout


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_wrong_folder_is_one_line_exit_2(capsys, tmp_path, name):
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = run_cli(capsys, "data", "convert", tmp_path / "empty", tmp_path / "o.jsonl", "--from", name)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert stderr.startswith("editkit: error: ") and str(tmp_path / "empty") in stderr


def test_convert_flag_mistakes_are_one_line(capsys, imgedit, tmp_path):
    code, _, stderr = run_cli(capsys, "data", "convert", imgedit, tmp_path / "o.jsonl", "--from", "emu")
    assert code == 2 and "unknown benchmark; use one of gedit, imgedit, magicbrush, piebench" in stderr
    code, _, stderr = run_cli(capsys, "data", "convert", imgedit, tmp_path / "o.jsonl", "--from", "imgedit",
                              "--lang", "en")
    assert code == 2 and "--lang applies to --from gedit only" in stderr
    code, _, stderr = run_cli(capsys, "data", "convert", imgedit, tmp_path / "o.jsonl", "--from", "imgedit",
                              "--format", "pairs")
    assert code == 2 and "--from reads the benchmark's own layout" in stderr
