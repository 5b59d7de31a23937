"""`editkit layers ...`: prep, validate and synth for layered RGBA data, and decompose / infer with a
layer decomposer (thin wrappers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.infer.commands import (
    DeviceOpt,
    DtypeOpt,
    FamilyOpt,
    FuseOpt,
    LoraOpt,
    ModelOpt,
    SeedOpt,
    TransformerOpt,
)

layers_app = typer.Typer(help="Layered RGBA data, the RGBA-VAE and layer decomposition (Qwen-Image-Layered): prepare, validate, synthesize, convert, decompose, infer.",
                         no_args_is_help=True)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@layers_app.command("prep")
def prep(
    input: Annotated[Path, typer.Option("--input", help="A .psd/.psb file, or a folder of PSDs, Crello-style sample folders or split-layer folders.")],
    out: Annotated[Path, typer.Option(help="Output folder ({split}/{WxH}/ PNGs and metadata/manifest.json); re-running resumes.")],
    train_count: Annotated[int, typer.Option(help="Samples in the train split.")],
    val_count: Annotated[int, typer.Option(help="Samples in the val split.")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="psd, crello or layers (detected when left out).")] = None,
    multiple: Annotated[int, typer.Option(help="Sides become multiples of this (8, 16, 32 or 64).")] = 32,
    max_side: Annotated[int, typer.Option(help="Longest side at most this many pixels.")] = 1024,
    max_pixels: Annotated[int, typer.Option(help="At most this many pixels per image.")] = 1024 * 1024,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
    seed: Annotated[int, typer.Option(help="Shuffle seed of the train/val split.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo an OUT made with other settings or inputs (its outputs are removed first).")] = False,
) -> None:
    """Resize every sample's RGBA components and their composite into buckets, split train/val, resumably."""
    from editkit.layers.prep import prepare_layers

    result = prepare_layers(input, out, train_count, val_count, format=format, multiple=multiple, max_side=max_side,
                            max_pixels=max_pixels, workers=workers, seed=seed, overwrite=overwrite)
    splits = ", ".join(f"{name} {sum(1 for s in result.samples if s.split == name)}" for name in ("train", "val"))
    kept = f"; {result.reused} already prepared (kept)" if result.reused else ""
    failed = f"; {len(result.failed)} skipped (see above)" if result.failed else ""
    typer.echo(f"wrote {len(result.samples)} samples ({splits}){kept}{failed} to {result.manifest}")


