"""`editkit data ...`: validate, convert, build, split, select, preview, mix and synth (thin wrappers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

data_app = typer.Typer(help="Prepare datasets: validate, convert, build, split, select, preview, synthesize.",
                       no_args_is_help=True)

FormatOpt = Annotated[Optional[str], typer.Option("--format", "-f", help="diffsynth, pairs or folder (detected when left out).")]
FieldOpt = Annotated[Optional[list[str]], typer.Option("--field", help="NAME=COLUMN when the file names a field differently, e.g. prompt=caption (repeatable).")]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _at_least_one(value: int, flag: str, most: int | None = None) -> int:
    """A count flag's value, checked to lie in 1..most (one line naming the flag otherwise)."""
    from editkit.errors import UserError

    if value < 1 or (most is not None and value > most):
        bound = f" and at most {most}" if most is not None else ""
        raise UserError(f"{flag} must be at least 1{bound}, got {value}")
    return value


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (created; replaced only if it holds an earlier synthetic set).")],
    n: Annotated[int, typer.Option(help="Number of samples.")] = 1000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of samples in val.jsonl.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of samples in test.jsonl.")] = 0.1,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Draw the synthetic shapes-editing dataset (PNGs + train/val/test .jsonl in the pairs format)."""
    from editkit.data.synth import synthesize

    paths = synthesize(out, n=n, size=size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                       workers=_at_least_one(workers, "--workers"))
    typer.echo(f"wrote {n} samples to {out} ({', '.join(p.name for p in paths.values())}, preview.png)")


def _fields(field: list[str] | None) -> dict[str, str]:
    from editkit.data.manifest import parse_field_overrides

    return parse_field_overrides(field)


def _table_schema(to: str) -> str:
    from editkit.errors import UserError

    if to.lower() not in ("pairs", "editkit", "diffsynth"):
        raise UserError(f"--to {to!r}: use pairs or diffsynth")
    return to.lower()


def _output_format(out: Path, to: str | None) -> str:
    """--to, else "folder" for a path without extension, else the pairs schema."""
    if to:
        return to
    return "folder" if out.suffix == "" else "pairs"


@data_app.command("validate")
def validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest file (.json/.jsonl/.csv) or dataset folder.")],
    format: FormatOpt = None,
    field: FieldOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes for decoding images.")] = _default_workers(),
    no_images: Annotated[bool, typer.Option("--no-images", help="Check the manifest only, not the image files.")] = False,
) -> None:
    """Check a manifest: files exist and decode, masks match their image, instructions non-empty. Exit 2 on problems."""
    from editkit.data.validate import validate_manifest

    report = validate_manifest(manifest, format, _fields(field), workers=_at_least_one(workers, "--workers"),
                               check_images=not no_images)
    for line in report.lines():
        typer.echo(line)
    warned = ""
    if report.warnings:
        counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.warning_counts().items()))
        warned = f"; {len(report.warnings)} warning{'s' * (len(report.warnings) != 1)} ({counts})"
    if report.ok:
        typer.echo(f"{manifest}: {report.records} records, no problems{warned}")
        return
    counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.counts().items()))
    typer.echo(f"{manifest}: {report.records} records, {len(report.problems)} problems ({counts}){warned}")
    raise typer.Exit(2)



