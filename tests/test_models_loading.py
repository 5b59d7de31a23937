"""Loading: save-tiny -> load_model round trip, partial folders, transformer from another folder, CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from editkit.cli import app
from editkit.errors import UserError
from editkit.infer.sampler import sample
from editkit.models import load_model, save_tiny
from editkit.models.loading import describe

FAMILY = "qwen-image-edit-2511"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-2511", family=FAMILY)


def _edit(model, seed=5):
    img = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    inputs = model.prepare(["add a hat"], [[img]], 64, 64, [" "])
    return sample(model, inputs, steps=2, true_cfg_scale=3.0, seeds=[seed])


def test_saved_folder_is_diffusers_format(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert part in index and (tiny_dir / part).is_dir()


def test_round_trip_gives_identical_outputs(tiny_dir):
    built = load_model(f"tiny:{FAMILY}", dtype="fp32", device="cpu")
    loaded = load_model(tiny_dir, dtype="fp32", device="cpu")
    assert loaded.family.name == FAMILY
    assert loaded.transformer.config.zero_cond_t
    assert (loaded.vae_image_area, loaded.vlm_image_area) == (built.vae_image_area, built.vlm_image_area)
    assert loaded.drop_idx == built.drop_idx
    assert torch.equal(_edit(built), _edit(loaded))


def test_view_sizes_are_options(tiny_dir):
    model = load_model(tiny_dir, dtype="fp32", device="cpu", vae_image_size=32, vlm_image_size=48)
    assert (model.vae_image_area, model.vlm_image_area) == (32 * 32, 48 * 48)
    img = Image.new("RGB", (64, 64))
    assert model.vae_size(img) == (32, 32)


def test_dtype_option(tiny_dir):
    model = load_model(tiny_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16


def test_partial_folder_lists_what_is_missing(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(UserError) as err:
        load_model(broken, dtype="fp32", device="cpu")
    message = str(err.value)
    assert "vae/config.json" in message and "scheduler/scheduler_config.json" in message
    assert "\n" not in message


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nowhere", dtype="fp32", device="cpu")


def test_transformer_from_another_folder(tiny_dir, tmp_path):
    other = save_tiny(tmp_path / "other", family=FAMILY, seed=1)
    rest = tmp_path / "rest"
    shutil.copytree(tiny_dir, rest)
    shutil.rmtree(rest / "transformer")
    mixed = load_model(rest, transformer=other / "transformer", dtype="fp32", device="cpu")
    reference = load_model(f"tiny:{FAMILY}", seed=1, dtype="fp32", device="cpu")
    base = load_model(tiny_dir, dtype="fp32", device="cpu")
    for name, param in mixed.transformer.named_parameters():
        assert torch.equal(param, dict(reference.transformer.named_parameters())[name])
    assert not torch.equal(_edit(mixed), _edit(base))


def test_loading_straight_to_the_device_gives_the_same_weights(tiny_dir):
    from editkit.models.families import get_family

    family = get_family(FAMILY)
    old = family.load_folder(tiny_dir, tiny_dir / "transformer", torch.float32, {})  # read on the CPU
    new = family.load_folder(tiny_dir, tiny_dir / "transformer", torch.float32, {}, device="cpu")  # device_map
    for name, module in old.modules().items():
        want, got = module.state_dict(), new.modules()[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        assert all(t.device.type == "cpu" for t in got.values())


def _record_device_maps(monkeypatch):
    """Record the device_map each network's from_pretrained gets (then load on the CPU), and skip
    the facade's final move (this machine has no GPU)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from editkit.models.qwen_image_edit import QwenImageEditModel

    seen = {}
    for cls in (QwenImageTransformer2DModel, AutoencoderKLQwenImage, Qwen2_5_VLForConditionalGeneration):
        def spy(*args, _cls=cls, _load=cls.from_pretrained, **kwargs):
            seen.setdefault(_cls.__name__, []).append(kwargs.pop("device_map", None))
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    moved = []
    monkeypatch.setattr(QwenImageEditModel, "to", lambda self, device=None, dtype=None: moved.append(device) or self)
    return seen, moved


def test_the_device_reaches_from_pretrained(tiny_dir, tmp_path, monkeypatch):
    seen, moved = _record_device_maps(monkeypatch)
    load_model(tiny_dir, dtype="fp32", device="cuda:1")  # e.g. rank 1's GPU under torchrun
    assert seen == {"QwenImageTransformer2DModel": ["cuda:1"], "AutoencoderKLQwenImage": ["cuda:1"],
                    "Qwen2_5_VLForConditionalGeneration": ["cuda:1"]}
    assert moved == ["cuda:1"]
    seen.clear()
    load_model(tiny_dir, dtype="fp32", device="cpu")
    assert all(maps == [None] for maps in seen.values()) and len(seen) == 3  # CPU loading is unchanged
    seen.clear()
    other = save_tiny(tmp_path / "other", family=FAMILY, seed=1)
    load_model(f"tiny:{FAMILY}", transformer=other / "transformer", dtype="fp32", device="cuda")
    assert seen == {"QwenImageTransformer2DModel": ["cuda"]}  # a transformer from another folder too