@layers_app.command("validate")
def validate(
    out: Annotated[Path, typer.Argument(help="A folder written by `editkit layers prep`.")],
    tolerance: Annotated[float, typer.Option(help="Largest composite error allowed, in 8-bit levels.")] = 2.0,
    worst: Annotated[int, typer.Option(help="How many samples with the largest composite errors to list.")] = 5,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Check alpha, sizes, z-order and that each composite is the over-composition of its components. Exit 2 on problems."""
    from editkit.layers.validate import validate_prepared

    report = validate_prepared(out, tolerance=tolerance, workers=workers)
    if report.errors and worst > 0:
        shown = ", ".join(f"{sid} {err:.2f}" for sid, err in report.errors[:worst])
        typer.echo(f"largest composite errors (8-bit levels): {shown}")
    for line in report.problems:
        typer.echo(line)
    splits = ", ".join(f"{name} {count}" for name, count in report.counts.items())
    status = "no problems" if report.ok else f"{len(report.problems)} problems"
    typer.echo(f"{out}: {report.samples} samples ({splits}), {report.layers} components, {status}")
    if not report.ok:
        raise typer.Exit(2)


@layers_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (created; replaced only if it holds an earlier synthetic set).")],
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same scenes).")] = 0,
    size: Annotated[int, typer.Option(help="Long side of each scene in pixels.")] = 256,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = _default_workers(),
) -> None:
    """Draw synthetic layered scenes (2-8 RGBA layers with descriptions) as split-layer folders."""
    from editkit.layers.synth import synthesize_layers

    synthesize_layers(out, n=n, size=size, seed=seed, workers=workers)
    typer.echo(f"wrote {n} layered scenes to {out} (read them with `editkit layers prep --input {out}`)")


PromptOpt = Annotated[Optional[str], typer.Option("--prompt", help="A description of the image(s) (default: the model writes one, the pipeline's auto-caption).")]
LayerCfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="True CFG scale against --negative, 1 turns it off (default: the model's, 4).")]
LayerStepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (default: the model's, 50).")]
NegativeLayersOpt = Annotated[str, typer.Option("--negative", help="Negative prompt of true CFG.")]
NormalizeOpt = Annotated[bool, typer.Option("--cfg-normalize/--no-cfg-normalize", help="Rescale the guided prediction to the conditional one's norm (the model card's setting).")]
ResolutionOpt = Annotated[Optional[int], typer.Option("--resolution", help="Side of the square whose area the layers keep, at the image's aspect (default: the model's, 640; the released model knows 640 and 1024).")]
CaptionOpt = Annotated[str, typer.Option("--caption-language", help="Language of the auto-caption: en or cn.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images of one size decomposed together.")]


def _settings(layers: int | None, steps, cfg, seed, prompt, negative, cfg_normalize, resolution, caption_language,
              batch_size):
    from editkit.layers.decompose import DecomposeSettings

    return DecomposeSettings(layers=layers, steps=steps, cfg=cfg, seed=seed, prompt=prompt, negative_prompt=negative,
                             cfg_normalize=cfg_normalize, resolution=resolution, caption_language=caption_language,
                             batch_size=batch_size).check()


def _layer_count(text: str | None, allow_auto: bool):
    """--layers as a number (or "auto" where allowed); None: the default."""
    from editkit.errors import UserError

    if text is None or (allow_auto and text == "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--layers {text!r}: give a whole number of layers" + (" or auto" if allow_auto else "")) from None


@layers_app.command("decompose")
def decompose(
    model: ModelOpt,
    image: Annotated[list[Path], typer.Option("--image", help="Image to decompose (repeatable: images of one size run as a batch).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: layer_NN.png (bottom first), layers.psd, recomposite.png, run.json; OUT/<stem>/ each for several images.")],
    layers: Annotated[Optional[str], typer.Option("--layers", help="Layers per image (default: the model's, 4).")] = None,
    steps: LayerStepsOpt = None,
    cfg: LayerCfgOpt = None,
    seed: SeedOpt = 0,
    prompt: PromptOpt = None,
    negative: NegativeLayersOpt = " ",
    cfg_normalize: NormalizeOpt = True,
    resolution: ResolutionOpt = None,
    caption_language: CaptionOpt = "en",
    batch_size: BatchOpt = 4,
    family: FamilyOpt = None,
    transformer: TransformerOpt = None,
    lora: LoraOpt = None,
    fuse_lora: FuseOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Decompose images into RGBA layers with a Qwen-Image-Layered model; prints each recomposition's PSNR."""
    from editkit.layers.decompose import decompose_images, load_decomposer

    settings = _settings(_layer_count(layers, False), steps, cfg, seed, prompt, negative, cfg_normalize, resolution,
                         caption_language, batch_size)
    loaded, identity = load_decomposer(model, family, transformer, dtype, device, lora or [], fuse_lora)
    for result in decompose_images(loaded, identity, image, out, settings):
        typer.echo(f"{result.source}: {len(result.layers)} layers in {result.folder} (+ {result.psd.name}, "
                   f"{result.recomposite.name}); recomposition PSNR {result.psnr:.2f} dB")


@layers_app.command("infer")
def infer(
    model: ModelOpt,
    data: Annotated[Path, typer.Option("--data", help="A folder written by `editkit layers prep` (or its metadata/manifest.json), or any editkit manifest / dataset folder of images.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: <sample id>/layer_NN.png, run.json, fingerprint.json; re-running resumes.")],
    layers: Annotated[str, typer.Option("--layers", help="Layers per sample, or auto: the ground truth's count on `layers prep` data (else the model's, 4).")] = "auto",
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split of `layers prep` data: train or val (default: every sample).")] = None,
    steps: LayerStepsOpt = None,
    cfg: LayerCfgOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed of the first sample (sample i gets seed + i).")] = 0,
    prompt: PromptOpt = None,
    negative: NegativeLayersOpt = " ",
    cfg_normalize: NormalizeOpt = True,
    resolution: ResolutionOpt = None,
    caption_language: CaptionOpt = "en",
    batch_size: BatchOpt = 4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo an OUT made with other settings, model or data (its samples are removed first).")] = False,
    family: FamilyOpt = None,
    transformer: TransformerOpt = None,
    lora: LoraOpt = None,
    fuse_lora: FuseOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Decompose every sample of a dataset, sharded over torchrun processes, resumable (for `editkit eval --task layers`)."""
    from editkit.layers.decompose import infer_dataset, load_decomposer

    count = _layer_count(layers, True)
    settings = _settings(None if count == "auto" else count, steps, cfg, seed, prompt, negative, cfg_normalize,
                         resolution, caption_language, batch_size)
    loaded, identity = load_decomposer(model, family, transformer, dtype, device, lora or [], fuse_lora)
    result = infer_dataset(loaded, identity, data, out, settings, layers=count, split=split, overwrite=overwrite)
    kept = f"; {result.skipped} already decomposed (kept)" if result.skipped else ""
    typer.echo(f"decomposed {len(result.written)} sample(s) into {out}{kept}; score them with "
               f"`editkit eval --task layers --pred {out} --data {data}`")


def register(app: typer.Typer) -> None:
    """Add this area's commands (and the RGBA-VAE's, editkit.layers.vae_commands) to the editkit app."""
    from editkit.layers.vae_commands import register as register_vae

    register_vae(layers_app)
    app.add_typer(layers_app, name="layers")
