"""The GPU benchmark's code paths on the tiny preset, on the CPU (no timings are asserted)."""

import math

import pytest

from bench import gpu_bench


def _rows(results, section):
    return {row["name"]: row for row in results["rows"] if row["section"] == section}


@pytest.mark.slow
def test_dit_and_train_sections_run_and_match_the_reference(tmp_path):
    results = gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--no-compile", "--reps", "1",
                              "--sections", "dit,train", "--out", str(tmp_path)])
    assert results["errors"] == []
    dit = _rows(results, "dit")
    batched = next(row for name, row in dit.items()
                   if name.startswith("editkit eager true-CFG step (batched, attention"))
    assert batched["err"] < 1e-2  # one batch-2 pass computes the pipeline's two passes
    masked = next(row for name, row in dit.items() if "padded+masked" in name)
    assert masked["err"] < 1e-2  # padding the shorter prompt + a mask changes nothing
    train = _rows(results, "train")
    assert len(train) >= 2
    for row in train.values():
        assert math.isfinite(row["loss"]) and row["s"] > 0
        if "grad_err" in row:
            assert row["grad_err"] < 5e-2
    assert (tmp_path / "bench.json").exists() and (tmp_path / "profile.txt").exists()


def test_rel_err_flags_non_finite():
    import torch

    assert math.isnan(gpu_bench.rel_err(torch.tensor([float("nan")]), torch.ones(1)))
    assert gpu_bench.rel_err(torch.ones(3), torch.ones(3)) == 0


def test_scaling_and_lightning_sections_run_on_the_tiny_preset(tmp_path):
    results = gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--no-compile", "--reps", "1", "--steps", "3",
                              "--scaling-sides", "32,64", "--sections", "scaling,lightning", "--out", str(tmp_path)])
    assert results["errors"] == []
    scaling = [r for r in results["rows"] if r["section"] == "scaling"]
    assert [(r["side"], r["conds"]) for r in scaling] == [(32, 1), (64, 1), (32, 2), (64, 2)]
    assert all(r["err"] < 1e-4 for r in scaling)  # the batched step computes the pipeline's step
    assert scaling[-1]["tokens"] > scaling[0]["tokens"]
    names = [r["name"] for r in results["rows"] if r["section"] == "lightning"]
    assert len(names) == 3 and "lightning-8step" in names[1]


def test_baselines_speed_instruct_pix2pix_runs_on_the_tiny_preset(capsys):
    import json

    from bench import baselines_speed

    result = baselines_speed.main(["--family", "instruct-pix2pix", "--tiny", "--batch", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result  # one JSON line
    assert result["preset"] == "tiny" and result["steps"] == 3 and result["size"] == 64
    assert result["max_pixel_diff"] <= 1  # editkit's engine computes the pipeline's image
    for name in ("diffusers", "editkit"):
        assert result[f"{name}_s_per_image"] > 0 and result[f"{name}_batch2_s_per_image"] > 0
