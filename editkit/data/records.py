"""The one record type for an editing sample, shared by every job (cache, train, infer, eval).

Mask convention: white (255) marks the edit region — the pixels the edit may change; black is
background to preserve. DiffSynth manifests call the field `back_mask`, pairs manifests `mask`;
either name is read as the mask in every schema (`editkit.data.formats.FIELD_ALIASES`). A colour
mask marks the edit region where its brightest channel is >= 128 (red on black works); a mask with
transparency that is not fully opaque is read from its alpha (opaque = edit region). See
`editkit.data.images.binarize_mask`.

`origin` says where a record was read ("train.jsonl:12", "meta.json[3]", "meta.csv:4",
"DIR/prompts.txt:7" for a folder dataset); messages about a record name it. It is provenance,
not content: records compare equal without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EditRecord:
    id: str
    instruction: str
    sources: list[Path] = field(default_factory=list)  # 0 sources = text-to-image
    target: Path | None = None  # None for inference-only sets
    mask: Path | None = None  # white = edit region
    ref_gt: Path | None = None
    instruction_cn: str | None = None
    inverse_instruction: str | None = None
    inverse_instruction_cn: str | None = None
    task: str | None = None  # edit type / dataset name
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str = field(default="", compare=False)  # where it was read: "manifest.jsonl:12", "m.json[3]"
