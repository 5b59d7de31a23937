"""editkit.models.offload "model" mode on the tiny model, CPU to CPU: the hooks take turns, results unchanged."""

import numpy as np
import torch
from PIL import Image

from editkit.infer.engine import EditRequest, Engine
from editkit.models import accel, offload


def _model():
    from editkit.models.families import get_family

    return get_family("qwen-image-edit-2511").build_tiny(seed=0)


def _request():
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    return EditRequest("make it red", [image], negative_prompt=" ", true_cfg_scale=4.0, steps=2, seed=3)


def test_model_offload_hooks_take_turns_and_change_nothing():
    plain = _model()
    want = np.asarray(Engine(plain).edit([_request()])[0], dtype=np.int16)

    model = _model()
    accel.apply_accel(model, accel.Accel(compile=False, offload="model"))
    group = model.transformer._hf_hook.group
    assert isinstance(group, offload.OneOnDevice)
    parts = [model.transformer, model.vae, model.text_encoder.model]
    assert group.members == parts
    assert all(part._hf_hook.group is group for part in parts)
    assert model._split_lengths  # the transformer runs whole on the GPU: the split still pays

    seen = []
    for part, name in zip(parts, ("transformer", "vae", "text encoder")):
        original = part._hf_hook.pre_forward

        def spy(module, *args, _original=original, _name=name, **kwargs):
            seen.append(_name)
            return _original(module, *args, **kwargs)

        part._hf_hook.pre_forward = spy
    got = np.asarray(Engine(model).edit([_request()])[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1  # the same edit (to rounding)
    assert group.current is model.vae  # decoding ran last
    runs = [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name]
    assert runs == ["text encoder", "vae", "transformer", "vae"]  # prompt, condition latents, 2 steps, decode


def test_one_on_device_moves_the_module_used_before_back(monkeypatch):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    group = offload.OneOnDevice("cpu")
    group.members += [a, b]
    moves = []
    monkeypatch.setattr(offload, "_device_of", lambda m: torch.device("meta") if m is a else torch.device("cpu"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kw: moves.append((self, args)) or self)
    group.onload(b)  # `a` sits on another device than the CPU: it is sent back
    assert moves == [(a, (torch.device("cpu"),))] and group.current is b
