"""`editkit layers validate OUT`: check a folder written by `layers prep`; nothing is written.

Each problem is one line naming the file:
- the manifest: entries of a known split, bucket "WxH" equal to their size, file names the
  layout's (<split>/<bucket>/<id>_compXXX.png, <id>_composite.png), one description per layer;
- z-order complete: a sample's components on disk are comp000..compN without gaps, and exactly
  the ones its entry lists; every PNG under the split folders belongs to an entry;
- every component and composite decodes, has an alpha channel and the bucket's size;
- the composite equals the over-composition of the components (`compose.composite_error`,
  in 8-bit levels of premultiplied colour and alpha) within `tolerance`.
The samples with the largest composite errors are reported whether or not they pass.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from editkit.errors import UserError
from editkit.layers.compose import composite_error
from editkit.layers.records import (
    COMPONENT_RE,
    COMPOSITE_SUFFIX,
    MANIFEST,
    SPLITS,
    PreparedSample,
    bucket_name,
    component_name,
    composite_name,
    read_prepared,
)
from editkit.utils.progress import parallel_map

DEFAULT_TOLERANCE = 2.0  # 8-bit levels; an exact composite stored as 8-bit PNG is within 1


@dataclasses.dataclass
class LayersReport:
    samples: int
    layers: int
    counts: dict[str, int]  # samples per split
    problems: list[str]
    errors: list[tuple[str, float]]  # (sample id, composite error in levels), largest first

    @property
    def ok(self) -> bool:
        return not self.problems


def _entry_problems(root: Path, entry: PreparedSample) -> list[str]:
    where = f"{root / MANIFEST}: sample {entry.id!r}"
    if entry.split not in SPLITS:
        return [f"{where}: split {entry.split!r} is not one of {', '.join(SPLITS)}"]
    if entry.bucket != bucket_name(entry.size):
        return [f"{where}: bucket {entry.bucket!r} does not match its size {bucket_name(entry.size)}"]
    folder = f"{entry.split}/{entry.bucket}"
    expected = [f"{folder}/{component_name(entry.id, k)}" for k in range(len(entry.layers))]
    if not entry.layers:
        return [f"{where}: lists no layers"]
    if entry.layers != expected:
        return [f"{where}: layers must be {folder}/{entry.id}_comp000.png .. comp{len(entry.layers) - 1:03d} in "
                f"z-order, got {', '.join(entry.layers[:3])}{' ...' if len(entry.layers) > 3 else ''}"]
    if entry.composite != f"{folder}/{composite_name(entry.id)}":
        return [f"{where}: composite must be {folder}/{composite_name(entry.id)}, got {entry.composite}"]
    if len(entry.descriptions) != len(entry.layers):
        return [f"{where}: has {len(entry.descriptions)} descriptions for {len(entry.layers)} layers"]
    return []


def _disk_components(root: Path) -> tuple[dict[tuple[str, str], set[int]], list[Path]]:
    """(folder, sample id) -> component indices on disk, and every PNG under the split folders."""
    found: dict[tuple[str, str], set[int]] = defaultdict(set)
    pngs = []
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for path in sorted((root / split).rglob("*.png")):
            if path.name.startswith("."):
                continue
            pngs.append(path)
            match = COMPONENT_RE.match(path.name)
            if match:
                found[(path.parent.relative_to(root).as_posix(), match["id"])].add(int(match["index"]))
    return found, pngs


def _zorder_problems(root: Path, entry: PreparedSample, on_disk: set[int]) -> list[str]:
    folder = root / entry.split / entry.bucket
    listed = set(range(len(entry.layers)))
    problems = []
    for k in sorted(listed - on_disk):
        present = ", ".join(f"comp{i:03d}" for i in sorted(on_disk)) or "none"
        problems.append(f"{folder / component_name(entry.id, k)}: missing, a gap in the z-order of sample "
                        f"{entry.id!r} (on disk: {present})")
    for k in sorted(on_disk - listed):
        problems.append(f"{folder / component_name(entry.id, k)}: not in the manifest (sample {entry.id!r} lists "
                        f"comp000..comp{len(entry.layers) - 1:03d})")
    return problems


def _read_rgba(path: Path, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(path) as img:
            img.load()
            mode, got = img.mode, img.size
            arr = np.asarray(img) if mode == "RGBA" else None
    except FileNotFoundError:
        return None, f"{path}: missing"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return None, f"{path}: cannot be decoded ({err.__class__.__name__}); run `editkit layers prep` again"
    if mode != "RGBA":
        return None, f"{path}: has no alpha channel (mode {mode}); components and composites are RGBA"
    if got != tuple(size):
        return None, f"{path}: is {got[0]}x{got[1]}, but its bucket is {size[0]}x{size[1]}"
    return arr, None


def check_sample(args: tuple[Path, PreparedSample, float]) -> tuple[list[str], float | None]:
    """(problems, composite error in levels or None when it could not be computed) for one entry
    whose files are all on disk."""
    root, entry, tolerance = args
    problems, layers = [], []
    for rel in entry.layers:
        arr, problem = _read_rgba(root / rel, entry.size)
        problems += [problem] if problem else []
        layers.append(arr)
    stored, problem = _read_rgba(root / entry.composite, entry.size)
    problems += [problem] if problem else []
    if problems:
        return problems, None
    error = composite_error(layers, stored)
    if error > tolerance:
        problems.append(f"{root / entry.composite}: differs from the over-composition of its {len(layers)} components "
                        f"by up to {error:.1f} levels (tolerance {tolerance:g}); run `editkit layers prep` again")
    return problems, error


def validate_prepared(root: str | Path, tolerance: float = DEFAULT_TOLERANCE, workers: int = 1,
                      progress: bool = True) -> LayersReport:
    """Check a prepared layers folder (see the module docstring); a missing or damaged manifest is a UserError."""
    root = Path(root)
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be at least 0 (8-bit levels), got {tolerance}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    entries = read_prepared(root)
    problems: list[str] = []
    seen: set[str] = set()
    checkable = []
    on_disk, pngs = _disk_components(root)
    for entry in entries:
        if entry.id in seen:
            problems.append(f"{root / MANIFEST}: sample {entry.id!r} is listed twice")
            continue
        seen.add(entry.id)
        found = _entry_problems(root, entry)
        if not found:
            disk = on_disk.get((f"{entry.split}/{entry.bucket}", entry.id), set())
            found = _zorder_problems(root, entry, disk)
            if not (root / entry.composite).is_file():
                found.append(f"{root / entry.composite}: missing")
        problems += found
        if not found:
            checkable.append(entry)
    listed = {(f"{e.split}/{e.bucket}", e.id) for e in entries}
    for path in pngs:
        owner = _owner(path)
        if owner is None or (path.parent.relative_to(root).as_posix(), owner) not in listed:
            problems.append(f"{path}: no manifest entry lists it; remove it or run `editkit layers prep` again")
    results = parallel_map(check_sample, [(root, e, tolerance) for e in checkable], "layers validate", "samples",
                           workers, disable=not progress)
    errors = []
    for entry, (found, error) in zip(checkable, results):
        problems += found
        if error is not None:
            errors.append((entry.id, error))
    errors.sort(key=lambda item: (-item[1], item[0]))
    counts = {name: sum(1 for e in entries if e.split == name) for name in SPLITS}
    return LayersReport(len(entries), sum(len(e.layers) for e in entries), counts, problems, errors)


def _owner(path: Path) -> str | None:
    """The sample id a component or composite file name belongs to (None for other names)."""
    match = COMPONENT_RE.match(path.name)
    if match:
        return match["id"]
    return path.name[:-len(COMPOSITE_SUFFIX)] if path.name.endswith(COMPOSITE_SUFFIX) else None
