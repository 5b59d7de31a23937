"""Synthetic layered scenes: the offline default for layered data (`editkit layers synth`).

Each scene has 2-8 layers: an opaque background (a solid colour or a two-colour gradient), then
shapes (ellipse, rectangle, rounded rectangle, triangle, ring; solid or gradient fill) and words
in Pillow's default font. Edges are antialiased or soft (a ramp several pixels wide, from a
signed distance for shapes, a blur for text); about a third of the layers are semi-transparent;
later layers are often placed over earlier ones, so they occlude them. Every layer has a
one-line description ("a semi-transparent soft-edged blue ellipse at the top left"). The long
side is --size, the aspect ratio one of 1:1, 4:3, 3:4, 3:2, 2:3. Scene i depends only on
(seed, i). The output is the split-layers format that `layers prep` reads:
OUT/<scene id>/layer_000.png ... (bottom first) and OUT/<scene id>/descriptions.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from editkit.errors import UserError
from editkit.utils.atomic import atomic_dir
from editkit.utils.progress import parallel_map
from editkit.utils.runinfo import write_run_manifest

PALETTE = {
    "red": (214, 48, 49), "orange": (240, 140, 30), "yellow": (242, 208, 40), "green": (56, 168, 82),
    "teal": (28, 158, 158), "blue": (44, 92, 220), "purple": (138, 62, 190), "pink": (236, 112, 170),
    "brown": (134, 88, 52), "white": (250, 250, 250), "black": (26, 26, 26), "grey": (128, 128, 128),
}
SHAPES = ("ellipse", "rectangle", "rounded rectangle", "triangle", "ring")
WORDS = ("SALE", "OPEN", "NEW", "Hello", "Summer", "Coffee", "Music", "Layer", "Qwen", "2026", "Sky", "Go!")
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))
MIN_LAYERS, MAX_LAYERS = 2, 8
MIN_SIZE, MAX_SIZE = 32, 4096
MAX_SCENES = 1_000_000
MARKER = "synth.json"


def _canvas(rng: np.random.Generator, size: int) -> tuple[int, int]:
    a, b = ASPECTS[int(rng.integers(len(ASPECTS)))]
    return (size, max(1, round(size * b / a))) if a >= b else (max(1, round(size * a / b)), size)


def _colour(rng: np.random.Generator, exclude: str = "") -> str:
    names = [n for n in PALETTE if n != exclude]
    return names[int(rng.integers(len(names)))]


POSITIONS = (("at the top left", "at the top", "at the top right"),
             ("on the left", "in the center", "on the right"),
             ("at the bottom left", "at the bottom", "at the bottom right"))


def _where(cx: float, cy: float, w: int, h: int) -> str:
    return POSITIONS[min(2, max(0, int(3 * cy / h)))][min(2, max(0, int(3 * cx / w)))]


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """HxWx4 uint8 from float colour (HxWx3 or 3, 0..255) and alpha (HxW, 0..1); colour 0 where alpha is 0."""
    a = np.clip(alpha, 0.0, 1.0)
    out = np.zeros((*a.shape, 4), dtype=np.uint8)
    out[..., :3] = np.clip(np.rint(np.broadcast_to(rgb, (*a.shape, 3))), 0, 255).astype(np.uint8)
    out[..., 3] = np.rint(a * 255).astype(np.uint8)
    out[out[..., 3] == 0] = 0
    return out


def _fill(rng: np.random.Generator, w: int, h: int, name: str) -> tuple[np.ndarray, str]:
    """A solid colour, or a gradient (horizontal or vertical) from `name` to another colour."""
    base = np.array(PALETTE[name], dtype=np.float32)
    if rng.random() < 0.6:
        return base, name
    other = _colour(rng, exclude=name)
    vertical = rng.random() < 0.5
    t = np.linspace(0.0, 1.0, h if vertical else w, dtype=np.float32)
    t = t[:, None, None] if vertical else t[None, :, None]
    grad = base + (np.array(PALETTE[other], dtype=np.float32) - base) * t
    return np.broadcast_to(grad, (h, w, 3)), f"{name}-to-{other} gradient"


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    name = _colour(rng)
    rgb, what = _fill(rng, w, h, name)
    if rgb.ndim == 1:
        shade = np.linspace(0.0, 14.0, h, dtype=np.float32)[:, None, None]  # a faint vertical shade
        rgb = np.clip(rgb[None, None, :] - shade, 0, 255)
        return _rgba(rgb, np.ones((h, w), np.float32)), f"a plain {name} background"
    return _rgba(rgb, np.ones((h, w), np.float32)), f"a {what} background"


def _signed_distance(kind: str, x: np.ndarray, y: np.ndarray, rx: float, ry: float) -> np.ndarray:
    """Distance in pixels to the shape's edge (negative inside), for coordinates centred on it."""
    if kind == "ellipse":
        return (np.sqrt((x / rx) ** 2 + (y / ry) ** 2) - 1.0) * min(rx, ry)
    if kind in ("rectangle", "rounded rectangle"):
        corner = 0.3 * min(rx, ry) if kind == "rounded rectangle" else 0.0
        qx, qy = np.abs(x) - (rx - corner), np.abs(y) - (ry - corner)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - corner
    if kind == "triangle":  # apex up; the largest of the three edges' half-plane distances
        side = np.hypot(2 * ry, rx)
        left = (-2 * ry * x - rx * y - rx * ry) / side  # edge (-rx, ry)-(0, -ry), outward normal
        right = (2 * ry * x - rx * y - rx * ry) / side
        return np.maximum(np.maximum(left, right), y - ry)
    radius = min(rx, ry)  # ring
    return np.abs(np.hypot(x, y) - 0.75 * radius) - 0.25 * radius


