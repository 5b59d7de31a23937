"""The layered sample type and the on-disk layout that `layers prep` writes and everything else reads.

- `SampleRef`: where one input sample is (found by `sources.discover`); small and picklable, so
  prep's worker processes receive refs and open the files themselves.
- `LayeredSample` / `Layer`: one opened sample, its layers bottom to top (z-order). A layer's
  pixels are rendered on demand (`Layer.image()`, a full-canvas RGBA image), so a large PSD is
  never held in memory whole.
- `PreparedSample`: one manifest entry of a prepared folder (OUT/metadata/manifest.json), and
  `read_prepared` to read them. Paths in the manifest are relative to OUT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from editkit.errors import UserError

FORMATS = ("psd", "crello", "layers")
SPLITS = ("train", "val")
MANIFEST = Path("metadata") / "manifest.json"
MANIFEST_FORMAT = "editkit-layers"
MANIFEST_VERSION = 1
COMPONENT_RE = re.compile(r"^(?P<id>.+)_comp(?P<index>\d{3,})\.png$")
COMPOSITE_SUFFIX = "_composite.png"


@dataclass(frozen=True)
class SampleRef:
    """One input sample: its id (a plain file name), its format, the file or folder it is read
    from, and every file whose content determines it (they enter prep's fingerprint)."""

    id: str
    format: str
    path: Path
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Layer:
    """One layer of an opened sample: `image()` renders it as a full-canvas RGBA image."""

    render: Callable[[], Image.Image] = field(repr=False)
    description: str = ""
    kind: str = ""  # the source's layer type (PSD layer kind, Crello component type); "" when unknown

    def image(self) -> Image.Image:
        return self.render()


@dataclass(frozen=True)
class LayeredSample:
    id: str
    size: tuple[int, int]  # canvas (width, height)
    layers: list[Layer]  # bottom to top
    source: str  # the file or folder it was read from


def component_name(sample_id: str, index: int) -> str:
    return f"{sample_id}_comp{index:03d}.png"


def composite_name(sample_id: str) -> str:
    return f"{sample_id}{COMPOSITE_SUFFIX}"


def bucket_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class PreparedSample:
    """One entry of OUT/metadata/manifest.json (paths relative to OUT)."""

    id: str
    split: str
    bucket: str  # "WxH"
    size: tuple[int, int]  # the prepared (bucket) size
    source_size: tuple[int, int]  # the canvas size it was read at
    layers: list[str]  # component files, z-order (bottom first)
    composite: str
    descriptions: list[str]
    kinds: list[str]
    source: str

    def to_json(self) -> dict:
        return {**asdict(self), "size": list(self.size), "source_size": list(self.source_size)}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> PreparedSample:
        try:
            entry = cls(id=str(obj["id"]), split=str(obj["split"]), bucket=str(obj["bucket"]),
                        size=tuple(int(v) for v in obj["size"]), source_size=tuple(int(v) for v in obj["source_size"]),
                        layers=[str(p) for p in obj["layers"]], composite=str(obj["composite"]),
                        descriptions=[str(d) for d in obj.get("descriptions", [])],
                        kinds=[str(k) for k in obj.get("kinds", [])], source=str(obj.get("source", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: not a layers manifest entry ({err.__class__.__name__}: {err}); "
                            "re-run `editkit layers prep`") from None
        if len(entry.size) != 2 or len(entry.source_size) != 2:
            raise UserError(f"{where}: size and source_size must be [width, height]; re-run `editkit layers prep`")
        return entry


def manifest_json(samples: list[PreparedSample]) -> dict:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "samples": [s.to_json() for s in samples]}


def read_prepared(root: str | Path) -> list[PreparedSample]:
    """The entries of ROOT/metadata/manifest.json; a UserError naming the file when it is missing or damaged."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; {root} is not a folder written by `editkit layers prep` "
                        "(or prep has not finished: run it again to resume)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read as JSON ({err.__class__.__name__}); "
                        "re-run `editkit layers prep`") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT or not isinstance(obj.get("samples"), list):
        raise UserError(f"{path}: not a layers manifest (no \"format\": \"{MANIFEST_FORMAT}\" with a samples list)")
    return [PreparedSample.from_json(s if isinstance(s, dict) else {}, f"{path}: samples[{i}]")
            for i, s in enumerate(obj["samples"])]
