"""Inference that can be trusted: resume only onto matching work, bad records named, no silent
black images, no tracebacks for bad flags (through `editkit.cli.main`, tiny preset, CPU)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.cli import main
from editkit.data import write_manifest
from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.infer.outputs import read_settings
from editkit.models import lora as L

TINY = ["--model", "tiny", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


def run(capsys, *args):
    """(exit code, stdout, stderr) of `editkit ARGS` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def ok(capsys, *args):
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return out, err


def fails(capsys, *args) -> str:
    """The one error line of a command that must exit with code 2 (a progress bar may precede it)."""
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("editkit: error: "), err
    assert sum(line.startswith("editkit:") for line in lines) == 1, err
    return lines[-1]


def noise(path, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def image(tmp_path):
    return noise(tmp_path / "a.png")


@pytest.fixture()
def manifest(tmp_path, image):
    path = tmp_path / "set.jsonl"
    write_manifest([EditRecord(id=f"r{i}", instruction=f"edit {i}", sources=[image]) for i in range(3)], path, "pairs")
    return path


def test_rerun_with_other_settings_is_refused_and_overwrite_redoes(capsys, tmp_path, manifest):
    out = tmp_path / "preds"
    ok(capsys, "infer", *TINY, "--data", manifest, "--out", out)
    out_text, _ = ok(capsys, "infer", *TINY, "--data", manifest, "--out", out, "--batch-size", "1")
    assert "skipped 3 finished" in out_text  # batching is not a setting that changes the images
    line = fails(capsys, "infer", *TINY, "--steps", "3", "--data", manifest, "--out", out)
    assert "cfg-4.0" in line and "steps" in line and "--overwrite" in line
    write_manifest([EditRecord(id="r0", instruction="another edit", sources=[manifest.parent / "a.png"])],
                   manifest, "pairs")
    assert "records" in fails(capsys, "infer", *TINY, "--data", manifest, "--out", out)
    ok(capsys, "infer", *TINY, "--steps", "3", "--data", manifest, "--out", out, "--overwrite")
    folder = out / "cfg-4.0"
    assert sorted(p.name for p in folder.glob("*.png")) == ["r0.png"]  # the other records' images went too
    settings = read_settings(folder / "r0.png")
    assert settings["steps"] == 3 and settings["prompt"] == "another edit"
    assert json.loads((folder / "run.json").read_text())["config"]["steps"] == 3


def test_changed_lora_file_is_a_changed_fingerprint(capsys, tmp_path, manifest):
    modules = {"transformer_blocks.0.attn.to_q": L.LoraModule(torch.zeros(2, 32), torch.zeros(32, 2))}
    lora = L.save_lora(tmp_path / "l.safetensors", L.build(modules, "peft"), "peft")
    args = ["infer", *TINY, "--data", manifest, "--out", tmp_path / "preds", "--lora", lora]
    ok(capsys, *args)
    modules["transformer_blocks.0.attn.to_q"].A.fill_(0.01)
    L.save_lora(lora, L.build(modules, "peft"), "peft")
    assert "lora" in fails(capsys, *args)


def test_overwrite_under_torchrun_clears_only_each_ranks_files(tmp_path, monkeypatch):
    from editkit.infer.dataset_run import _clear_outputs

    records = [EditRecord(id=f"r{i}", instruction="x", sources=[]) for i in range(4)]
    folder = tmp_path / "cfg-4.0"
    folder.mkdir()
    names = ["r0.png", "r1.png", "r2.png", "r3.png", "gone.png", "run.json", "run-rank0.json", "run-rank1.json",
             "run-rank2.json"]
    for name in names:
        (folder / name).write_bytes(b"old")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _clear_outputs(folder, records[1::2], records)
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(names) - {"r1.png", "r3.png", "run-rank1.json"})
    monkeypatch.setenv("RANK", "0")
    _clear_outputs(folder, records[0::2], records)
    assert list(folder.iterdir()) == []


def test_out_naming_a_file_is_refused(capsys, tmp_path, manifest):
    assert "is a file" in fails(capsys, "infer", *TINY, "--data", manifest, "--out", manifest)


def _bad_set(tmp_path, image):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    records = [EditRecord(id="good0", instruction="x", sources=[image]),
               EditRecord(id="missing", instruction="x", sources=[tmp_path / "nowhere.png"]),
               EditRecord(id="corrupt", instruction="x", sources=[broken]),
               EditRecord(id="good1", instruction="x", sources=[image])]
    path = tmp_path / "bad.jsonl"
    write_manifest(records, path, "pairs")
    return path