def _placement(rng: np.random.Generator, w: int, h: int, centres: list[tuple[float, float]]) -> tuple[float, float]:
    """A centre: near an earlier layer's (so it occludes it) half the time, else anywhere."""
    if centres and rng.random() < 0.5:
        cx, cy = centres[int(rng.integers(len(centres)))]
        jitter = 0.15 * min(w, h)
        return (float(np.clip(cx + rng.uniform(-jitter, jitter), 0, w - 1)),
                float(np.clip(cy + rng.uniform(-jitter, jitter), 0, h - 1)))
    return float(rng.uniform(0.1, 0.9) * w), float(rng.uniform(0.1, 0.9) * h)


def _look(rng: np.random.Generator, short: int) -> tuple[float, float, str]:
    """(opacity, edge softness in pixels, the words for them)."""
    opacity = 1.0 if rng.random() < 0.65 else float(rng.uniform(0.35, 0.85))
    soft = rng.random() < 0.4
    softness = float(rng.uniform(0.03, 0.1) * short) if soft else 1.0
    words = ("semi-transparent " if opacity < 1 else "") + ("soft-edged " if soft else "")
    return opacity, max(1.0, softness), words


def _shape_layer(rng: np.random.Generator, w: int, h: int, centres: list) -> tuple[np.ndarray, str]:
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    short = min(w, h)
    cx, cy = _placement(rng, w, h, centres)
    centres.append((cx, cy))
    rx, ry = (float(rng.uniform(0.08, 0.3) * short) for _ in range(2))
    angle = float(rng.uniform(0, np.pi)) if kind in ("rectangle", "rounded rectangle", "triangle") else 0.0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * dx + s * dy, -s * dx + c * dy
    opacity, softness, words = _look(rng, short)
    alpha = opacity * np.clip(0.5 - _signed_distance(kind, x, y, max(rx, 2.0), max(ry, 2.0)) / softness, 0, 1)
    rgb, colour = _fill(rng, w, h, _colour(rng))
    article = "an" if (words or colour)[0] in "aeiou" else "a"
    return _rgba(rgb, alpha), f"{article} {words}{colour} {kind} {_where(cx, cy, w, h)}"


def _text_layer(rng: np.random.Generator, w: int, h: int, centres: list) -> tuple[np.ndarray, str]:
    word = WORDS[int(rng.integers(len(WORDS)))]
    font = ImageFont.load_default(size=max(8, int(rng.uniform(0.08, 0.2) * min(w, h))))
    left, top, right, bottom = font.getbbox(word)
    tw, th = right - left, bottom - top
    cx, cy = _placement(rng, w, h, centres)
    x = float(np.clip(cx - tw / 2, 0, max(0, w - tw))) - left
    y = float(np.clip(cy - th / 2, 0, max(0, h - th))) - top
    centres.append((x + left + tw / 2, y + top + th / 2))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((x, y), word, fill=255, font=font)
    opacity, softness, words = _look(rng, min(w, h))
    if softness > 1.0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=min(3.0, softness / 4)))
    name = _colour(rng)
    alpha = np.asarray(mask, dtype=np.float32) / 255.0 * opacity
    where = _where(x + left + tw / 2, y + top + th / 2, w, h)
    return _rgba(np.array(PALETTE[name], np.float32), alpha), f"the {words}{name} text \"{word}\" {where}"


def make_scene(seed: int, index: int, size: int = 256) -> dict:
    """One scene: {"size": (w, h), "layers": [HxWx4 uint8, bottom first], "descriptions": [...]};
    depends only on (seed, index)."""
    rng = np.random.default_rng([seed, 7, index])
    w, h = _canvas(rng, size)
    n = int(rng.integers(MIN_LAYERS, MAX_LAYERS + 1))
    background, text = _background(rng, w, h)
    layers, descriptions, centres = [background], [text], []
    for _ in range(n - 1):
        layer, text = (_text_layer if rng.random() < 0.25 else _shape_layer)(rng, w, h, centres)
        layers.append(layer)
        descriptions.append(text)
    return {"size": (w, h), "layers": layers, "descriptions": descriptions}


def scene_id(index: int) -> str:
    return f"scene-{index:06d}"


def _write_scene(args: tuple[int, int, int, Path]) -> int:
    seed, index, size, out = args
    scene = make_scene(seed, index, size)
    folder = out / scene_id(index)
    folder.mkdir()
    for k, layer in enumerate(scene["layers"]):
        Image.fromarray(layer, "RGBA").save(folder / f"layer_{k:03d}.png", compress_level=1)
    (folder / "descriptions.json").write_text(json.dumps(scene["descriptions"], ensure_ascii=False, indent=1) + "\n",
                                              encoding="utf-8")
    return len(scene["layers"])


def synthesize_layers(out_dir: str | Path, n: int = 100, size: int = 256, seed: int = 0, workers: int = 1,
                      progress: bool = True) -> Path:
    """Write n scenes to `out_dir` in the split-layers format; the folder appears complete or not
    at all, and an existing folder is replaced only when this function wrote it (it holds synth.json)."""
    out = Path(out_dir)
    if not 1 <= n <= MAX_SCENES:
        raise UserError(f"--n must be between 1 and {MAX_SCENES}, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UserError(f"{out}: exists and is not a synthetic layers folder; choose a new --out folder")
    with atomic_dir(out) as tmp:
        jobs = [(seed, i, size, tmp) for i in range(n)]
        counts = parallel_map(_write_scene, jobs, "layers synth", "scenes", workers, chunksize=8, disable=not progress)
        write_run_manifest(tmp, "layers synth", {"n": n, "size": size}, seed=seed, name=MARKER,
                           layers=int(sum(counts)))
    return out
