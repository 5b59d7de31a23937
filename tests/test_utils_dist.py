"""editkit.utils.dist: which process, which device."""


def test_resolve_device_refuses_bogus_and_absent_devices(monkeypatch):
    import pytest
    import torch

    from editkit.errors import UserError
    from editkit.utils.dist import resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == "cuda:1"  # each torchrun process on its own GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="--device 'bogus': not a torch device"):
        resolve_device("bogus")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
