"""The LayerD layer-decomposition metric (editkit.eval.layerd) on hand-computed cases, and
`editkit eval --task layers` end to end on a tiny prepared synthetic set."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from cli_run import run_cli

from editkit.eval.layerd import MAX_MERGES, dtw_path, group_layers, layerd_scores, sample_columns

RED, BLUE = (1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0)


def layer(shape: tuple[int, int], where: np.ndarray | None, colour) -> np.ndarray:
    """An RGBA float layer: `colour` where `where` is True (everywhere when None), transparent black elsewhere."""
    out = np.zeros((*shape, 4), np.float32)
    out[(slice(None),) * 2 if where is None else where] = colour
    return out


@pytest.fixture
def scene():
    """4x4 canvas: an opaque red background and a blue block S (rows 1-2, 8 of the 16 pixels), and S's
    left and right halves (4 pixels each) as two layers of their own."""
    shape = (4, 4)
    block = np.zeros(shape, bool)
    block[1:3, :] = True
    left = block.copy()
    left[:, 2:] = False
    return {"red": layer(shape, None, RED), "blue": layer(shape, block, BLUE),
            "left": layer(shape, left, BLUE), "right": layer(shape, block & ~left, BLUE)}


def test_identical_layers_are_perfect_at_every_merge_count():
    from editkit.layers.synth import make_scene

    gt = make_scene(0, 3, size=40)["layers"]
    row = sample_columns(layerd_scores([g.copy() for g in gt], gt))
    for k in range(MAX_MERGES + 1):
        assert row[f"rgb_l1_m{k}"] == pytest.approx(0.0, abs=1e-9)
        assert row[f"alpha_iou_m{k}"] == pytest.approx(1.0)
    assert row["merges"] == 0


def test_a_split_layer_is_perfect_after_one_merge(scene):
    """Prediction [red, left, right] vs truth [red, blue], without grouping. By hand: the path is
    red-red (cost 0), left-blue and right-blue (each: RGB L1 = 4 of 8 blue pixels off by 1/3 → 1/6,
    IoU 4/8 → cost 1/3). Means: RGB L1 (0 + 1/6 + 1/6) / 3 = 1/9, IoU (1 + 1/2 + 1/2) / 3 = 2/3.
    Merging left+right gives blue back (gain 2/3; merging red+left gains nothing), then all is exact."""
    s = scene
    results = layerd_scores([s["red"], s["left"], s["right"]], [s["red"], s["blue"]], group=False)
    assert [r["merges"] for r in results] == [0, 1]  # a 2-layer side is never merged: it stops there
    assert results[0]["rgb_l1"] == pytest.approx(1 / 9)
    assert results[0]["alpha_iou"] == pytest.approx(2 / 3)
    assert results[0]["cost"] == pytest.approx((1 / 9 + 1 - 2 / 3) / 2)
    assert results[1]["pred_layers"] == 2
    row = sample_columns(results)
    assert row["merges"] == 1
    for k in range(1, MAX_MERGES + 1):  # carried forward from the last merge it took
        assert row[f"rgb_l1_m{k}"] == pytest.approx(0.0, abs=1e-9)
        assert row[f"alpha_iou_m{k}"] == pytest.approx(1.0)


def test_grouping_joins_layers_that_do_not_overlap(scene):
    """LayerD's protocol first composites non-overlapping layers into one: the split halves are one layer."""
    s = scene
    results = layerd_scores([s["red"], s["left"], s["right"]], [s["red"], s["blue"]])
    assert results[0]["rgb_l1"] == pytest.approx(0.0, abs=1e-9)
    assert results[0]["alpha_iou"] == pytest.approx(1.0)
    assert group_layers([s["red"][..., 3], s["left"][..., 3], s["right"][..., 3]]) == [[0], [1, 2]]


def test_a_missing_layer_is_found_by_merging_the_ground_truth(scene):
    """Prediction [red, blue] vs truth [red, left, right]: path red-red, blue-left, blue-right; RGB L1 0
    (blue is right wherever the truth shows), IoU (1 + 1/2 + 1/2) / 3; merging the truth's halves fixes it."""
    s = scene
    results = layerd_scores([s["red"], s["blue"]], [s["red"], s["left"], s["right"]], group=False)
    assert results[0]["rgb_l1"] == pytest.approx(0.0, abs=1e-9)
    assert results[0]["alpha_iou"] == pytest.approx(2 / 3)
    assert results[1]["gt_layers"] == 2 and results[1]["alpha_iou"] == pytest.approx(1.0)


