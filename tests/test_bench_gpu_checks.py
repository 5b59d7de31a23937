"""bench/gpu_checks.py on the tiny preset and the CPU: every section runs and reports (the GPU figures
come from the lead's run on an H200)."""

import json

import pytest

from bench import gpu_checks
from editkit.models import fa3


@pytest.mark.slow
def test_all_sections_on_the_tiny_preset(tmp_path):
    results = gpu_checks.main(["--preset", "tiny", "--device", "cpu", "--folder", str(tmp_path / "tiny"),
                               "--backends", "sdpa,fa3", "--reps", "1", "--no-compile", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_checks.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    rows = results["rows"]
    loads = {row["path"]: row for row in rows if row["section"] == "load" and "path" in row}
    assert set(loads) == {"cpu-then-move", "streamed"}
    assert all(row["load_s"] > 0 and row["maxrss_gib"] > 0 and row["peak_anon_gib"] > 0 for row in loads.values())
    assert next(row for row in rows if row.get("name") == "same weights both ways")["equal"] is True
    offloads = {row["mode"]: row for row in rows if row["section"] == "offload"}
    assert set(offloads) == {"group", "model"} and all(row["pixel_max_diff"] <= 1 for row in offloads.values())
    attention = {row["name"]: row for row in rows if row["section"] == "attention"}
    assert attention["eager true-CFG step, batched, sdpa"]["err"] < 1e-5
    assert fa3.WHEEL in attention["eager fa3"]["error"]  # no wheel on this machine: reported, not fatal
    assert rows[-1]["section"] == "done"
