"""Manifest field aliases (`back_mask` in a pairs file, `mask` in a DiffSynth one) and the warning
line for near-miss field names."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from editkit.data import read_manifest
from editkit.data.validate import validate_manifest
from editkit.errors import UserError
from editkit.eval.runner import evaluate
from tests.eval_fixtures import make_dataset, make_predictions


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs_with_back_mask(tmp_path):
    """The eval fixture's records, written as a pairs JSONL whose mask field is called back_mask."""
    _, records = make_dataset(tmp_path / "data", n=3)
    rows = [{"id": r.id, "instruction": r.instruction, "source_image": str(r.sources[0]),
             "target_image": str(r.target), "back_mask": str(r.mask)} for r in records]
    return _write_jsonl(tmp_path / "data" / "pairs.jsonl", rows), records


def test_back_mask_in_a_pairs_file_is_the_mask_and_masked_metrics_see_it(pairs_with_back_mask, tmp_path):
    manifest, expected = pairs_with_back_mask
    records = read_manifest(manifest)
    assert [r.mask for r in records] == [r.mask for r in expected]
    assert all("back_mask" not in r.metadata for r in records)
    make_predictions(tmp_path / "runs" / "a", records, noise=0.05)
    summary = evaluate([tmp_path / "runs" / "a"], records, tmp_path / "out", ["pixel"], show_progress=False)
    means = summary["runs"]["a"]["means"]
    assert math.isfinite(means["psnr_in"]) and math.isfinite(means["psnr_out"])  # NaN without a mask


def test_mask_in_a_diffsynth_file_is_the_mask(tmp_path):
    _, records = make_dataset(tmp_path / "data", n=2)
    rows = [{"prompt": r.instruction, "edit_image": str(r.sources[0]), "image": str(r.target), "mask": str(r.mask)}
            for r in records]
    manifest = tmp_path / "data" / "ds.json"
    manifest.write_text(json.dumps(rows))
    read = read_manifest(manifest)
    assert [r.mask for r in read] == [r.mask for r in records] and all(not r.metadata for r in read)


def test_validation_checks_a_back_mask_of_the_wrong_size(pairs_with_back_mask, tmp_path):
    manifest, records = pairs_with_back_mask
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(records[1].mask)
    report = validate_manifest(manifest, progress=False)
    assert report.counts()["mask-size"] == 1
    assert "mask is 12x10" in "\n".join(report.lines())


def test_two_different_masks_in_one_row_are_refused(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"instruction": "x", "source_image": "a.png",
                                                    "mask": "m1.png", "back_mask": "m2.png"}])
    with pytest.raises(UserError, match=r"m.jsonl:1: field 'back_mask'.*'mask'.*keep one"):
        read_manifest(manifest)
    same = _write_jsonl(tmp_path / "same.jsonl", [{"instruction": "x", "source_image": "a.png",
                                                   "mask": "m1.png", "back_mask": "m1.png"}])
    assert read_manifest(same)[0].mask == tmp_path / "m1.png"


def test_a_field_override_names_the_one_mask_column(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"instruction": "x", "source_image": "a.png",
                                                    "region": "r.png", "back_mask": "m2.png"}])
    record = read_manifest(manifest, fields={"mask": "region"})[0]
    assert record.mask == tmp_path / "r.png" and record.metadata == {"back_mask": "m2.png"}


def test_near_miss_fields_warn_once_per_field_and_file(tmp_path, capsys):
    rows = [{"instrution": "make it red", "source_image": f"s{i}.png", "target": f"t{i}.png",
             "edit_images": "e.png", "source": "laion", "score": 0.9} for i in range(3)]
    manifest = _write_jsonl(tmp_path / "typos.jsonl", rows[:1] + [{**r, "instruction": "ok"} for r in rows[1:]])
    with pytest.raises(UserError, match="'instruction': is missing"):  # row 1 has no instruction at all
        read_manifest(manifest)
    with pytest.raises(UserError):
        read_manifest(manifest)  # read again: no second warning
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("editkit: warning:")]
    assert len(lines) == 2, err
    assert any("typos.jsonl:1: field 'instrution'" in line and "did you mean 'instruction'?" in line
               for line in lines)
    assert any("field 'target'" in line and "did you mean 'target_image'?" in line for line in lines)
    assert "edit_images" not in err and "'source'" not in err and "score" not in err  # extra metadata: quiet


def test_near_miss_in_a_diffsynth_file_names_its_own_field(tmp_path, capsys):
    rows = [{"prompt": "x", "edit_images": ["a.png", "b.png"], "image": "t.png"}]
    manifest = _write_jsonl(tmp_path / "ds.jsonl", rows)
    record = read_manifest(manifest, format="diffsynth")[0]
    assert record.sources == [] and record.metadata == {"edit_images": ["a.png", "b.png"]}
    assert "field 'edit_images' is not a diffsynth manifest field (kept as metadata); did you mean 'edit_image'?" \
        in capsys.readouterr().err


def test_metadata_that_resembles_a_field_stays_quiet_when_the_field_is_there(tmp_path, capsys):
    rows = [{"instruction": "x", "instructions": "long form", "source_image": "a.png", "target_image": "t.png",
             "target": "a cat"}]
    read_manifest(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert "warning" not in capsys.readouterr().err
