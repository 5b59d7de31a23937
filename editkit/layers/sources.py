"""Readers of layered inputs: PSD/PSB files, Crello-style folders and folders of split RGBA layers.

`discover(INPUT, format)` lists the samples (`SampleRef`s, sorted by id) without decoding pixels;
`open_sample(ref)` opens one as a `LayeredSample` whose layers render on demand. Every problem
is a `UserError` naming the file. The formats (docs/layers.md has the details):

- psd: INPUT is a .psd/.psb file or a folder searched recursively for them; the id is the path
  below INPUT without its suffix ("/" becomes "__"). Groups are flattened into their children:
  every visible leaf layer (pixel, type, shape, smart object, fill) is one component, rendered by
  psd-tools at full canvas with its mask, opacity, effects and clipping layers (which are merged
  into the layer they clip, not components of their own); the opacities of its enclosing groups
  multiply its alpha. Adjustment layers and layers without pixels are left out. Blend modes other
  than normal are not reproduced: the composite is always the over-composition of the components.
- crello: INPUT/<sample>/layout.json (or INPUT/layout.json for one sample) plus the component
  images it names; see `_read_layout` for the schema.
- layers: INPUT/<sample>/ holds one image per layer, bottom first by name (numbers compared as
  numbers), all of one size, with an optional descriptions.json or descriptions.txt.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image

from editkit.data.folder import IMAGE_EXTENSIONS
from editkit.data.images import load_image, oriented_size
from editkit.data.tools import plain_name
from editkit.errors import UserError
from editkit.layers.records import FORMATS, Layer, LayeredSample, SampleRef

PSD_SUFFIXES = (".psd", ".psb")
LAYOUT_FILE = "layout.json"
DESCRIPTION_FILES = ("descriptions.json", "descriptions.txt")


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def natural_key(name: str) -> list:
    """Sort key comparing runs of digits as numbers: layer2 < layer10."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _sample_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_format(root: Path) -> str:
    """psd for a .psd/.psb file or a folder holding some; crello when sample folders hold layout.json;
    else layers."""
    if root.is_file():
        if root.suffix.lower() in PSD_SUFFIXES:
            return "psd"
        raise UserError(f"{root}: --input is a file but not a .psd/.psb; give a PSD file or a folder of samples")
    if any(p.suffix.lower() in PSD_SUFFIXES for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        return "psd"
    if (root / LAYOUT_FILE).is_file() or any((d / LAYOUT_FILE).is_file() for d in _sample_dirs(root)):
        return "crello"
    return "layers"


def discover(root: str | Path, format: str | None = None) -> tuple[str, list[SampleRef]]:
    """(format, samples sorted by id) found under `root`; `format` None detects it."""
    if not Path(root).exists():
        raise UserError(f"{root}: --input not found; give a PSD file or a folder of samples")
    root = Path(root).resolve()  # the fingerprint and the manifest name inputs by absolute path
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format!r}: use one of {', '.join(FORMATS)} (or leave it out to detect it)")
    fmt = format or detect_format(root)
    if fmt != "psd" and not root.is_dir():
        raise UserError(f"{root}: --format {fmt} reads a folder of samples, and this is a file")
    refs = {"psd": _discover_psd, "crello": _discover_crello, "layers": _discover_layers}[fmt](root)
    if not refs:
        raise UserError(f"{root}: no {fmt} samples found (see docs/layers.md for the layout of each --format)")
    seen: dict[str, SampleRef] = {}
    for ref in sorted(refs, key=lambda r: r.id):
        plain_name(ref.id, f"{ref.path}: sample id")
        if ref.id in seen:
            raise UserError(f"{ref.path} and {seen[ref.id].path} both become sample id {ref.id!r}; rename one")
        seen[ref.id] = ref
    return fmt, list(seen.values())


def _discover_psd(root: Path) -> list[SampleRef]:
    if root.is_file():
        return [SampleRef(root.stem, "psd", root, (root,))]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PSD_SUFFIXES
                   and not p.name.startswith("."))
    return [SampleRef("__".join(p.relative_to(root).with_suffix("").parts), "psd", p, (p,)) for p in files]


def _discover_crello(root: Path) -> list[SampleRef]:
    if (root / LAYOUT_FILE).is_file():
        folders = [root]  # INPUT itself is one sample
    else:
        folders = [d for d in _sample_dirs(root) if (d / LAYOUT_FILE).is_file()]
    return [SampleRef(d.name, "crello", d, tuple(_visible_files(d))) for d in folders]


