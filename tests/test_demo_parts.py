"""The demo's own pieces: headline numbers, the copy-the-source baseline, folder checks, curves."""

import json

import pytest
from PIL import Image

from editkit.data.records import EditRecord
from editkit.demo.pipeline import BASELINE, check_out, copy_sources, headline
from editkit.demo.presets import FULL, QUICK, sweep
from editkit.demo.report import headline_html, loss_curves, read_curve
from editkit.errors import UserError


def test_headline_picks_the_cfg_with_the_lowest_edit_mse(tmp_path):
    runs = {BASELINE: {"means": {"mse_in": 0.2, "psnr_out": 80.0}},
            "bridge-1-steps": {"means": {"mse_in": 0.08, "psnr_out": 27.0}},
            "bridge-2-steps": {"means": {"mse_in": 0.06, "psnr_out": 26.0}}}
    (tmp_path / "summary.json").write_text(json.dumps({"runs": runs}))
    h = headline(tmp_path / "summary.json", ["bridge-1-steps", "bridge-2-steps"])
    assert h["best_run"] == "bridge-2-steps"
    assert h["edit_mse_ratio"] == pytest.approx(0.3)
    assert h["background_psnr"] == 26.0
    page = headline_html(h, "lbm")
    assert "0.30" in page and "met" in page and "NOT met" not in page


def test_headline_says_when_a_bar_is_missed():
    h = {"best_run": "cfg-1.0", "edit_mse": 0.15, "baseline_edit_mse": 0.2, "edit_mse_ratio": 0.75,
         "background_psnr": 20.0, "per_run": {"cfg-1.0": {"edit_mse": 0.15, "background_psnr": 20.0}}}
    assert headline_html(h, "lbm").count("NOT met") == 2


def test_copy_sources_writes_each_source_under_the_record_id(tmp_path):
    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(src)
    records = [EditRecord(id="r1", instruction="x", sources=[src]), EditRecord(id="r2", instruction="y", sources=[src])]
    copy_sources(records, tmp_path / BASELINE)
    for rid in ("r1", "r2"):
        assert Image.open(tmp_path / BASELINE / f"{rid}.png").getpixel((3, 3)) == (10, 20, 30)


def test_a_folder_keeps_its_preset(tmp_path):
    out = tmp_path / "demo"
    check_out(out, QUICK)
    check_out(out, QUICK)  # same preset: resumes
    with pytest.raises(UserError, match="quick"):
        check_out(out, FULL)


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a demo folder"):
        check_out(tmp_path, QUICK)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_loss_curves_read_the_trainer_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,loss,val_loss\n1,0.5,\n2,0.25,\n2,,0.3\n")
    assert read_curve(csv_path, "loss") == ([1, 2], [0.5, 0.25])
    assert read_curve(csv_path, "val_loss") == ([2], [0.3])
    png = loss_curves({"editor": csv_path}, tmp_path / "curves.png")
    assert Image.open(png).size[0] > 100


def test_the_sweep_is_bridge_steps_for_lbm_and_cfg_for_flow_matching():
    from dataclasses import replace

    assert [(s.name, s.cfg, s.steps) for s in sweep(replace(FULL, objective="lbm", bridge_steps=(1, 4)))] == [
        ("bridge-1-steps", 1.0, 1), ("bridge-4-steps", 1.0, 4)]
    fm = replace(FULL, objective="flow_matching", cfgs=(1, 4.0), sample_steps=8)
    assert [(s.name, s.cfg, s.steps) for s in sweep(fm)] == [("cfg-1.0", 1.0, 8), ("cfg-4.0", 4.0, 8)]


def test_the_model_stage_writes_a_folder_with_the_trained_vae_and_demo_views(tmp_path):
    import torch
    from diffusers import AutoencoderKLQwenImage

    from editkit.demo.pipeline import Demo
    from editkit.models import load_model
    from editkit.models.families import get_family

    demo = Demo(tmp_path / "demo", QUICK, seed=3)
    torch.manual_seed(0)
    trained = AutoencoderKLQwenImage(base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, False])
    trained.save_pretrained(demo.vae_dir)
    demo.make_model()
    model = load_model(demo.model, dtype="fp32", device="cpu")
    area = QUICK.image_size ** 2
    assert (model.vlm_image_area, model.vae_image_area, model.output_area) == (area, area, area)
    assert model.latent_channels == 8 and model.size_multiple == demo.multiple
    assert all(torch.equal(p, q) for p, q in zip(model.vae.parameters(), trained.parameters()))
    assert model.transformer.config.num_layers == QUICK.depth and model.transformer.config.zero_cond_t
    tiny = get_family("qwen-image-edit-2511").build_tiny(seed=3)  # the tiny preset's text encoder, same seed
    assert all(torch.equal(p, q) for p, q in zip(model.text_encoder.parameters(), tiny.text_encoder.parameters()))


def test_the_full_demo_starts_from_the_packaged_vae(tmp_path):
    """The shipped VAE is the full preset's architecture, and the vae stage copies it whole."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    from editkit.demo.pipeline import PACKAGED_VAE, Demo

    demo = Demo(tmp_path / "demo", FULL)
    vae_stage = next(s for s in demo.stages() if s.name == "vae")
    assert "packaged" in vae_stage.command and not vae_stage.done()
    vae_stage.run()
    assert vae_stage.done()
    vae = AutoencoderKLQwenImage.from_pretrained(demo.vae_dir)
    assert vae.config.base_dim == FULL.vae["base_dim"] and vae.config.z_dim == FULL.vae["z_dim"]
    assert list(vae.config.dim_mult) == FULL.vae["dim_mult"]
    shipped = AutoencoderKLQwenImage.from_pretrained(PACKAGED_VAE)
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), shipped.parameters()))
    assert sum(f.stat().st_size for f in PACKAGED_VAE.iterdir()) < 5 * 2**20  # "a few MB at most"


def test_a_folder_keeps_its_vae_choice(tmp_path):
    from dataclasses import replace

    out = tmp_path / "demo"
    check_out(out, FULL)
    with pytest.raises(UserError, match="packaged VAE"):
        check_out(out, replace(FULL, packaged_vae=False))
    assert not QUICK.packaged_vae  # the quick demo (the tests) still runs the vae stage
