"""editkit.utils.dist: which process, which device."""


def test_process_device_gives_each_torchrun_process_its_gpu(monkeypatch):
    import torch

    from editkit.utils import dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.process_device() == "cuda:1"
    assert dist.process_device("cpu") == "cpu"  # an explicit device wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.process_device() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.process_device() is None  # one process: the loader's default


def test_resolve_device_refuses_bogus_and_absent_devices(monkeypatch):
    import pytest
    import torch

    from editkit.errors import UserError
    from editkit.utils.dist import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="--device 'bogus': not a torch device"):
        resolve_device("bogus")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
