"""Dataset runs: one folder per CFG, <id>.png, sharding, and a run killed midway that resumes."""

import json

import numpy as np
import pytest
from PIL import Image

from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.infer.dataset_run import DatasetRunConfig, cfg_folder, output_path, parse_cfgs, run_dataset
from editkit.infer.engine import Engine
from editkit.infer.outputs import read_settings


@pytest.fixture(scope="module")
def engine():
    from editkit.models import load_model

    return Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")


@pytest.fixture()
def records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate([(64, 64), (128, 32), (64, 64)]):
        path = tmp_path / "data" / f"src{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        mask = tmp_path / "data" / f"mask{i}.png"
        Image.new("L", size, 255).save(mask)
        out.append(EditRecord(id=f"r{i}", instruction=f"edit number {i}", sources=[path], mask=mask))
    return out


CONFIG = DatasetRunConfig(cfgs=(2.5, 4.0), steps=2, batch_size=2)


class Killed(Exception):
    pass


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(engine, records, tmp_path):
    full = run_dataset(engine, records, tmp_path / "full", CONFIG, show_progress=False)
    assert len(full.written) == 6 and full.skipped == 0
    for cfg in CONFIG.cfgs:
        folder = cfg_folder(tmp_path / "full", cfg)
        assert sorted(p.name for p in folder.glob("*.png")) == ["r0.png", "r1.png", "r2.png"]
        manifest = json.loads((folder / "run.json").read_text())
        assert manifest["job"] == "infer" and manifest["config"]["true_cfg_scale"] == cfg
    assert (tmp_path / "full" / "cfg-2.5").is_dir() and (tmp_path / "full" / "cfg-4.0").is_dir()
    settings = read_settings(tmp_path / "full" / "cfg-4.0" / "r1.png")
    assert settings["id"] == "r1" and settings["true_cfg_scale"] == 4.0 and settings["prompt"] == "edit number 1"

    saved = []

    def kill_after_two(path):
        saved.append(path)
        if len(saved) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_dataset(engine, records, tmp_path / "resumed", CONFIG, show_progress=False, on_saved=kill_after_two)
    assert len(list((tmp_path / "resumed").rglob("*.png"))) == 2
    assert not list((tmp_path / "resumed").rglob(".tmp-*"))
    again = run_dataset(engine, records, tmp_path / "resumed", CONFIG, show_progress=False)
    assert again.skipped == 2 and len(again.written) == 4
    assert not set(again.written) & set(saved)
    for cfg in CONFIG.cfgs:
        for record in records:
            a = _pixels(output_path(cfg_folder(tmp_path / "full", cfg), record.id))
            b = _pixels(output_path(cfg_folder(tmp_path / "resumed", cfg), record.id))
            assert np.abs(a - b).max() <= 1


def test_ranks_split_the_records(engine, records, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    config = DatasetRunConfig(cfgs=(4.0,), steps=2, fusion="pixel-mask")
    stale = tmp_path / "out" / "cfg-4.0" / ".tmp-r1.png.x1y2z3w4.png"  # a write killed by SIGKILL
    other = tmp_path / "out" / "cfg-4.0" / ".tmp-r0.png.a1b2c3d4.png"  # rank 0's record: not ours to touch
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    other.write_bytes(b"rank 0 is writing this")
    result = run_dataset(engine, records, tmp_path / "out", config, show_progress=False)
    assert [p.name for p in result.written] == ["r1.png"]
    assert not stale.exists() and other.exists()
    assert (tmp_path / "out" / "cfg-4.0" / "run-rank1.json").is_file()
    assert read_settings(result.written[0])["fusion"] == "pixel-mask"


def test_bad_cfg_list_and_ids_are_user_errors(tmp_path):
    assert parse_cfgs("2.5, 4,5.5") == [2.5, 4.0, 5.5]
    with pytest.raises(UserError, match="commas"):
        parse_cfgs("2.5;4")
    with pytest.raises(UserError, match="at least one"):
        parse_cfgs(",")
    with pytest.raises(UserError, match="cannot name"):
        output_path(tmp_path, "../escape")
    assert output_path(tmp_path, "set/a") == tmp_path / "set" / "a.png"
