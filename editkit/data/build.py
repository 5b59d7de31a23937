"""`editkit data build`: a clean, self-contained dataset from folders (or any manifest).

Every image goes through the image policy (EXIF orientation, RGB, optional resize to a pixel
area with sides a multiple of 16/32) and is written as PNG under OUT/images/<id>/; masks are
binarised and sized to their target. Work runs in a process pool with a progress bar; each
file is written atomically. OUT/fingerprint.json records the settings and the input records
(ids, texts, file sizes and times); a re-run with the same fingerprint skips records whose
files all exist, so a killed build resumes where it stopped, and a re-run with other settings
or data is refused unless `overwrite` (which removes the earlier images first). A folder with
build outputs but no fingerprint is never trusted. The manifest (pairs format, paths relative
to OUT) is written last.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from PIL import Image

from editkit.data.folder import IMAGE_DIRS, parse_layout
from editkit.data.images import load_image, load_mask, resize_to_area
from editkit.data.manifest import raise_first_problem, write_manifest
from editkit.data.records import EditRecord
from editkit.data.tools import plain_name, where
from editkit.errors import UserError
from editkit.utils.atomic import atomic_path, remove_stale_temp
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT
from editkit.utils.fingerprint import claim_folder, records_stamp
from editkit.utils.progress import console, parallel_map
from editkit.utils.runinfo import write_run_manifest

MAX_AREA = 4096 * 4096  # beyond this --area is a typo (1e11 would ask for a 300 GB image)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    out: Path
    area: int | None = None
    multiple: int = 32
    resume: bool = False  # trust finished records (only under the same fingerprint)


def _outputs(record: EditRecord, out: Path) -> dict[str, Path]:
    folder = out / "images" / record.id
    paths = {f"source_{i}": folder / f"source_{i}.png" for i in range(len(record.sources))}
    for attr in ("target", "mask", "ref_gt"):
        if getattr(record, attr) is not None:
            paths[attr] = folder / f"{attr}.png"
    return paths


def _save(img: Image.Image, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        img.save(tmp, format="PNG")


def _sized(img: Image.Image, opts: BuildOptions) -> Image.Image:
    return resize_to_area(img, opts.area, opts.multiple) if opts.area else img


def build_record(args: tuple[EditRecord, BuildOptions]) -> tuple[EditRecord | None, str | None, bool]:
    """(built record, problem, skipped): process one record's images; a UserError becomes the problem."""
    record, opts = args
    outputs = _outputs(record, opts.out)
    built = dataclasses.replace(
        record, sources=[outputs[f"source_{i}"] for i in range(len(record.sources))],
        target=outputs.get("target"), mask=outputs.get("mask"), ref_gt=outputs.get("ref_gt"),
        metadata=dict(record.metadata))
    for path in outputs.values():
        remove_stale_temp(path)  # what a killed build left (one process builds each record)
    if opts.resume and all(p.is_file() for p in outputs.values()):
        return built, None, True
    try:
        images = {f"source_{i}": _sized(load_image(p), opts) for i, p in enumerate(record.sources)}
        for attr in ("target", "ref_gt"):
            if getattr(record, attr) is not None:
                images[attr] = _sized(load_image(getattr(record, attr)), opts)
        if record.mask is not None:
            reference = images.get("target", images.get("source_0"))
            images["mask"] = load_mask(record.mask, size=reference.size if reference is not None else None)
    except UserError as err:
        return None, f"{where(record)}: {err}", False
    for key, img in images.items():
        _save(img, outputs[key])
    return built, None, False


def records_from_folders(sources: Path | None = None, targets: Path | None = None, masks: Path | None = None,
                         ref_gt: Path | None = None, prompts: Path | None = None,
                         fields: dict[str, str] | None = None) -> list[EditRecord]:
    """Records matched by id across separate image folders and a prompts file (see editkit.data.folder)."""
    given = {"sources": sources, "targets": targets, "masks": masks, "ref_gt": ref_gt}
    for name, path in given.items():
        if path is not None and not path.is_dir():
            raise UserError(f"{path}: --{name.replace('_', '-')} folder not found; give an existing folder")
    if prompts is None:
        raise UserError("--prompts is required with image folders (prompts.jsonl, .csv or .txt with one entry per id)")
    good, problems = parse_layout({name: given[name] for name in IMAGE_DIRS}, prompts, fields)
    raise_first_problem(problems)
    return [r for _, r in good]


def _claim(out: Path, records: list[EditRecord], area: int | None, multiple: int, manifest_name: str,
           overwrite: bool) -> bool:
    """True when earlier work in `out` was made from the same settings and records (resume)."""
    unclaimed = not (out / FINGERPRINT).is_file() and ((out / "images").exists() or (out / manifest_name).exists())
    if unclaimed and not overwrite:
        raise UserError(f"{out}: holds a built dataset without a fingerprint (an older editkit, or made by hand), so "
                        "its images cannot be trusted; pass --overwrite to rebuild it, or choose a new --out folder")
    inputs = {"area": area, "multiple": multiple, "records": records_stamp(records)}

    def clear() -> None:
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in (manifest_name, "build.json"):
            (out / name).unlink(missing_ok=True)

    return claim_folder(out, "data build", inputs, overwrite=overwrite, clear=clear)


def build_dataset(records: list[EditRecord], out: str | os.PathLike, area: int | None = None, multiple: int = 32,
                  workers: int = 1, manifest_name: str = "manifest.jsonl", progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Normalise every record's images into `out`; returns the written manifest. Resumable under
    the same fingerprint; other settings or records need `overwrite` (see the module docstring)."""
    out = Path(out)
    if multiple not in (16, 32):
        raise UserError(f"--multiple must be 16 or 32, got {multiple}")
    if area is not None and area < multiple * multiple:
        raise UserError(f"--area {area} is smaller than one {multiple}x{multiple} tile")
    if area is not None and area > MAX_AREA:
        raise UserError(f"--area {area} is more than {MAX_AREA} pixels (4096x4096); leave --area out to keep the "
                        "images' own sizes")
    if not records:
        raise UserError("no records to build; check the input dataset")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose an output folder for --out")
    for record in records:
        plain_name(record.id or "", f"{where(record)}: id")  # each record's images go to OUT/images/<id>/
    resume = _claim(out, records, area, multiple, manifest_name, overwrite)
    opts = BuildOptions(out.resolve(), area, multiple, resume)
    jobs = [(r, opts) for r in records]
    results = parallel_map(build_record, jobs, "building", "records", workers, chunksize=4, disable=not progress)
    built = [r for r, _, _ in results if r is not None]
    failed = [msg for _, msg, _ in results if msg]
    skipped = sum(1 for _, _, s in results if s)
    for msg in failed:
        console.print(f"skipped {msg}", markup=False, highlight=False, soft_wrap=True)
    if skipped:
        console.print(f"{skipped} records already built (kept)", markup=False)
    manifest = write_manifest(built, out / manifest_name, "pairs")
    write_run_manifest(out, "data build", {"area": area, "multiple": multiple, "records": len(records)},
                       name="build.json", built=len(built), failed=len(failed), reused=skipped)
    return manifest