@data_app.command("convert")
def convert(
    source: Annotated[Path, typer.Argument(help="Input manifest file or dataset folder (or a benchmark copy, with --from).")],
    out: Annotated[Path, typer.Argument(help="Output manifest (.json/.jsonl/.csv) or folder (no extension).")],
    to: Annotated[Optional[str], typer.Option("--to", help="diffsynth, pairs or folder (default: folder for a path without extension, else pairs).")] = None,
    format: FormatOpt = None,
    field: FieldOpt = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Read SOURCE as a benchmark copy: gedit, imgedit, magicbrush or piebench (masks and embedded images go to OUT_DIR/<stem>_files/).")] = None,
    lang: Annotated[Optional[str], typer.Option("--lang", help="With --from gedit: the languages to keep, e.g. en or en,cn (default: both).")] = None,
) -> None:
    """Convert a manifest between formats (nothing is lost: extra fields travel as metadata), or a benchmark into a manifest."""
    from editkit.data.manifest import read_manifest, write_manifest

    if from_ is not None:
        from editkit.data.benchmarks import convert_benchmark, parse_languages
        from editkit.errors import UserError

        if format is not None or field:
            raise UserError("--format and --field read manifests; --from reads the benchmark's own layout")
        records = convert_benchmark(from_, source, out, _output_format(out, to), parse_languages(lang))
        typer.echo(f"wrote {len(records)} {from_} records to {out}")
        return
    if lang is not None:
        from editkit.errors import UserError

        raise UserError("--lang applies to --from gedit only")
    records = read_manifest(source, format, _fields(field))
    write_manifest(records, out, _output_format(out, to))
    typer.echo(f"wrote {len(records)} records to {out}")


@data_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Output folder (images/ and manifest.jsonl); re-running resumes.")],
    source: Annotated[Optional[Path], typer.Argument(help="Dataset folder (sources/, targets/, masks/, prompts file) or any manifest.")] = None,
    sources: Annotated[Optional[Path], typer.Option(help="Folder of source images (instead of SOURCE).")] = None,
    targets: Annotated[Optional[Path], typer.Option(help="Folder of target images.")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Folder of masks (white = edit region).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts file: .jsonl/.csv with id + instruction, or .txt 'id<TAB>instruction'.")] = None,
    area: Annotated[Optional[int], typer.Option(help="Resize images to about this many pixels (e.g. 1048576), aspect kept.")] = None,
    multiple: Annotated[int, typer.Option(help="Sides become multiples of this (16 or 32) when --area is given.")] = 32,
    format: FormatOpt = None,
    field: FieldOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild an OUT made with other settings or data (its images are removed first).")] = False,
) -> None:
    """Build a clean dataset (PNG, EXIF applied, binarised masks, optional resize) from folders, resumably."""
    from editkit.data.build import build_dataset, records_from_folders
    from editkit.data.manifest import read_manifest
    from editkit.errors import UserError

    folders = any(p is not None for p in (sources, targets, masks, prompts))
    if folders == (source is not None):
        raise UserError("give either SOURCE (a dataset folder or manifest) or --sources/--targets/--masks/--prompts")
    if folders:
        records = records_from_folders(sources, targets, masks, None, prompts, _fields(field))
    else:
        records = read_manifest(source, format, _fields(field))
    manifest = build_dataset(records, out, area=area, multiple=multiple, workers=_at_least_one(workers, "--workers"),
                             overwrite=overwrite)
    typer.echo(f"wrote {manifest}")


@data_app.command("split")
def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest file or dataset folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for one manifest per split.")],
    fractions: Annotated[str, typer.Option(help="NAME=FRACTION,... (normalised).")] = "train=0.9,val=0.05,test=0.05",
    seed: Annotated[int, typer.Option(help="Shuffle seed (same seed, same split).")] = 0,
    to: Annotated[str, typer.Option("--to", help="Output schema: pairs or diffsynth.")] = "pairs",
    ext: Annotated[str, typer.Option(help="Output extension: jsonl, json or csv.")] = "jsonl",
    format: FormatOpt = None,
    field: FieldOpt = None,
) -> None:
    """Split a manifest deterministically into OUT/<name>.<ext> files (an empty split is written
    empty, and every reader refuses it)."""
    from editkit.data.manifest import read_manifest, write_manifest
    from editkit.data.tools import parse_weights, split_paths, split_records

    schema, weights = _table_schema(to), parse_weights(fractions)
    paths = split_paths(out, list(weights), ext)
    records = read_manifest(manifest, format, _fields(field))
    parts = split_records(records, weights, seed)
    for name, part in parts.items():
        write_manifest(part, paths[name], schema)
    typer.echo(", ".join(f"{name}: {len(part)}" for name, part in parts.items()))
    empty = [name for name, part in parts.items() if not part]
    if empty:
        typer.echo(f"note: {', '.join(empty)} got no records (the file is empty); give more records or larger fractions")


