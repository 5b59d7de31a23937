"""Decompose images into RGBA layers with a Qwen-Image-Layered model: one image, a few, or a dataset.

`decompose_images` (`editkit layers decompose`): per image, `layer_00.png … layer_NN.png` (RGBA,
bottom / background first: the model's order, the paper's composition and the PSD's), `layers.psd`
(psd-tools; the same layers bottom first, named like the PNGs), `recomposite.png` (their
over-composition, editkit.layers.compose) and the recomposition PSNR against the input; one image
is written into OUT itself, several into OUT/<file stem>/ each. `run.json` records the settings
and each image's prompt (the auto-caption when none was given) and PSNR.

`infer_dataset` (`editkit layers infer`): every sample of a manifest into OUT/<sample id>/layer_NN.png,
the layout `editkit eval --task layers --pred OUT --data MANIFEST` reads, resized back to the
sample image's size (the model works at its resolution bucket) so that they align with its ground
truth. The samples come from a folder written by `editkit layers prep` (its composites; their
layer count is the ground truth's, for `--layers auto`) or from any editkit manifest / dataset
folder (each record's first source image, else its target). Like `editkit infer`: each torchrun
process takes every world-size-th sample (editkit.utils.dist), a sample's folder appears whole
(written beside and renamed), a re-run skips finished samples, and OUT/fingerprint.json (model,
settings, samples) refuses a re-run with other ones unless `overwrite` (which redoes this
process's samples). Sample i's seed is `seed + i` (its index in the manifest), so the layers do
not depend on sharding, batching or resuming.

The PSNR compares premultiplied RGBA in [0, 1] (colour times alpha, and alpha) of the recomposite
and of the input resized to the layer size as the model saw it: transparent pixels count by their
alpha only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from editkit.errors import UserError
from editkit.layers.compose import composite, premultiplied, to_uint8
from editkit.utils import dist
from editkit.utils.atomic import atomic_dir, atomic_path
from editkit.utils.fingerprint import claim_folder, file_digest, file_stamp, folder_stamp
from editkit.utils.progress import make_progress
from editkit.utils.runinfo import write_run_manifest

log = logging.getLogger(__name__)

LAYER_PATTERN = "layer_{:02d}.png"
LAYER_FILE = re.compile(r"^layer_(\d+)\.png$")
PSD_FILE = "layers.psd"
RECOMPOSITE_FILE = "recomposite.png"
RUN_MANIFEST = "run.json"
AUTO = "auto"
CAPTION_LANGUAGES = ("en", "cn")


def layer_name(index: int) -> str:
    """File name of layer `index` (0 = bottom)."""
    return LAYER_PATTERN.format(index)


def layer_files(folder: str | Path) -> list[Path]:
    """The layer_NN.png files of a sample folder, bottom first (by number, not by name: 100 sorts
    after 99); the one reader of the layout, for `layers infer` and `eval --task layers` alike."""
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if p.is_file() and (m := LAYER_FILE.match(p.name))]
    numbers = [n for n, _ in found]
    if len(set(numbers)) != len(numbers):
        raise UserError(f"{folder}: two layer files with one number (e.g. layer_1.png and layer_01.png); keep one")
    return [p for _, p in sorted(found)]


# ----- settings and the model ------------------------------------------------------------------

@dataclass(frozen=True)
class DecomposeSettings:
    """How to decompose; None means the model family's default."""

    layers: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int = 0
    prompt: str | None = None
    """One description for every image; None: each image's auto-caption."""
    negative_prompt: str | None = " "
    cfg_normalize: bool = True
    resolution: int | None = None
    """Side of the square whose area the layers keep (None: the model's, 640 for the released one)."""
    caption_language: str = "en"
    batch_size: int = 4

    def resolved(self, model) -> DecomposeSettings:
        """The settings with the family's defaults filled in, checked."""
        family = model.family
        filled = dataclasses.replace(self, layers=family.layers if self.layers is None else self.layers,
                                     steps=family.sampling.steps if self.steps is None else self.steps,
                                     cfg=family.sampling.cfg if self.cfg is None else self.cfg)
        return filled.check()

    def check(self) -> DecomposeSettings:
        from editkit.models.qwen_image_layered import check_layers, check_steps

        if self.layers is not None:
            check_layers(self.layers)
        if self.steps is not None:
            check_steps(self.steps)
        if self.cfg is not None and not (math.isfinite(self.cfg) and 0 <= self.cfg <= 100):
            raise UserError(f"--cfg {self.cfg}: give a guidance scale from 0 to 100 (1 turns true CFG off)")
        if self.resolution is not None and not 16 <= self.resolution <= 4096:
            raise UserError(f"--resolution {self.resolution}: give a side in pixels from 16 to 4096 (the released "
                            "model was trained on 640 and 1024)")
        if self.caption_language not in CAPTION_LANGUAGES:
            raise UserError(f"--caption-language {self.caption_language!r}: use one of {', '.join(CAPTION_LANGUAGES)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: use 1 or more images per batch")
        return self

    def fingerprint(self) -> dict:
        """What decides the layers (the batch size changes only rounding)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


def load_decomposer(model: str, family: str | None = None, transformer: str | Path | None = None,
                    dtype: str = "auto", device: str | None = None, loras: Sequence[str] = (),
                    fuse_lora: bool = False):
    """Load a model that decomposes (a Qwen-Image-Layered folder or `tiny:qwen-image-layered`), with
    LoRAs applied. Returns `(model, identity)`: `identity` says what about the weights decides the
    layers (for run manifests and fingerprints)."""
    from editkit.models import load_model
    from editkit.models.loading import resolve_dtype
    from editkit.models.lora import LoraSpec, apply_loras

    specs = [LoraSpec.parse(s) for s in loras]
    device = dist.resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    loaded = load_model(model, family=family, transformer=transformer, dtype=dtype, device=device)
    if not callable(getattr(loaded, "decompose", None)):
        raise UserError(f"{model}: a {loaded.family.name} model, which does not decompose images into layers; "
                        "give a Qwen-Image-Layered model (e.g. tiny:qwen-image-layered)")
    if specs:
        apply_loras(loaded.transformer, specs, fuse=fuse_lora)
    identity = {"model": str(model), "model_files": folder_stamp(model),
                "transformer": str(transformer) if transformer else None,
                "transformer_files": folder_stamp(transformer) if transformer else None,
                "family": loaded.family.name, "dtype": dtype,
                "lora": [[s.path, file_digest(s.path), s.scale] for s in specs]}
    return loaded, identity


# ----- layers, PSD, recomposition --------------------------------------------------------------

def recomposite(layers: Sequence[Image.Image]) -> Image.Image:
    """The over-composition of RGBA layers (bottom first) as an 8-bit RGBA image."""
    return Image.fromarray(to_uint8(composite([np.asarray(layer.convert("RGBA")) for layer in layers])), "RGBA")


def recomposition_psnr(recomposed: Image.Image, reference: Image.Image) -> float:
    """PSNR (dB) of premultiplied RGBA in [0, 1] between two images of one size (inf when equal)."""
    if recomposed.size != reference.size:
        raise ValueError(f"sizes differ: {recomposed.size} vs {reference.size}")
    a = premultiplied(np.asarray(recomposed.convert("RGBA")))
    b = premultiplied(np.asarray(reference.convert("RGBA")))
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def write_psd(path: str | Path, layers: Sequence[Image.Image]) -> Path:
    """A layered PSD (RGBA document, 8 bits) of `layers`, bottom first, named like the PNGs; atomically."""
    from psd_tools import PSDImage

    width, height = layers[0].size
    psd = PSDImage.new("RGBA", (width, height), color=(0, 0, 0, 0))
    for i, layer in enumerate(layers):
        psd.create_pixel_layer(layer.convert("RGBA"), name=Path(layer_name(i)).stem)
    with atomic_path(path) as tmp:
        psd.save(tmp)
    return Path(path)


def at_size(layer: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A layer resized to `size` (Pillow filters RGBA premultiplied: no dark fringes at alpha edges)."""
    return layer if layer.size == tuple(size) else layer.resize(size, Image.Resampling.LANCZOS)