def test_order_matters_reversed_layers_score_worse(scene):
    """[blue, red] vs [red, blue]: DTW keeps the order, so it pairs blue-red and red-blue. By hand:
    blue vs red: L1 (8·2/3 + 8·1/3) / 16 = 1/2, IoU 8/16; red vs blue: L1 2/3, IoU 8/16.
    Means 7/12 and 1/2; no merge is possible (two layers a side)."""
    s = scene
    results = layerd_scores([s["blue"], s["red"]], [s["red"], s["blue"]])
    assert len(results) == 1
    assert results[0]["rgb_l1"] == pytest.approx(7 / 12)
    assert results[0]["alpha_iou"] == pytest.approx(0.5)
    same = layerd_scores([s["red"], s["blue"]], [s["red"], s["blue"]])[0]
    assert same["rgb_l1"] < results[0]["rgb_l1"] and same["alpha_iou"] > results[0]["alpha_iou"]


def test_an_empty_prediction_is_one_transparent_layer(scene):
    """Transparent black vs red: L1 1/3 everywhere, IoU 0; vs blue: L1 1/3 on the block, IoU 0."""
    s = scene
    row = sample_columns(layerd_scores([], [s["red"], s["blue"]]))
    assert row["rgb_l1_m0"] == pytest.approx(1 / 3) and row["rgb_l1_m5"] == pytest.approx(1 / 3)
    assert row["alpha_iou_m0"] == 0.0 and row["alpha_iou_m5"] == 0.0


def test_merges_stop_at_the_limit():
    """The blue block cut into 8 one-column strips needs 7 merges. At 0: each strip vs blue has L1
    28/32 · 1/3 and IoU 4/32, so the means over the 9 pairs are 8·(7/24)/9 and (1 + 8/8)/9."""
    shape = (8, 8)
    block = np.zeros(shape, bool)
    block[2:6, :] = True
    strips = []
    for c in range(8):
        where = block.copy()
        where[:, np.arange(8) != c] = False
        strips.append(layer(shape, where, BLUE))
    pred, gt = [layer(shape, None, RED), *strips], [layer(shape, None, RED), layer(shape, block, BLUE)]
    capped = layerd_scores(pred, gt, group=False)
    assert len(capped) == MAX_MERGES + 1
    assert capped[0]["rgb_l1"] == pytest.approx(8 * (7 / 24) / 9)
    assert capped[0]["alpha_iou"] == pytest.approx(2 / 9)
    assert 2 / 9 < capped[-1]["alpha_iou"] < 1.0
    full = layerd_scores(pred, gt, max_merges=7, group=False)
    assert full[-1]["merges"] == 7 and full[-1]["alpha_iou"] == pytest.approx(1.0)


def test_dtw_ties_prefer_the_diagonal():
    assert dtw_path(np.zeros((2, 3))) == [(0, 0), (0, 1), (1, 2)]
    assert dtw_path(np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])) == [(0, 0), (1, 0), (2, 1)]


def test_layers_of_another_size_are_refused(scene):
    with pytest.raises(ValueError, match="resize"):
        layerd_scores([np.zeros((2, 2, 4), np.float32)], [scene["red"]])


# --- editkit eval --task layers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from editkit.layers.prep import prepare_layers
    from editkit.layers.records import read_prepared
    from editkit.layers.synth import synthesize_layers

    root = tmp_path_factory.mktemp("layers")
    scenes = synthesize_layers(root / "scenes", n=3, size=48, seed=2, workers=1, progress=False)
    prepare_layers(scenes, root / "prep", train_count=3, val_count=0, max_side=32, progress=False)
    return root / "prep", read_prepared(root / "prep")


def write_predictions(folder, prep, samples, order=1, skip=()):
    """Each sample's ground-truth components as <id>/layer_NN.png (order=-1: reversed)."""
    for sample in samples:
        if sample.id in skip:
            continue
        (folder / sample.id).mkdir(parents=True)
        for k, rel in enumerate(sample.layers[::order]):
            shutil.copy(prep / rel, folder / sample.id / f"layer_{k:02d}.png")
    return folder


