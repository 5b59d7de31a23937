"""The model-family interface: every registered family implements it, and a family added as one
new module (registered in FAMILY_MODULES, nothing else edited) loads, edits, is saved and
detected, caches and trains."""

import inspect
import sys
import textwrap

import pytest

from editkit.models import families
from editkit.models.family import EditModel, ModelFamily


def _members(protocol) -> set[str]:
    names = set(protocol.__annotations__)  # the attributes (unevaluated: torch is only imported for typing)
    names |= {n for n, v in vars(protocol).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


@pytest.mark.parametrize("name", families.FAMILY_NAMES)
def test_every_registered_family_implements_the_interface(name):
    from editkit.models import load_model

    family = families.get_family(name)
    missing = [m for m in _members(ModelFamily) if not hasattr(family, m)]
    assert not missing, f"{name} lacks {missing}"
    model = load_model(f"tiny:{name}", dtype="fp32", device="cpu")
    missing = [m for m in _members(EditModel) if not hasattr(model, m)]
    assert not missing, f"{name}'s model lacks {missing}"
    assert model.family is family
    for method in ("predict", "prepare", "output_size"):  # same parameters as the protocol says
        want = list(inspect.signature(getattr(EditModel, method)).parameters)[1:]
        assert list(inspect.signature(getattr(model, method)).parameters) == want


TOY_FAMILY = '''
"""A family written as one new file: a Qwen-Image-Edit-2511 variant with its own name and prompt."""
from dataclasses import replace

from editkit.models.qwen_image_edit import FAMILIES as QWEN

FAMILIES = (replace(QWEN[-1], name="toy-edit", description="a test family",
                    system_prompt="<|im_start|>system\\nEdit the picture.<|im_end|>\\n<|im_start|>user\\n"),)
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    (tmp_path / "toy_family_module.py").write_text(textwrap.dedent(TOY_FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(families.FAMILY_MODULES, "toy-edit", "toy_family_module")
    monkeypatch.setattr(families, "FAMILY_NAMES", (*families.FAMILY_NAMES, "toy-edit"))
    yield "toy-edit"
    sys.modules.pop("toy_family_module", None)


def test_a_new_family_file_runs_through_engine_cache_and_trainer(toy_family, tmp_path):
    from PIL import Image

    from editkit.data.synth import synthesize
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import load_model, save_tiny
    from editkit.train.cache import build_cache
    from editkit.train.config import validate_config
    from editkit.train.trainer import train

    folder = save_tiny(tmp_path / "toy-model", family=toy_family)
    model = load_model(folder, dtype="fp32", device="cpu")  # detected from the folder
    assert model.family.name == toy_family and model.family.system_prompt.endswith("Edit the picture.<|im_end|>\n"
                                                                                  "<|im_start|>user\n")
    engine = Engine(model, model_name=str(folder))
    image = engine.edit([EditRequest("make it red", [Image.new("RGB", (64, 64), "blue")], steps=2)])[0]
    assert image.size == (64, 64)
    assert engine.settings(EditRequest("x", []))["family"] == toy_family

    data = synthesize(tmp_path / "data", n=4, size=64, seed=0, val_fraction=0.0, test_fraction=0.0, progress=False)
    cache = tmp_path / "cache"
    build_cache(str(folder), data["train"], cache, area=64 * 64, multiple=16, dtype="fp32",
                        device="cpu", progress=False)
    cfg = validate_config({
        "model": str(folder), "output_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"cache": [str(cache)], "batch_size": 2, "area": 4096, "multiple": 16},
        "train": {"mode": "lora", "lora": {"rank": 4}}, "optim": {"lr": 1e-3, "schedule": "constant"},
        "loop": {"max_steps": 2, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no"}})
    train(cfg, progress=False)
    assert (tmp_path / "run" / "final").is_dir()