def write_layer_pngs(folder: Path, layers: Sequence[Image.Image]) -> list[Path]:
    """layer_00.png … into `folder`, atomically each; layer PNGs of an earlier, longer decomposition go."""
    paths = []
    for i, layer in enumerate(layers):
        path = folder / layer_name(i)
        with atomic_path(path) as tmp:
            layer.save(tmp, format="PNG")
        paths.append(path)
    for stale in layer_files(folder)[len(layers):]:
        stale.unlink()
    return paths


# ----- a few images ----------------------------------------------------------------------------

@dataclass
class Decomposition:
    """What `decompose_images` wrote for one input image."""

    source: Path
    folder: Path
    layers: list[Path]
    psd: Path
    recomposite: Path
    psnr: float
    prompt: str


def _image_folders(out: Path, images: Sequence[Path]) -> list[Path]:
    """OUT for one image; OUT/<stem> (stem_2, … when stems repeat) for several."""
    if len(images) == 1:
        return [out]
    folders, seen = [], set()
    for image in images:
        name, n = image.stem, 1
        while name in seen:
            n += 1
            name = f"{image.stem}_{n}"
        seen.add(name)
        folders.append(out / name)
    return folders


def decompose_images(model, identity: dict, images: Sequence[str | Path], out: str | Path,
                     settings: DecomposeSettings, show_progress: bool = True) -> list[Decomposition]:
    """Decompose image files (see the module docstring); image i gets seed `settings.seed + i`."""
    from editkit.data.images import load_image

    if not images:
        raise UserError("no --image given; pass at least one image to decompose")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the layers")
    settings = settings.resolved(model)
    paths = [Path(p) for p in images]
    pictures = [load_image(p, "RGBA") for p in paths]  # a bad file is one line naming it, before any work
    prompts = _prompts(model, pictures, settings)
    with make_progress("step", disable=not show_progress) as progress:
        task = progress.add_task(f"decompose {len(paths)} image(s)", total=None, status="")

        def step(done, total):
            progress.update(task, completed=done, total=total)

        results = model.decompose(pictures, layers=settings.layers, steps=settings.steps, cfg=settings.cfg,
                                  seeds=[settings.seed + i for i in range(len(paths))], prompts=prompts,
                                  negative_prompt=settings.negative_prompt, cfg_normalize=settings.cfg_normalize,
                                  resolution=settings.resolution, max_batch=settings.batch_size, callback=step)
    written = []
    for path, picture, folder, prompt, layers in zip(paths, pictures, _image_folders(out, paths), prompts, results):
        folder.mkdir(parents=True, exist_ok=True)
        recomposed = recomposite(layers)
        with atomic_path(folder / RECOMPOSITE_FILE) as tmp:
            recomposed.save(tmp, format="PNG")
        psnr = recomposition_psnr(recomposed, model.layer_view(picture, settings.resolution))
        written.append(Decomposition(source=path, folder=folder, layers=write_layer_pngs(folder, layers),
                                     psd=write_psd(folder / PSD_FILE, layers), recomposite=folder / RECOMPOSITE_FILE,
                                     psnr=psnr, prompt=prompt))
    out.mkdir(parents=True, exist_ok=True)
    write_run_manifest(out, "layers decompose", {**settings.fingerprint(), **identity}, seed=settings.seed,
                       images=[{"source": str(d.source), "folder": str(d.folder), "layers": len(d.layers),
                                "prompt": d.prompt, "psnr": None if math.isinf(d.psnr) else round(d.psnr, 4)}
                               for d in written])
    return written