def test_family_from_plain_diffusers_index(tiny_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    index = json.loads((plain / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if not k.startswith("_editkit")}
    (plain / "model_index.json").write_text(json.dumps(index))
    assert describe(plain)["family"] == "qwen-image-edit-2511"
    index["_class_name"] = "QwenImagePipeline"
    (plain / "model_index.json").write_text(json.dumps(index))
    config = json.loads((plain / "transformer" / "config.json").read_text())
    config["zero_cond_t"] = False
    (plain / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--family"):
        describe(plain)
    assert describe(plain, family="qwen-image-edit-2509")["family"] == "qwen-image-edit-2509"


def test_cli_save_tiny_and_info(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-tiny"
    result = runner.invoke(app, ["model", "save-tiny", str(out), "--family", "qwen-image-edit-2509"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "info", str(out)])
    assert result.exit_code == 0, result.output
    assert "qwen-image-edit-2509" in result.output and "transformer:" in result.output


def test_attention_backend_option(tiny_dir):
    default = load_model(tiny_dir, dtype="fp32", device="cpu")
    native = load_model(tiny_dir, dtype="fp32", device="cpu", attention_backend="_native_math")
    assert torch.allclose(_edit(default), _edit(native), atol=1e-5)
    with pytest.raises(UserError, match="not available offline"):
        load_model(tiny_dir, dtype="fp32", device="cpu", attention_backend="flash_hub")


def test_cli_missing_folder_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    code = f"from editkit import cli; cli.main(['model', 'info', {str(tmp_path / 'nowhere')!r}])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model folder not found" in lines[0]


def test_family_must_match_the_transformer(tiny_dir):
    with pytest.raises(UserError, match="zero_cond_t"):
        load_model(tiny_dir, family="qwen-image-edit-2509", dtype="fp32", device="cpu")


def test_compile_option_compiles_the_repeated_blocks(monkeypatch):
    from diffusers import QwenImageTransformer2DModel

    calls = []
    monkeypatch.setattr(QwenImageTransformer2DModel, "compile_repeated_blocks", lambda self, **kw: calls.append(kw))
    load_model("tiny", dtype="fp32", device="cpu", compile=True)
    assert calls == [{"fullgraph": True}]


@pytest.fixture(scope="module")
def saved_by_cli(tmp_path_factory):
    from editkit.cli import main

    out = tmp_path_factory.mktemp("cli-models") / "tiny"
    with pytest.raises(SystemExit) as exit_:
        main(["model", "save-tiny", str(out)])
    assert exit_.value.code == 0
    return out


def _truncate(path, size):
    with path.open("r+b") as f:
        f.truncate(size)


def _scribble_header(path):
    with path.open("r+b") as f:
        f.seek(8)  # past the header length: the JSON header itself
        f.write(b"\x00garbage\xff" * 4)


DAMAGES = {
    "truncated": ("transformer/diffusion_pytorch_model.safetensors", lambda p: _truncate(p, p.stat().st_size // 2),
                  "damaged safetensors file"),
    "cut-in-header": ("transformer/diffusion_pytorch_model.safetensors", lambda p: _truncate(p, 1000),
                      "damaged safetensors file"),
    "emptied": ("vae/diffusion_pytorch_model.safetensors", lambda p: p.write_bytes(b""), "damaged safetensors file"),
    "header-corrupt": ("text_encoder/model.safetensors", _scribble_header, "damaged safetensors file"),
    "config": ("vae/config.json", lambda p: p.write_text('{"_class_name": '), "not valid JSON"),
    "binary-config": ("text_encoder/config.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    "model-index": ("model_index.json", lambda p: p.write_text("[]"), "not a JSON object"),
    "scheduler": ("scheduler/scheduler_config.json", lambda p: p.write_text(""), "not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_file_is_one_line_naming_it(saved_by_cli, tmp_path, damage):
    relative, spoil, what = DAMAGES[damage]
    folder = tmp_path / "model"
    shutil.copytree(saved_by_cli, folder)
    spoil(folder / relative)
    for load in (lambda: load_model(folder, dtype="fp32", device="cpu"), lambda: describe(folder)):
        with pytest.raises(UserError) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"{folder / relative}: {what}") and "\n" not in message
        assert "re-download it" in message


def test_damaged_transformer_from_another_folder_is_one_line(saved_by_cli, tmp_path):
    other = tmp_path / "transformer"
    shutil.copytree(saved_by_cli / "transformer", other)
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="transformer/diffusion_pytorch_model.safetensors: damaged safetensors"):
        load_model("tiny", transformer=other, dtype="fp32", device="cpu")


def test_cli_edit_on_a_truncated_model_is_one_line_exit_2(saved_by_cli, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "model"
    shutil.copytree(saved_by_cli, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    _truncate(weights, 4096)
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    proc = subprocess.run([sys.executable, "-m", "editkit", "edit", "--model", str(folder), "--image",
                           str(tmp_path / "in.png"), "--prompt", "x", "--out", str(tmp_path / "out.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"editkit: error: {weights}: damaged safetensors file (")
    assert lines[0].endswith("); re-download it, or save the model again")


def test_model_info_on_a_folder_reads_headers_without_torch(saved_by_cli):
    import subprocess
    import sys

    code = (f"import atexit, sys; from editkit.cli import main; "
            "atexit.register(lambda: print('torch loaded' if 'torch' in sys.modules else 'no torch')); "
            f"main(['model', 'info', {str(saved_by_cli)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "transformer:" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "no torch"


@pytest.mark.parametrize("option", ["vae_image_size", "vlm_image_size"])
def test_view_sizes_out_of_range_are_one_line(option):
    """found by bench/reliability's fuzz: a side of 0 was taken as "the default" and exited 0."""
    from editkit.errors import UserError

    for side in (0, -8, 100000):
        with pytest.raises(UserError, match="from 16 to 4096"):
            load_model("tiny", **{option: side})
