"""The interface every feature metric implements, and the 'unavailable' outcome."""

from __future__ import annotations

from pathlib import Path

import torch

from editkit.eval.sample import Sample


class Unavailable(Exception):
    """The metric cannot run here; the message is one line saying why and how to enable it."""


class FeatureMetric:
    """A metric computed from a network, in batches, on the evaluation device.

    `load` raises `Unavailable` (no weights, missing package) or `UserError` (bad weights folder);
    `compute` returns one dict of column -> value per sample (a string value for a `text_columns`
    entry). A metric with options (`evaluate(metric_options={name: {...}})`) takes them as keyword
    arguments of its constructor and says in `settings` what of them changes its values.
    """

    name: str = ""
    columns: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ()
    """Per-sample texts kept beside the values (cache entries, per_sample_texts.jsonl), e.g. a judge's answers."""
    needs_weights = True
    hint = ""

    @classmethod
    def settings(cls, **options) -> dict | None:
        """What besides the weights changes the values, for the out folder's fingerprint (None: nothing)."""
        return None

    @classmethod
    def unavailable_reason(cls, path: Path | None) -> str | None:
        """A cheap check (no loading): why the metric cannot run, or None."""
        if cls.needs_weights and path is None:
            return f"{cls.name}: no weights; pass --weights {cls.name}=PATH ({cls.hint})"
        return None

    def load(self, path: Path | None, device: torch.device) -> None:
        raise NotImplementedError

    def compute(self, samples: list[Sample]) -> list[dict[str, float]]:
        raise NotImplementedError

    def require_weights(self, path: Path | None) -> Path:
        from editkit.errors import UserError

        reason = self.unavailable_reason(path)
        if reason:
            raise Unavailable(reason)
        path = Path(path)
        if not path.exists():
            raise UserError(f"--weights {self.name}={path}: not found; pass {self.hint}")
        return path


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine similarity as Python floats."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).cpu().tolist()


def pooled(output) -> torch.Tensor:
    """`get_*_features` returns a tensor in older transformers and an output with pooler_output in v5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