def test_a_bad_record_is_named_and_stops_the_run(capsys, tmp_path, image):
    line = fails(capsys, "infer", *TINY, "--data", _bad_set(tmp_path, image), "--out", tmp_path / "p",
                 "--batch-size", "1")
    assert re.search(r"record (\S*bad\.jsonl:2|missing):", line) and "nowhere.png" in line and "--skip-bad" in line


def test_skip_bad_goes_on_and_reports_the_bad_records(capsys, tmp_path, image):
    out = tmp_path / "p"
    _, err = ok(capsys, "infer", *TINY, "--data", _bad_set(tmp_path, image), "--out", out, "--cfg", "1,4",
                "--skip-bad")
    for cfg in ("cfg-1.0", "cfg-4.0"):
        assert sorted(p.name for p in (out / cfg).glob("*.png")) == ["good0.png", "good1.png"]
        listed = json.loads((out / cfg / "run.json").read_text())["bad_records"]
        assert len(listed) == 2 and "nowhere.png" in listed[0]["problem"] and "broken.png" in listed[1]["problem"]
    assert "skipped 2 bad record(s)" in err  # each bad record once, whatever the number of CFG values


def test_a_mask_of_another_size_is_refused_with_both_sizes(capsys, tmp_path, image):
    mask = tmp_path / "m.png"
    Image.new("L", (32, 32), 255).save(mask)
    line = fails(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png",
                 "--mask", mask, "--fusion", "pixel-mask")
    assert "32x32" in line and "64x64" in line
    path = tmp_path / "masked.jsonl"
    write_manifest([EditRecord(id="m", instruction="x", sources=[image], mask=mask)], path, "pairs")
    line = fails(capsys, "infer", *TINY, "--data", path, "--out", tmp_path / "p", "--fusion", "latent-mask")
    assert "32x32" in line and "64x64" in line and re.search(r"record (\S*masked\.jsonl:1|m):", line)


def test_mask_without_fusion_is_refused(capsys, tmp_path, image):
    mask = tmp_path / "m.png"
    Image.new("L", (64, 64), 255).save(mask)
    line = fails(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png", "--mask", mask)
    assert "--fusion pixel-mask" in line


def test_non_finite_lora_and_absurd_scales_are_refused(capsys, tmp_path, image):
    a = torch.ones(2, 32)
    a[1, 3] = float("nan")
    modules = {"transformer_blocks.0.attn.to_q": L.LoraModule(a, torch.ones(32, 2))}
    path = L.save_lora(tmp_path / "nan.safetensors", L.build(modules, "peft"), "peft")
    with pytest.raises(UserError, match=r"nan.safetensors: tensor 'transformer_blocks.0.attn.to_q.lora_A.weight'"):
        L.load_lora(path)
    edit = ["edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png"]
    assert "NaN or inf" in fails(capsys, *edit, "--lora", path)
    good = L.save_lora(tmp_path / "ok.safetensors", L.build({"transformer_blocks.0.attn.to_q": L.LoraModule(
        torch.ones(2, 32), torch.ones(32, 2))}, "peft"), "peft")
    for scale in ("1e9", "nan", "inf"):
        assert "out of range" in fails(capsys, *edit, "--lora", f"{good}:{scale}")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e9"])
def test_non_finite_or_absurd_cfg_is_refused(capsys, tmp_path, image, manifest, value):
    assert "CFG scale" in fails(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out",
                                tmp_path / "o.png", "--cfg", value)
    assert "CFG scale" in fails(capsys, "infer", *TINY, "--data", manifest, "--out", tmp_path / "p",
                                "--cfg", f"4,{value}")
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "p").exists()


def test_engine_refuses_to_save_non_finite_images(tmp_path, image, monkeypatch):
    from editkit.infer.dataset_run import DatasetRunConfig, run_dataset
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import load_model

    engine = Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")
    predict = engine.model.predict
    monkeypatch.setattr(engine.model, "predict", lambda *a, **k: predict(*a, **k) * float("nan"))
    with pytest.raises(UserError, match="not finite"):
        engine.edit([EditRequest("x", [Image.open(image)], steps=2)])
    records = [EditRecord(id="r0", instruction="x", sources=[image], origin="set.jsonl:1")]
    with pytest.raises(UserError, match=r"record set.jsonl:1: the sampled latents are not finite"):
        run_dataset(engine, records, tmp_path / "p", DatasetRunConfig(steps=2), show_progress=False)
    assert not list((tmp_path / "p").rglob("*.png"))