def eval_layers(capsys, pred, data, out, *more):
    return run_cli(capsys, "eval", "--task", "layers", "--pred", pred, "--data", data, "--out", out, *more)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_layers_end_to_end_and_compare(prepared, tmp_path, capsys):
    prep, samples = prepared
    good = write_predictions(tmp_path / "good", prep, samples)
    code, out, err = eval_layers(capsys, good, prep, tmp_path / "e1")
    assert code == 0, err
    assert "published" in out and "3/3 evaluated" in out
    rows = read_rows(tmp_path / "e1" / "per_sample.csv")
    assert [r["id"] for r in rows] == [s.id for s in samples]
    for r in rows:
        assert float(r["rgb_l1_m0"]) == pytest.approx(0.0, abs=1e-9) and float(r["alpha_iou_m5"]) == pytest.approx(1.0)
        assert (tmp_path / "e1" / "composites" / "good").is_dir() and r["pred"].endswith(".png")
    summary = json.loads((tmp_path / "e1" / "summary.json").read_text())
    table = summary["runs"]["good"]["by_merges"]
    assert [e["merges"] for e in table] == list(range(MAX_MERGES + 1))
    assert table[0]["alpha_iou"]["mean"] == pytest.approx(1.0) and table[0]["alpha_iou"]["n"] == 3

    code, out, err = eval_layers(capsys, good, prep / "metadata" / "manifest.json", tmp_path / "e1")
    assert code == 0, err
    assert "computed 0 new" in out  # resumed from the cache

    bad = write_predictions(tmp_path / "bad", prep, samples, order=-1, skip=(samples[0].id,))
    code, out, err = eval_layers(capsys, bad, prep, tmp_path / "e2")
    assert code == 0, err
    summary2 = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert summary2["runs"]["bad"]["n_missing"] == 1 and summary2["runs"]["bad"]["missing"] == [samples[0].id]
    assert summary2["runs"]["bad"]["by_merges"][0]["alpha_iou"]["mean"] < 1.0

    code, out, err = run_cli(capsys, "compare", tmp_path / "e1", tmp_path / "e2", "--out", tmp_path / "cmp",
                             "--n-boot", 200)
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["runs"] == ["good", "bad"] and "alpha_iou_m0" in result["metrics"]
    diff = result["results"]["bad"]["metrics"]["alpha_iou_m0"]["all"]
    assert diff["diff_mean"] < 0 and diff["diff_n"] == 2
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_eval_layers_recomputes_a_changed_prediction(prepared, tmp_path, capsys):
    prep, samples = prepared
    pred = write_predictions(tmp_path / "p", prep, samples)
    assert eval_layers(capsys, pred, prep, tmp_path / "e")[0] == 0
    changed = pred / samples[1].id
    (changed / "layer_00.png").unlink()  # the background is gone: that sample must be scored again
    code, out, err = eval_layers(capsys, pred, prep, tmp_path / "e")
    assert code == 0, err
    assert "computed 1 new" in out
    rows = {r["id"]: r for r in read_rows(tmp_path / "e" / "per_sample.csv")}
    assert float(rows[samples[1].id]["alpha_iou_m0"]) < 1.0 and float(rows[samples[0].id]["alpha_iou_m0"]) == 1.0


@pytest.mark.parametrize("case", ["no-pred-dir", "not-prepared", "edit-options", "unknown-task", "edit-folder"])
def test_eval_layers_bad_input_is_one_line(prepared, tmp_path, capsys, case):
    from editkit.utils.fingerprint import claim_folder

    prep, samples = prepared
    pred = write_predictions(tmp_path / "p", prep, samples)
    args = ["eval", "--task", "layers", "--pred", pred, "--data", prep, "--out", tmp_path / "e"]
    if case == "no-pred-dir":
        args[4] = tmp_path / "nowhere"
    elif case == "not-prepared":
        args[6] = tmp_path
    elif case == "edit-options":
        args += ["--metrics", "pixel"]
    elif case == "unknown-task":
        args[2] = "layer"
    else:  # a folder holding an edit evaluation is not mixed with layer results
        claim_folder(tmp_path / "e", "eval", {"resize_policy": "x", "weights": {}})
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