def _prompts(model, pictures: Sequence[Image.Image], settings: DecomposeSettings) -> list[str]:
    """Each image's description: `settings.prompt`, else its auto-caption."""
    if settings.prompt is not None and settings.prompt.strip():
        return [settings.prompt] * len(pictures)
    return model.caption(pictures, settings.caption_language, settings.resolution)


# ----- a dataset -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSample:
    """One image to decompose: its id (the output folder's name), file, and ground-truth layer count."""

    id: str
    image: Path
    layers: int | None = None


def read_samples(data: str | Path, split: str | None = None) -> tuple[list[LayerSample], bool]:
    """The samples of a `layers prep` folder (or its metadata/manifest.json) or of any editkit
    manifest / dataset folder, and whether they are layered (have a ground-truth layer count).
    `split` ("train" / "val") keeps one split of a layered folder."""
    from editkit.layers.records import MANIFEST, MANIFEST_FORMAT, SPLITS, read_prepared

    data = Path(data)
    root = _prepared_root(data, MANIFEST, MANIFEST_FORMAT)
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split!r}: use one of {', '.join(SPLITS)} (or leave it out for every sample)")
    if root is not None:
        entries = [e for e in read_prepared(root) if split is None or e.split == split]
        samples = [LayerSample(e.id, root / e.composite, len(e.layers)) for e in entries]
        if not samples:
            raise UserError(f"{data}: has no {split + ' ' if split else ''}samples to decompose")
        return samples, True
    if split is not None:
        raise UserError(f"--split {split}: {data} is not a folder written by `editkit layers prep`; leave --split out")
    from editkit.data.manifest import read_manifest

    samples = []
    for record in read_manifest(data):
        image = record.sources[0] if record.sources else record.target
        if image is None:
            raise UserError(f"{record.origin or record.id}: has no image to decompose (no source, no target)")
        samples.append(LayerSample(record.id, Path(image)))
    return samples, False