def test_output_format_follows_the_suffix(capsys, tmp_path, image):
    edit = ["edit", *TINY, "--image", image, "--prompt", "make it blue"]
    for name, fmt in (("o.jpg", "JPEG"), ("deep/er/o.WEBP", "WEBP"), ("o.png", "PNG")):
        ok(capsys, *edit, "--out", tmp_path / name)
        with Image.open(tmp_path / name) as img:
            assert img.format == fmt
        assert read_settings(tmp_path / name)["prompt"] == "make it blue"
    assert (tmp_path / "o.jpg.json").is_file() and not (tmp_path / "o.png.json").exists()
    assert "unknown image suffix '.bmp'" in fails(capsys, *edit, "--out", tmp_path / "o.bmp")
    assert "is a folder" in fails(capsys, *edit, "--out", tmp_path)
    assert "is a file, not a folder" in fails(capsys, *edit, "--out", tmp_path / "o.png" / "x.png")


@pytest.mark.parametrize("command", ["edit", "chat", "infer"])
@pytest.mark.parametrize("device, message", [("bogus", "not a torch device"), ("cuda", "CUDA is not available")])
def test_bad_device_is_one_line(capsys, tmp_path, image, manifest, command, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = {"edit": ["--image", image, "--prompt", "x", "--out", tmp_path / "o.png"],
            "chat": ["--image", image, "--save", tmp_path / "s"],
            "infer": ["--data", manifest, "--out", tmp_path / "p"]}[command]
    assert message in fails(capsys, command, "--model", "tiny", "--device", device, *args)


@pytest.mark.parametrize("flags, message", [
    (["--width", "7"], "multiples of 16"),
    (["--width", "-16"], "--width -16"),
    (["--height", "100000"], "--height 100000"),
    (["--feather", "100000"], "--feather"),
    (["--seed", str(2**70)], "2**63-1"),
    (["--seed", "-1"], "--seed"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--fusion", "blend"], "fusion mode 'blend'"),
    (["--sampler", "ddim"], "--sampler 'ddim'"),
])
def test_bad_numbers_and_names_are_one_line(capsys, tmp_path, image, manifest, flags, message):
    assert message in fails(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png",
                            *flags)
    assert message in fails(capsys, "infer", *TINY, "--data", manifest, "--out", tmp_path / "p", *flags)
    assert not (tmp_path / "o.png").exists() and not list(tmp_path.glob("p/*/*.png"))


def test_bad_batch_size_and_lora_convert_into_a_folder(capsys, tmp_path, manifest):
    assert "--batch-size -1" in fails(capsys, "infer", *TINY, "--data", manifest, "--out", tmp_path / "p",
                                      "--batch-size", "-1")
    modules = {"transformer_blocks.0.attn.to_q": L.LoraModule(torch.ones(2, 8), torch.ones(8, 2))}
    src = L.save_lora(tmp_path / "in.safetensors", L.build(modules, "peft"), "peft")
    assert "is a folder" in fails(capsys, "lora", "convert", src, tmp_path)


def test_infer_takes_field_overrides(capsys, tmp_path, image):
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"id": "c0", "caption": "make it blue", "source_image": "a.png"}) + "\n")
    ok(capsys, "infer", *TINY, "--data", path, "--out", tmp_path / "p", "--field", "instruction=caption")
    assert read_settings(tmp_path / "p" / "cfg-4.0" / "c0.png")["prompt"] == "make it blue"
    assert "--field" in fails(capsys, "infer", *TINY, "--data", path, "--out", tmp_path / "q", "--field", "nonsense")


def test_a_run_without_records_is_refused(tmp_path):
    from editkit.infer.dataset_run import DatasetRunConfig, run_dataset

    with pytest.raises(UserError, match="no records"):
        run_dataset(None, [], tmp_path / "p", DatasetRunConfig())


def test_save_tiny_replaces_only_an_earlier_model_folder(capsys, tmp_path, image):
    assert "is a file" in fails(capsys, "model", "save-tiny", image)
    work = tmp_path / "work"
    noise(work / "keep.png")
    assert "holds no model" in fails(capsys, "model", "save-tiny", work)
    assert (work / "keep.png").is_file() and image.is_file()
    ok(capsys, "model", "save-tiny", tmp_path / "m")
    ok(capsys, "model", "save-tiny", tmp_path / "m", "--seed", "1")
    assert (tmp_path / "m" / "model_index.json").is_file()
