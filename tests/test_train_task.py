"""Both stages implement the Task protocol the training loop relies on (editkit.train.task)."""

import inspect

import pytest
import torch

from editkit.train.config import validate_config
from editkit.train.edit_task import EditTask
from editkit.train.task import BatchSampler, Task
from editkit.train.vae_stage import VaeTask

METHODS = [n for n, v in vars(Task).items() if callable(v) and not n.startswith("_")]


def test_the_protocol_names_what_the_loop_uses():
    assert {"module", "sampler", "info"} <= set(Task.__annotations__)
    assert {"set_module", "next_batch", "loss", "validation_loss", "preview", "export",
            "export_gathered"} <= set(METHODS)


@pytest.mark.parametrize("cls", [EditTask, VaeTask])
def test_task_classes_have_the_protocol_methods(cls):
    for name in METHODS:
        method = getattr(cls, name, None)
        assert callable(method), (cls.__name__, name)
        # the loop passes arguments by position: the same number, whatever their names
        ours = inspect.signature(method).parameters
        wanted = inspect.signature(getattr(Task, name)).parameters
        assert len(ours) == len(wanted), (cls.__name__, name)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from editkit.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n=2, size=32, seed=0, val_fraction=0.0,
                      test_fraction=0.0, progress=False)


def test_built_tasks_satisfy_the_protocol(synth, tmp_path):
    loop = {"tensorboard": False, "mixed_precision": "no"}
    vae = VaeTask(validate_config({"stage": "vae", "output_dir": str(tmp_path / "v"), "vae": {"size": 32},
                                   "data": {"train": [{"manifest": str(synth["train"])}]}, "loop": loop}), "cpu")
    edit = EditTask(validate_config({"model": "tiny", "output_dir": str(tmp_path / "e"),
                                     "data": {"train": [{"manifest": str(synth["train"])}], "area": 1024,
                                              "multiple": 16},
                                     "loop": loop}), torch.device("cpu"))
    for task in (vae, edit):
        assert isinstance(task, Task) and isinstance(task.sampler, BatchSampler)
        assert isinstance(task.info, dict) and isinstance(task.module, torch.nn.Module)
    assert vae.validation_loss(0) is None and vae.export_gathered({}, tmp_path / "x", 1) is None
    assert edit.validation_loss(0) is None and edit.preview(tmp_path / "p.png", 1, 1.0) is None  # no data.val
    assert not (tmp_path / "x").exists()
