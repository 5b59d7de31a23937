import json

import numpy as np
import pytest
from PIL import Image

from editkit.data import read_manifest
from editkit.data.synth import TASKS, make_sample, synthesize
from editkit.errors import UserError


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synthesize(out, n=60, size=64, seed=3, progress=False)
    return out


def test_splits_and_manifest(synth_dir):
    splits = {name: read_manifest(synth_dir / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [48, 6, 6]
    ids = [r.id for rs in splits.values() for r in rs]
    assert len(set(ids)) == 60
    record = splits["train"][0]
    assert record.task in TASKS
    assert record.instruction_cn and record.inverse_instruction and record.inverse_instruction_cn
    assert {"shape", "color"} <= set(record.metadata)
    assert (synth_dir / "preview.png").is_file() and json.loads((synth_dir / "synth.json").read_text())["seed"] == 3


def test_targets_differ_from_sources_exactly_inside_mask(synth_dir):
    for record in read_manifest(synth_dir / "train.jsonl"):
        src = np.asarray(Image.open(record.sources[0]).convert("RGB")).astype(int)
        tgt = np.asarray(Image.open(record.target).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(record.mask))
        assert set(np.unique(mask)) <= {0, 255}
        changed = np.any(src != tgt, axis=-1)
        assert changed.any(), record.id
        assert np.array_equal(changed, mask == 255), record.id


def test_every_task_appears_with_distinct_instructions():
    samples = [make_sample(0, i, 32) for i in range(80)]
    assert {s["task"] for s in samples} == set(TASKS)
    for s in samples:
        en, cn, inv_en, inv_cn = s["text"]
        assert en != inv_en and cn != inv_cn
        assert s["mask"].sum() >= 9  # shapes stay visible at 32 px


def test_recolor_changes_only_the_named_shape():
    for i in range(40):
        s = make_sample(1, i, 64)
        if s["task"] == "recolor":
            changed = s["target"][s["mask"]]
            assert len({tuple(p) for p in changed}) == 1  # one new flat colour
            return
    pytest.fail("no recolor sample")


def test_deterministic_and_parallel_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, n=12, size=32, seed=7, progress=False)
    synthesize(b, n=12, size=32, seed=7, workers=2, progress=False)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    for png in (a / "images").iterdir():
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(b / "images" / png.name)))
    assert make_sample(7, 0, 64)["text"] != make_sample(8, 0, 64)["text"] or \
        not np.array_equal(make_sample(7, 0, 64)["source"], make_sample(8, 0, 64)["source"])


def test_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a synthetic dataset folder"):
        synthesize(tmp_path, n=2, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    with pytest.raises(UserError):
        synthesize(tmp_path / "x", n=2, size=8, progress=False)
