"""`editkit infer` seeds: each record's from the base seed and its id, so resharding changes nothing."""

import json

import numpy as np
import pytest
from PIL import Image

from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.infer.dataset_run import SEED_RULE, DatasetRunConfig, cfg_folder, record_seed, run_dataset
from editkit.infer.engine import MAX_SEED, Engine
from editkit.infer.outputs import read_settings


@pytest.fixture(scope="module")
def engine():
    from editkit.models import load_model

    return Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")


@pytest.fixture()
def records(tmp_path):
    """Four records of one shape; r2 and r3 are the same edit of the same image under two ids."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        path = tmp_path / "data" / f"src{min(i, 2)}.png"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        out.append(EditRecord(id=f"r{i}", instruction=f"edit number {min(i, 2)}", sources=[path]))
    return out


def _pixels(folder, record_id):
    return np.asarray(Image.open(folder / f"{record_id}.png")).astype(int)


def test_record_seed_is_a_stable_hash_of_seed_and_id():
    assert record_seed(0, "r0") == 6393214139424515547  # the documented rule; changing it changes every run
    assert record_seed(0, "r0") != record_seed(1, "r0") != record_seed(1, "r1")
    assert all(0 <= record_seed(s, f"id-{s}") <= MAX_SEED for s in range(200))


def test_two_shards_make_the_images_of_one_process(engine, records, tmp_path, monkeypatch):
    config = DatasetRunConfig(cfgs=(4.0,), steps=2, seed=7, batch_size=2)
    run_dataset(engine, records, tmp_path / "one", config, show_progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # rank 1 first: its records are batched differently than in the single run
        monkeypatch.setenv("RANK", rank)
        run_dataset(engine, records, tmp_path / "two", config, show_progress=False)
    one, two = cfg_folder(tmp_path / "one", 4.0), cfg_folder(tmp_path / "two", 4.0)
    for record in records:
        assert np.abs(_pixels(one, record.id) - _pixels(two, record.id)).max() <= 1
        settings = read_settings(two / f"{record.id}.png")
        assert settings["seed"] == record_seed(7, record.id) and settings["base_seed"] == 7
    # the same edit under two ids gets two seeds, hence two images
    assert np.abs(_pixels(one, "r2") - _pixels(one, "r3")).mean() > 1
    manifest = json.loads((one / "run.json").read_text())
    assert manifest["config"]["seeds"] == SEED_RULE and manifest["seed"] == 7


def test_same_seed_keeps_the_old_rule_and_its_folders(engine, records, tmp_path):
    old = DatasetRunConfig(cfgs=(4.0,), steps=2, seed=7, same_seed=True)
    run_dataset(engine, records, tmp_path / "out", old, show_progress=False)
    folder = cfg_folder(tmp_path / "out", 4.0)
    assert np.abs(_pixels(folder, "r2") - _pixels(folder, "r3")).max() <= 1
    assert read_settings(folder / "r0.png")["seed"] == 7
    assert "seeds" not in old.fingerprint(4.0)  # folders made before per-record seeds resume with --same-seed
    with pytest.raises(UserError, match="other settings|--overwrite"):
        run_dataset(engine, records, tmp_path / "out", DatasetRunConfig(cfgs=(4.0,), steps=2, seed=7),
                    show_progress=False)


def test_the_cli_records_per_record_seeds_and_takes_same_seed(records, tmp_path, capsys):
    from editkit.data import write_manifest
    from tests.cli_run import run_cli

    manifest = write_manifest(records[:2], tmp_path / "m.jsonl")
    args = ["infer", "--model", "tiny", "--steps", "2", "--device", "cpu", "--data", manifest, "--seed", "5"]
    assert run_cli(capsys, *args, "--out", tmp_path / "per")[0] == 0
    assert run_cli(capsys, *args, "--out", tmp_path / "same", "--same-seed")[0] == 0
    per, same = (cfg_folder(tmp_path / name, 4.0) for name in ("per", "same"))
    assert [read_settings(per / f"{r.id}.png")["seed"] for r in records[:2]] == [record_seed(5, "r0"),
                                                                               record_seed(5, "r1")]
    assert [read_settings(same / f"{r.id}.png")["seed"] for r in records[:2]] == [5, 5]
