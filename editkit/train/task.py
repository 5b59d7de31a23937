"""What the training loop (editkit.train.trainer) needs from a stage: the `Task` protocol.

Implemented by editkit.train.edit_task.EditTask (the `edit` stage),
editkit.train.vae_stage.VaeTask (the `vae` stage) and editkit.train.rgba_vae_stage.RgbaVaeTask
(the `rgba_vae` stage). A stage without something to offer still has
the member: `info` is {}, `validation_loss` and `preview` return None, and so does
`export_gathered` when a sharded run's gathered weights are not enough to export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from editkit.train.objectives import LossOutput


@runtime_checkable
class BatchSampler(Protocol):
    """Where the task's batches come from; its position goes into every checkpoint, per rank."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
    """A stage's model, data and loss, driven by the shared loop."""

    module: nn.Module
    """The trained module (after `set_module`, the accelerate-wrapped one)."""
    sampler: BatchSampler
    info: dict
    """Facts about the run recorded in run.json (e.g. LoRA targets, trainable parameter count)."""

    @staticmethod
    def data_identity(cfg) -> dict:
        """The run-fingerprint entries that identify the stage's data by content (record or folder
        stamps), computed before the task is built (editkit.train.trainer.run_fingerprint)."""

    def set_module(self, module: nn.Module) -> None:
        """Run the loss through `module` (the wrapped module while training, the plain one for
        validation and previews on the main process)."""

    def next_batch(self, generator: torch.Generator) -> Any: ...

    def loss(self, batch: Any, generator: torch.Generator) -> LossOutput: ...

    def validation_loss(self, seed: int) -> float | dict[str, float] | None:
        """The loss on fixed validation samples with fixed noise; None without validation data.

        A stage that measures more than a loss returns named values instead: metrics.csv gets
        each as a `val_<name>` column (so its "loss" is `val_loss`)."""

    def preview(self, path: Path, steps: int, cfg_scale: float) -> Path | None:
        """Write a preview image to `path` and return it; None when there is nothing to show."""

    def export(self, module: nn.Module, folder: Path, step: int) -> list[Path]:
        """Write the deployable weights of `module` (unwrapped) into `folder`."""

    def export_gathered(self, trainable: dict[str, torch.Tensor], folder: Path, step: int) -> list[Path] | None:
        """export() from a sharded run's gathered trainable weights; None when those are not enough."""
