"""Per-sample result cache: one small JSON file per (run, record), written atomically.

An entry remembers a stamp of everything its values were computed from (`sample_stamp`): the
prediction, the ground truth, the sources and the mask (path, size and mtime of each) and the
texts (instruction, CLIP-T caption). Any change invalidates it. Settings that hold for a whole
evaluation (resize policy, metric weights) are in the out folder's fingerprint (runner). Feature
vectors (for FID/KID) are stored as base64 float32 so the files stay small; text extras (the VLM
judge's raw answers) as strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from editkit.utils.atomic import write_json
from editkit.utils.fingerprint import digest, file_stamp

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def entry_path(cache_dir: Path, run: str, record_id: str) -> Path:
    """A file name that is safe for any id (ids may contain slashes or spaces)."""
    safe = _UNSAFE.sub("_", record_id)[:80]
    if safe != record_id:
        safe += "-" + hashlib.sha1(record_id.encode()).hexdigest()[:8]
    return Path(cache_dir) / run / f"{safe}.json"


def sample_stamp(record, pred_path: Path) -> str:
    """A digest of the files and texts one (prediction, record) pair is scored from."""
    from editkit.eval.sample import caption

    files = [pred_path, record.target, *record.sources, record.mask]
    return digest({"files": [[str(f), file_stamp(f)] if f else None for f in files],
                   "texts": [record.instruction, caption(record)]})


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, np.float32).tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32)


def _json_value(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class Entry:
    """Cached values, feature vectors and text extras of one prediction."""

    def __init__(self, stamp_: str, values: dict | None = None, features: dict | None = None,
                 texts: dict | None = None):
        self.stamp = stamp_
        self.values: dict[str, float] = values or {}
        self.features: dict[str, str] = features or {}
        self.texts: dict[str, str] = texts or {}

    def has(self, columns) -> bool:
        return all(c in self.values for c in columns)

    def value(self, column: str) -> float:
        v = self.values.get(column)
        return math.nan if v is None else float(v)

    def update(self, row: dict) -> None:
        """`_name` keys are feature vectors, string values text extras, the rest metric values."""
        for key, value in row.items():
            if key.startswith("_"):
                self.features[key[1:]] = encode_vector(value)
            elif isinstance(value, str):
                self.texts[key] = value
            else:
                self.values[key] = _json_value(value)

    def feature(self, name: str) -> np.ndarray | None:
        return decode_vector(self.features[name]) if name in self.features else None

    def save(self, path: Path) -> None:
        write_json(path, {"stamp": self.stamp, "values": self.values, "features": self.features,
                          "texts": self.texts}, indent=None)


def load_entry(path: Path, record, pred_path: Path) -> Entry:
    """The cached entry if it was computed from the current files and texts, else an empty one."""
    current = sample_stamp(record, pred_path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return Entry(current)
    if not isinstance(data, dict) or data.get("stamp") != current or not _readable(data):
        return Entry(current)  # stale or damaged: the entry is derived data, so it is computed again
    return Entry(current, data.get("values"), data.get("features"), data.get("texts"))


def _readable(data: dict) -> bool:
    """Values a mapping and every feature vector decodable (a flipped byte in a cached vector must
    not become a traceback, or a wrong vector)."""
    values, features, texts = data.get("values", {}), data.get("features", {}), data.get("texts", {})
    if not isinstance(values, dict) or not isinstance(features, dict) or not isinstance(texts, dict):
        return False
    if not all(isinstance(text, str) for text in texts.values()):
        return False
    try:
        return all(len(base64.b64decode(text, validate=True)) % 4 == 0 for text in features.values())
    except (binascii.Error, TypeError, ValueError):
        return False