def _prepared_root(data: Path, manifest: Path, manifest_format: str) -> Path | None:
    """The root of a `layers prep` folder given as the folder or its manifest; None for other data."""
    if data.is_dir():
        return data if (data / manifest).is_file() else None
    if data.name == manifest.name and data.parent.name == manifest.parent.name:
        try:
            obj = json.loads(data.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(obj, dict) and obj.get("format") == manifest_format:
            return data.parent.parent
    return None


def sample_folder(out: Path, sample_id: str) -> Path:
    """OUT/<id> ('/' in an id makes subfolders; ids that would leave OUT are refused)."""
    rel = PurePosixPath(sample_id)
    if not sample_id or rel.is_absolute() or ".." in rel.parts or sample_id.startswith(".tmp-"):
        raise UserError(f"sample id {sample_id!r} cannot name an output folder; use ids without '..', a leading "
                        "'/' or '.tmp-'")
    return out.joinpath(*rel.parts)


def _samples_stamp(samples: Sequence[LayerSample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, str(s.image), file_stamp(s.image), s.layers]).encode())
    return h.hexdigest()


@dataclass
class InferResult:
    written: list[Path] = field(default_factory=list)
    skipped: int = 0


def infer_dataset(model, identity: dict, data: str | Path, out: str | Path, settings: DecomposeSettings,
                  layers: int | str = AUTO, split: str | None = None, overwrite: bool = False,
                  show_progress: bool = True) -> InferResult:
    """Decompose this process's share of a dataset's samples (see the module docstring).

    `layers`: a count, or "auto": each sample's ground-truth count on layered data, the family's
    default otherwise.
    """
    from editkit.data.images import load_image, oriented_size
    from editkit.models.qwen_image_layered import check_layers

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder (one subfolder per sample)")
    samples, layered = read_samples(data, split)
    if layers != AUTO:
        check_layers(layers)
    settings = dataclasses.replace(settings, layers=None if layers == AUTO else layers).resolved(model)
    counts = [s.layers if layers == AUTO and layered else settings.layers for s in samples]
    folders = [sample_folder(out, s.id) for s in samples]
    if len(set(folders)) < len(folders):
        raise UserError(f"{data}: two samples share an id; give each sample its own id")
    fingerprint = {**settings.fingerprint(), "layers": layers, **identity, "split": split,
                   "samples": _samples_stamp(samples)}
    mine = dist.shard(list(range(len(samples))))

    claim_folder(out, "layers infer", fingerprint, overwrite=overwrite, write=dist.rank() == 0)
    if overwrite:  # every rank its own samples, whether or not another rank has recorded the new fingerprint yet
        for i in mine:
            shutil.rmtree(folders[i], ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    result, todo = InferResult(), []
    for i in mine:
        _remove_stale(folders[i])
        if folders[i].is_dir():
            result.skipped += 1
        else:
            todo.append(i)
    if result.skipped:
        log.info("skipping %d finished sample(s) in %s", result.skipped, out)
    config = {**fingerprint, "data": str(data)}
    _write_manifest(out, config, settings.seed, len(samples))
    todo.sort(key=lambda i: (counts[i], oriented_size(samples[i].image)))  # batches of one shape
    window = settings.batch_size * 4
    with make_progress("img", disable=not show_progress) as progress:
        task = progress.add_task(f"layers infer rank {dist.rank()}/{dist.world_size()}", total=len(todo),
                                 status=f"skipped {result.skipped}" if result.skipped else "")
        for start in range(0, len(todo), window):
            chunk = todo[start:start + window]
            pictures = [load_image(samples[i].image, "RGBA") for i in chunk]
            decomposed = model.decompose(
                pictures, layers=[counts[i] for i in chunk], steps=settings.steps, cfg=settings.cfg,
                seeds=[settings.seed + i for i in chunk], prompts=[settings.prompt] * len(chunk),
                negative_prompt=settings.negative_prompt, cfg_normalize=settings.cfg_normalize,
                resolution=settings.resolution, caption_language=settings.caption_language,
                max_batch=settings.batch_size)
            for i, picture, layers_ in zip(chunk, pictures, decomposed):
                with atomic_dir(folders[i]) as tmp:
                    write_layer_pngs(tmp, [at_size(layer, picture.size) for layer in layers_])
                result.written.append(folders[i])
                progress.advance(task)
    _write_manifest(out, config, settings.seed, len(samples), finished=len(result.written) + result.skipped)
    return result


def _remove_stale(folder: Path) -> None:
    """What a killed `atomic_dir` write of `folder` left beside it."""
    for stale in [*folder.parent.glob(f".tmp-{folder.name}.????????"), folder.parent / f".tmp-old-{folder.name}"]:
        shutil.rmtree(stale, ignore_errors=True)


def _manifest_name() -> str:
    return RUN_MANIFEST if dist.world_size() == 1 else f"run-rank{dist.rank()}.json"


def _write_manifest(out: Path, config: dict, seed: int, total: int, finished: int | None = None) -> None:
    extra = {} if finished is None else {"finished": finished}
    write_run_manifest(out, "layers infer", config, seed=seed, name=_manifest_name(), records=total,
                       rank=dist.rank(), world_size=dist.world_size(), **extra)