def _discover_layers(root: Path) -> list[SampleRef]:
    folders = [d for d in _sample_dirs(root) if any(_is_image(p) for p in d.iterdir())]
    if not folders and any(_is_image(p) for p in root.iterdir()):
        folders = [root]  # INPUT itself is one sample
    return [SampleRef(d.name, "layers", d, tuple(_visible_files(d))) for d in folders]


def open_sample(ref: SampleRef) -> LayeredSample:
    """The sample's canvas size and layers (pixels rendered on demand); a UserError naming the file."""
    return {"psd": _open_psd, "crello": _open_crello, "layers": _open_layers}[ref.format](ref)


# -- psd ------------------------------------------------------------------------------------------

def _open_psd(ref: SampleRef) -> LayeredSample:
    from psd_tools import PSDImage
    from psd_tools.api.layers import AdjustmentLayer

    try:
        psd = PSDImage.open(ref.path)
    except Exception as err:  # psd-tools raises many types for a damaged file
        raise UserError(f"{ref.path}: cannot be read as a PSD/PSB ({err.__class__.__name__}: {err}); "
                        "re-save it from an image editor") from None
    layers = []
    for layer in psd.descendants(include_clip=False):  # bottom to top; clipping layers go with their base
        if layer.is_group() or isinstance(layer, AdjustmentLayer) or not layer.is_visible():
            continue
        left, top, right, bottom = layer.bbox
        if right <= left or bottom <= top:
            continue  # no pixels
        layers.append(Layer(_psd_render(ref, psd, layer), description=layer.name, kind=layer.kind))
    if not layers:
        raise UserError(f"{ref.path}: has no visible layers with pixels (a flattened PSD has no layers to split)")
    return LayeredSample(ref.id, psd.size, layers, str(ref.path))


def _group_opacity(layer) -> float:
    """The product of the opacities of the groups enclosing `layer` (psd-tools applies the layer's own)."""
    scale, parent = 1.0, layer.parent
    while parent is not None and parent.kind == "group":
        scale *= parent.opacity / 255.0
        parent = parent.parent
    return scale


def _psd_render(ref: SampleRef, psd, layer):
    def render() -> Image.Image:
        try:
            img = layer.composite(viewport=psd.viewbox, color=0.0, alpha=0.0)
        except Exception as err:
            raise UserError(f"{ref.path}: layer {layer.name!r} cannot be rendered ({err.__class__.__name__}: {err})") \
                from None
        if img is None:
            return Image.new("RGBA", psd.size, (0, 0, 0, 0))
        img = img.convert("RGBA")
        scale = _group_opacity(layer)
        if scale < 1.0:
            img.putalpha(img.getchannel("A").point(lambda v: round(v * scale)))
        return img

    return render


# -- crello ---------------------------------------------------------------------------------------

def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a number, got {value!r}")
    return float(value)


def _positive_int(value, where: str) -> int:
    number = _number(value, where)
    if number < 1 or number != int(number):
        raise UserError(f"{where} must be a positive whole number, got {value!r}")
    return int(number)


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}")
    return value