@data_app.command("select")
def select(
    manifest: Annotated[Path, typer.Argument(help="Manifest file or dataset folder.")],
    out: Annotated[Path, typer.Option(help="Output manifest (.json/.jsonl/.csv).")],
    top: Annotated[int, typer.Option(help="How many records to keep.")],
    by: Annotated[str, typer.Option(help="Metadata field holding the score (dotted for nested).")],
    ascending: Annotated[bool, typer.Option(help="Keep the lowest scores instead of the highest.")] = False,
    skip_missing: Annotated[bool, typer.Option(help="Skip records without a numeric score instead of failing.")] = False,
    to: Annotated[str, typer.Option("--to", help="Output schema: pairs or diffsynth.")] = "pairs",
    format: FormatOpt = None,
    field: FieldOpt = None,
) -> None:
    """Keep the top N records by a score in their metadata (e.g. a 1000-sample evaluation subset)."""
    from editkit.data.manifest import read_manifest, write_manifest
    from editkit.data.tools import select_top

    records = read_manifest(manifest, format, _fields(field))
    chosen = select_top(records, top, by, ascending=ascending, skip_missing=skip_missing)
    write_manifest(chosen, out, _table_schema(to))
    typer.echo(f"wrote {len(chosen)} of {len(records)} records to {out}")


@data_app.command("preview")
def preview(
    manifest: Annotated[Path, typer.Argument(help="Manifest file or dataset folder.")],
    out: Annotated[Path, typer.Option(help="The HTML page to write (one self-contained file).")],
    page_size: Annotated[int, typer.Option(help="Records per page.")] = 50,
    thumb: Annotated[int, typer.Option(help="Thumbnail size in pixels (longest side, at most 512).")] = 192,
    limit: Annotated[int, typer.Option(help="Show at most this many records (the first ones; every thumbnail is embedded).")] = 2000,
    title: Annotated[Optional[str], typer.Option(help="Page title (default: the manifest's path).")] = None,
    format: FormatOpt = None,
    field: FieldOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes for the thumbnails.")] = _default_workers(),
) -> None:
    """Write a page to look at a dataset: images, mask overlay, instructions, metadata; filters by task and score; paging."""
    from editkit.data.manifest import read_manifest
    from editkit.data.preview import write_preview

    records = read_manifest(manifest, format, _fields(field))
    write_preview(records, out, title or f"Preview of {manifest}", page_size=page_size, thumb_px=thumb,
                  limit=limit, workers=_at_least_one(workers, "--workers"))
    typer.echo(f"wrote {out} ({min(len(records), limit)} of {len(records)} records)")


@data_app.command("mix")
def mix(
    root: Annotated[Path, typer.Argument(help="Folder whose sub-folders are datasets.")],
    weights: Annotated[Optional[str], typer.Option(help="Dataset weights NAME=W,... (unlisted datasets excluded; default: all equal).")] = None,
    source_weights: Annotated[Optional[str], typer.Option(help="Weights by number of source images, e.g. 0=1,1=1,2=1,3=0.")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size per rank.")] = 4,
    steps: Annotated[int, typer.Option(help="Steps to draw.")] = 1000,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    split: Annotated[str, typer.Option(help="Manifest name to use in each dataset folder (train -> train.jsonl).")] = "train",
) -> None:
    """Preview a dataset mixture: how often each dataset and source-image count is drawn."""
    from editkit.data.mixing import open_mixture, preview_mixture

    _at_least_one(steps, "--steps", most=1_000_000)
    _at_least_one(batch_size, "--batch-size")
    sampler = open_mixture(root, batch_size, weights, source_weights, seed=seed, split=split, rank=0, world_size=1)
    preview = preview_mixture(sampler, steps)
    typer.echo(f"{preview.records} records; batches drawn over {preview.steps} steps:")
    for name, share in preview.dataset_shares.items():
        typer.echo(f"  dataset {name}: {share:.3f} (weight {preview.dataset_weights[name]:.3f})")
    for k, share in preview.count_shares.items():
        typer.echo(f"  {k} source image(s): {share:.3f}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.add_typer(data_app, name="data")
