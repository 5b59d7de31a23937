"""`editkit layers prep`: bucketed RGBA components and composites from layered inputs.

Per sample, each layer (a full-canvas RGBA component, z-order kept) is resized to the sample's
bucket (`bucket_size`) and written as OUT/{split}/{WxH}/<id>_compXXX.png; the composite is the
over-composition (`compose.composite`) of the *resized, 8-bit* components, written as
<id>_composite.png, so `layers validate` can recompute it exactly. The split is by count after
a seeded shuffle of the samples sorted by id (first --train-count to train, the next
--val-count to val; the rest are not prepared).

Like `editkit data build`: a process pool with a progress bar, atomic writes, and
OUT/fingerprint.json (settings + every input file's size and mtime). A finished sample has a
record OUT/metadata/samples/<id>.json written after its PNGs; a re-run with the same fingerprint
skips those (resume after a kill), other settings or inputs are refused unless --overwrite
(which removes the earlier outputs first). A sample that cannot be read is skipped with one line
naming its file. OUT/metadata/manifest.json is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from editkit.data.images import SIZE_MULTIPLES
from editkit.errors import UserError
from editkit.layers.compose import composite, to_uint8
from editkit.layers.records import (
    MANIFEST,
    SPLITS,
    PreparedSample,
    SampleRef,
    bucket_name,
    component_name,
    composite_name,
    manifest_json,
)
from editkit.layers.sources import discover, open_sample
from editkit.utils.atomic import atomic_path, remove_stale_temp, write_json
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT
from editkit.utils.fingerprint import claim_folder, file_stamp
from editkit.utils.progress import console, parallel_map
from editkit.utils.runinfo import write_run_manifest

MAX_SIDE_LIMIT = 16384  # beyond this --max-side is a typo
SAMPLE_RECORDS = Path("metadata") / "samples"


def bucket_size(width: int, height: int, multiple: int = 32, max_side: int = 1024,
                max_pixels: int = 1024 * 1024) -> tuple[int, int]:
    """The (width, height) a width x height canvas is prepared at: aspect kept, never enlarged,
    scaled down until the long side is at most `max_side` and the area at most `max_pixels`, then
    each side rounded to a multiple of `multiple` (at least one) without breaking either cap."""
    if width < 1 or height < 1:
        raise ValueError(f"canvas size must be positive, got {width}x{height}")
    scale = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    cap = max(multiple, max_side // multiple * multiple)
    exact = (width * scale, height * scale)
    sides = [max(multiple, min(cap, round(v / multiple) * multiple)) for v in exact]
    while sides[0] * sides[1] > max_pixels:  # both rounded up: take back the one rounded up most
        grown = [s / v for s, v in zip(sides, exact)]
        i = 0 if grown[0] >= grown[1] else 1
        if sides[i] == multiple:
            i = 1 - i
        sides[i] -= multiple
    return sides[0], sides[1]


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    out: Path
    multiple: int = 32
    max_side: int = 1024
    max_pixels: int = 1024 * 1024
    resume: bool = False  # trust finished samples (only under the same fingerprint)


@dataclasses.dataclass(frozen=True)
class PrepResult:
    manifest: Path
    samples: list[PreparedSample]
    reused: int
    failed: list[str]  # one line per sample that could not be read


def _record_path(out: Path, sample_id: str) -> Path:
    return out / SAMPLE_RECORDS / f"{sample_id}.json"


def _finished(out: Path, sample_id: str) -> PreparedSample | None:
    """The record of a sample an earlier run finished, when it and all its files are there."""
    path = _record_path(out, sample_id)
    try:
        entry = PreparedSample.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError, UserError):
        return None
    files = [*entry.layers, entry.composite]
    return entry if all((out / f).is_file() for f in files) else None


def _save_png(arr: np.ndarray, dest: Path) -> None:
    remove_stale_temp(dest)  # what a killed write left (one process writes each sample)
    with atomic_path(dest) as tmp:
        Image.fromarray(arr, "RGBA").save(tmp, format="PNG", compress_level=4)


def prep_sample(args: tuple[SampleRef, str, PrepOptions]) -> tuple[PreparedSample | None, str | None, bool]:
    """(entry, problem, reused) for one sample; a UserError while reading it becomes the problem."""
    ref, split, opts = args
    if opts.resume:
        done = _finished(opts.out, ref.id)
        if done is not None and done.split == split:
            return done, None, True
    written: list[Path] = []
    try:
        sample = open_sample(ref)
        size = bucket_size(*sample.size, opts.multiple, opts.max_side, opts.max_pixels)
        bucket = bucket_name(size)
        folder = opts.out / split / bucket
        arrays, names = [], []
        for k, layer in enumerate(sample.layers):
            img = layer.image()
            if img.size != sample.size:
                raise UserError(f"{sample.source}: layer {k} renders at {img.size[0]}x{img.size[1]}, but the "
                                f"canvas is {sample.size[0]}x{sample.size[1]}")
            if img.size != size:
                img = img.resize(size, Image.Resampling.LANCZOS)  # Pillow resamples RGBA premultiplied
            arr = np.asarray(img.convert("RGBA"))
            names.append(component_name(ref.id, k))
            written.append(folder / names[-1])
            _save_png(arr, written[-1])
            arrays.append(arr)
        written.append(folder / composite_name(ref.id))
        _save_png(to_uint8(composite(arrays)), written[-1])
    except UserError as err:
        for path in written:  # a sample is prepared whole or not at all
            path.unlink(missing_ok=True)
        return None, str(err), False
    rel = f"{split}/{bucket}"
    entry = PreparedSample(id=ref.id, split=split, bucket=bucket, size=size, source_size=tuple(sample.size),
                           layers=[f"{rel}/{n}" for n in names], composite=f"{rel}/{composite_name(ref.id)}",
                           descriptions=[layer.description for layer in sample.layers],
                           kinds=[layer.kind for layer in sample.layers], source=sample.source)
    write_json(_record_path(opts.out, ref.id), entry.to_json())  # last: the sample is finished
    return entry, None, False


def split_samples(refs: list[SampleRef], train_count: int, val_count: int, seed: int) -> list[tuple[SampleRef, str]]:
    """(ref, split) for the first train_count + val_count samples of a seeded shuffle (refs sorted by id)."""
    order = np.random.default_rng(seed).permutation(len(refs))
    chosen = [refs[i] for i in order[:train_count + val_count]]
    return [(ref, "train" if rank < train_count else "val") for rank, ref in enumerate(chosen)]


def _inputs_stamp(refs: list[SampleRef]) -> str:
    h = hashlib.sha256()
    for ref in refs:
        files = [[str(f), *file_stamp(f)] for f in ref.files]
        h.update(json.dumps([ref.id, ref.format, str(ref.path), files]).encode())
    return h.hexdigest()


def _check_settings(train_count: int, val_count: int, multiple: int, max_side: int, max_pixels: int,
                    workers: int, seed: int) -> None:
    if train_count < 0 or val_count < 0 or train_count + val_count < 1:
        raise UserError(f"--train-count and --val-count must be at least 0 and together at least 1, "
                        f"got {train_count} and {val_count}")
    if multiple not in SIZE_MULTIPLES:
        raise UserError(f"--multiple must be one of {', '.join(map(str, SIZE_MULTIPLES))}, got {multiple}")
    if not multiple <= max_side <= MAX_SIDE_LIMIT:
        raise UserError(f"--max-side must be between --multiple ({multiple}) and {MAX_SIDE_LIMIT}, got {max_side}")
    if not multiple * multiple <= max_pixels <= MAX_SIDE_LIMIT * MAX_SIDE_LIMIT:
        raise UserError(f"--max-pixels must be between one {multiple}x{multiple} tile ({multiple * multiple}) and "
                        f"{MAX_SIDE_LIMIT * MAX_SIDE_LIMIT}, got {max_pixels}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")


def _claim(out: Path, inputs: dict, overwrite: bool) -> bool:
    """True when earlier work in `out` was made from the same settings and inputs (resume)."""
    outputs = [out / name for name in (*SPLITS, "metadata")]
    if not (out / FINGERPRINT).is_file() and any(p.exists() for p in outputs) and not overwrite:
        raise UserError(f"{out}: holds prepared layers without a fingerprint (an older editkit, or made by hand), "
                        "so they cannot be trusted; pass --overwrite to redo them, or choose a new --out folder")

    def clear() -> None:
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)

    return claim_folder(out, "layers prep", inputs, overwrite=overwrite, clear=clear)


def prepare_layers(input: str | Path, out: str | Path, train_count: int, val_count: int, format: str | None = None,
                   multiple: int = 32, max_side: int = 1024, max_pixels: int = 1024 * 1024, workers: int = 1,
                   seed: int = 0, overwrite: bool = False, progress: bool = True) -> PrepResult:
    """Prepare the layered samples under `input` into `out` (see the module docstring)."""
    out = Path(out)
    _check_settings(train_count, val_count, multiple, max_side, max_pixels, workers, seed)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose an output folder for --out")
    fmt, refs = discover(input, format)
    wanted = train_count + val_count
    if wanted > len(refs):
        raise UserError(f"{input}: holds {len(refs)} {fmt} samples, but --train-count {train_count} + "
                        f"--val-count {val_count} ask for {wanted}; lower the counts")
    settings = {"format": fmt, "multiple": multiple, "max_side": max_side, "max_pixels": max_pixels,
                "train_count": train_count, "val_count": val_count, "seed": seed}
    resume = _claim(out, {**settings, "inputs": _inputs_stamp(refs)}, overwrite)
    opts = PrepOptions(out.resolve(), multiple, max_side, max_pixels, resume)
    jobs = [(ref, split, opts) for ref, split in split_samples(refs, train_count, val_count, seed)]
    results = parallel_map(prep_sample, jobs, "layers prep", "samples", workers, disable=not progress)
    failed = [msg for _, msg, _ in results if msg]
    for msg in failed:
        console.print(f"skipped {msg}", markup=False, highlight=False, soft_wrap=True)
    samples = sorted((e for e, _, _ in results if e is not None), key=lambda e: (SPLITS.index(e.split), e.id))
    if not samples:
        raise UserError(f"{input}: none of the {len(jobs)} samples could be prepared (first problem: {failed[0]})")
    reused = sum(1 for _, _, r in results if r)
    counts = {name: sum(1 for s in samples if s.split == name) for name in SPLITS}
    write_run_manifest(out / "metadata", "layers prep", {**settings, "input": str(input)}, seed=seed,
                       name="prep.json", prepared=len(samples), reused=reused, failed=len(failed), counts=counts)
    manifest = out / MANIFEST
    write_json(manifest, manifest_json(samples))
    return PrepResult(manifest, samples, reused, failed)