def _read_layout(folder: Path) -> tuple[tuple[int, int], list[dict]]:
    """The canvas size and components (sorted by z, ties in list order) of folder/layout.json:

    {"canvas_width": W, "canvas_height": H,
     "components": [{"file": "c0.png", "bbox": [left, top, width, height], "z": 0,
                     "type": "image", "description": "...", "opacity": 1.0}, ...]}

    `file` is relative to the folder; `bbox` (canvas pixels, rounded) defaults to the whole canvas,
    and the image is resized to the bbox when its size differs; `z` defaults to the list position;
    `type`, `description` default to "" and `opacity` (0..1, multiplies alpha) to 1.
    """
    path = folder / LAYOUT_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read as JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: must hold a JSON object with canvas_width, canvas_height and components")
    size = (_positive_int(obj.get("canvas_width"), f"{path}: canvas_width"),
            _positive_int(obj.get("canvas_height"), f"{path}: canvas_height"))
    items = obj.get("components")
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: components must be a non-empty list")
    components = []
    for i, item in enumerate(items):
        where = f"{path}: components[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} must be an object with at least \"file\"")
        name = item.get("file")
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{where}.file must be a file name inside {folder}, got {name!r}")
        file = folder / name
        if not file.is_file():
            raise UserError(f"{where}.file: {file} not found")
        bbox = item.get("bbox", [0, 0, size[0], size[1]])
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise UserError(f"{where}.bbox must be [left, top, width, height], got {bbox!r}")
        left, top, width, height = (round(_number(v, f"{where}.bbox")) for v in bbox)
        if width < 1 or height < 1:
            raise UserError(f"{where}.bbox width and height must be at least 1 pixel, got {bbox!r}")
        z = item.get("z", i)
        if isinstance(z, bool) or not isinstance(z, int):
            raise UserError(f"{where}.z must be a whole number (the z-order, bottom lowest), got {z!r}")
        opacity = _number(item.get("opacity", 1.0), f"{where}.opacity")
        if not 0.0 <= opacity <= 1.0:
            raise UserError(f"{where}.opacity must be in [0, 1], got {opacity}")
        components.append({"file": file, "box": (left, top, width, height), "z": z, "opacity": opacity,
                           "kind": _text(item.get("type"), f"{where}.type"),
                           "description": _text(item.get("description"), f"{where}.description")})
    components.sort(key=lambda c: c["z"])  # stable: equal z keep the list order
    return size, components


def _crello_render(size: tuple[int, int], component: dict):
    def render() -> Image.Image:
        img = load_image(component["file"], "RGBA")
        left, top, width, height = component["box"]
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
        if component["opacity"] < 1.0:
            scale = component["opacity"]
            img.putalpha(img.getchannel("A").point(lambda v: round(v * scale)))
        canvas = Image.new("RGBA", size, (0, 0, 0, 0))
        canvas.paste(img, (left, top))  # onto transparency: a plain copy, clipped to the canvas
        return canvas

    return render


def _open_crello(ref: SampleRef) -> LayeredSample:
    size, components = _read_layout(ref.path)
    layers = [Layer(_crello_render(size, c), description=c["description"], kind=c["kind"]) for c in components]
    return LayeredSample(ref.id, size, layers, str(ref.path / LAYOUT_FILE))


# -- folders of split layers ----------------------------------------------------------------------

def _descriptions(folder: Path, files: list[Path]) -> list[str]:
    """Per layer (z-order): descriptions.json (a list, or an object file name -> text) or
    descriptions.txt (one line per layer); "" for every layer without such a file."""
    names = [p.name for p in files]
    json_path, txt_path = (folder / n for n in DESCRIPTION_FILES)
    if json_path.is_file():
        try:
            obj = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{json_path}: cannot be read as JSON ({err.__class__.__name__}: {err})") from None
        if isinstance(obj, list) and all(isinstance(t, str) for t in obj):
            texts = obj
        elif isinstance(obj, dict) and all(isinstance(t, str) for t in obj.values()):
            unknown = sorted(set(obj) - set(names))
            if unknown:
                raise UserError(f"{json_path}: names {unknown[0]!r}, which is not a layer file in {folder}")
            return [obj.get(n, "") for n in names]
        else:
            raise UserError(f"{json_path}: must be a list of strings (bottom layer first) or an object "
                            "from layer file name to string")
        where = json_path
    elif txt_path.is_file():
        texts = txt_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        where = txt_path
    else:
        return [""] * len(files)
    if len(texts) != len(files):
        raise UserError(f"{where}: has {len(texts)} descriptions for {len(files)} layers; give one per layer, "
                        "bottom first")
    return [t.strip() for t in texts]


def _open_layers(ref: SampleRef) -> LayeredSample:
    files = sorted((p for p in ref.path.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))
    if not files:
        raise UserError(f"{ref.path}: holds no layer images ({', '.join(IMAGE_EXTENSIONS)})")
    size = oriented_size(files[0], "layer")
    for p in files[1:]:
        other = oriented_size(p, "layer")
        if other != size:
            raise UserError(f"{p}: is {other[0]}x{other[1]} but {files[0].name} is {size[0]}x{size[1]}; "
                            "every layer of a sample covers the same canvas")
    texts = _descriptions(ref.path, files)
    layers = [Layer(lambda p=p: load_image(p, "RGBA"), description=t) for p, t in zip(files, texts)]
    return LayeredSample(ref.id, size, layers, str(ref.path))
