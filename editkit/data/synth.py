"""The synthetic editing dataset: coloured shapes on a soft background, with exact targets and masks.

Each scene places 1-3 shapes (circle, square, triangle) from a fixed palette in the cells of a
3x3 grid (one shape per cell, so shapes never overlap and positions have names). One edit is
applied — recolour, remove, add or move a shape — and the target is rendered from the edited
scene. Drawing has no antialiasing, so the mask (white = edit region) is exactly the set of
pixels where target and source differ. Instructions come from templates in English and
Chinese, with inverse instructions that undo the edit. Sample i depends only on (seed, i).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from editkit.data.formats import write_table
from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.utils.atomic import atomic_dir
from editkit.utils.progress import parallel_map
from editkit.utils.runinfo import write_run_manifest

COLORS = {  # name: (rgb, Chinese)
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((235, 200, 30), "黄色"),
    "purple": ((140, 50, 190), "紫色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
BACKGROUNDS = ((235, 235, 235), (245, 238, 220), (225, 235, 245), (230, 245, 230))
# grid cell (row, col) -> (English "at" phrase, English "to" phrase, Chinese)
POSITIONS = {
    (0, 0): ("at the top left", "to the top left", "左上方"),
    (0, 1): ("at the top", "to the top", "上方"),
    (0, 2): ("at the top right", "to the top right", "右上方"),
    (1, 0): ("on the left", "to the left", "左侧"),
    (1, 1): ("in the center", "to the center", "中间"),
    (1, 2): ("on the right", "to the right", "右侧"),
    (2, 0): ("at the bottom left", "to the bottom left", "左下方"),
    (2, 1): ("at the bottom", "to the bottom", "下方"),
    (2, 2): ("at the bottom right", "to the bottom right", "右下方"),
}
POSITIONS_KEYS = list(POSITIONS)
TASKS = ("recolor", "remove", "add", "move")
SPLITS = ("train", "val", "test")
MIN_SIZE = 24
MAX_SIZE = 4096  # a side beyond this is a typo (one 4096 px sample is already 48 MiB of pixels)
MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: tuple[int, int]
    radius: int
    jitter: tuple[int, int]  # centre offset within the cell, pixels


def _center(shape: Shape, size: int) -> tuple[float, float]:
    cell = size / 3
    return ((shape.cell[1] + 0.5) * cell + shape.jitter[0], (shape.cell[0] + 0.5) * cell + shape.jitter[1])


@functools.lru_cache(maxsize=8)
def _pixel_centers(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return ys, xs


def _shape_mask(shape: Shape, size: int) -> np.ndarray:
    cx, cy = _center(shape, size)
    r = shape.radius
    ys, xs = _pixel_centers(size)
    if shape.kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape.kind == "square":
        side = r * 0.85
        return (np.abs(xs - cx) <= side) & (np.abs(ys - cy) <= side)
    top = cy - r
    depth = (ys - top) / (2 * r)  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= depth * r)


def render(background: tuple[int, int, int], shapes: list[Shape], size: int) -> np.ndarray:
    """The scene as an HxWx3 uint8 array: a soft vertical gradient, then the shapes (hard edges)."""
    base = np.array(background, dtype=np.float32)
    shade = np.linspace(0.0, 12.0, size, dtype=np.float32)[:, None, None]
    img = np.clip(base[None, None, :] - shade, 0, 255).astype(np.uint8).repeat(size, axis=1)
    for shape in shapes:
        img[_shape_mask(shape, size)] = COLORS[shape.color][0]
    return img


def _new_shape(rng: np.random.Generator, size: int, cell: tuple[int, int], taken: set[tuple[str, str]]) -> Shape:
    while True:
        kind, color = str(rng.choice(list(SHAPES))), str(rng.choice(list(COLORS)))
        if (kind, color) not in taken:
            break
    cell_px = size / 3
    radius = max(3, int(cell_px * rng.uniform(0.33, 0.42)))
    room = max(0, int(cell_px / 2 - radius - 1))
    jitter = (int(rng.integers(-room, room + 1)), int(rng.integers(-room, room + 1)))
    return Shape(kind, color, cell, radius, jitter)


def _phrase(shape: Shape) -> tuple[str, str]:
    return f"{shape.color} {shape.kind}", f"{COLORS[shape.color][1]}{SHAPES[shape.kind]}"


def make_sample(seed: int, index: int, size: int = 64) -> dict:
    """One sample (source/target arrays, mask, instructions, metadata); depends only on (seed, index)."""
    rng = np.random.default_rng([seed, 1, index])
    task = TASKS[int(rng.integers(len(TASKS)))]
    cells = [POSITIONS_KEYS[i] for i in rng.permutation(len(POSITIONS_KEYS))]
    n = int(rng.integers(1, 3 if task == "add" else 4))
    shapes: list[Shape] = []
    for cell in cells[:n]:
        shapes.append(_new_shape(rng, size, cell, {(s.kind, s.color) for s in shapes}))
    free = cells[n:]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pick = int(rng.integers(len(shapes)))
    shape = shapes[pick]
    en, cn = _phrase(shape)
    meta = {"shape": shape.kind, "color": shape.color, "n_shapes": len(shapes)}

    if task == "recolor":
        taken = {(s.kind, s.color) for s in shapes}
        options = [c for c in COLORS if (shape.kind, c) not in taken]
        new = replace(shape, color=options[int(rng.integers(len(options)))])
        after = shapes[:pick] + [new] + shapes[pick + 1:]
        en2, cn2 = _phrase(new)
        text = (f"make the {en} {new.color}", f"把{cn}变成{COLORS[new.color][1]}",
                f"make the {en2} {shape.color}", f"把{cn2}变成{COLORS[shape.color][1]}")
        meta["new_color"] = new.color
    elif task == "remove":
        after = shapes[:pick] + shapes[pick + 1:]
        at, _, where = POSITIONS[shape.cell]
        text = (f"remove the {en}", f"删除{cn}", f"add a {en} {at}", f"在{where}添加一个{cn}")
        meta["position"] = at
    elif task == "add":
        shape = _new_shape(rng, size, free[0], {(s.kind, s.color) for s in shapes})
        en, cn = _phrase(shape)
        after = shapes + [shape]
        at, _, where = POSITIONS[shape.cell]
        text = (f"add a {en} {at}", f"在{where}添加一个{cn}", f"remove the {en}", f"删除{cn}")
        meta.update(shape=shape.kind, color=shape.color, position=at)
    else:
        moved = replace(shape, cell=free[0])
        after = shapes[:pick] + [moved] + shapes[pick + 1:]
        _, to_new, cn_new = POSITIONS[moved.cell]
        _, to_old, cn_old = POSITIONS[shape.cell]
        text = (f"move the {en} {to_new}", f"把{cn}移到{cn_new}", f"move the {en} {to_old}", f"把{cn}移到{cn_old}")
        meta["position"] = to_new

    source = render(background, shapes, size)
    target = render(background, after, size)
    mask = np.any(source != target, axis=-1)
    return {"source": source, "target": target, "mask": mask, "task": task, "text": text, "metadata": meta}


def _split_of(seed: int, n: int, n_val: int, n_test: int) -> list[str]:
    order = np.random.default_rng([seed, 2]).permutation(n)
    split = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_val:
            split[i] = "val"
        elif rank < n_val + n_test:
            split[i] = "test"
    return split


def _write_sample(args: tuple[int, int, int, Path]) -> EditRecord:
    seed, index, size, folder = args
    sample = make_sample(seed, index, size)
    rid = f"synth-{index:06d}"
    paths = {k: folder / "images" / f"{rid}_{k}.png" for k in ("source", "target", "mask")}
    Image.fromarray(sample["source"]).save(paths["source"], compress_level=1)
    Image.fromarray(sample["target"]).save(paths["target"], compress_level=1)
    Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(paths["mask"], compress_level=1)
    en, cn, inv_en, inv_cn = sample["text"]
    return EditRecord(id=rid, instruction=en, sources=[paths["source"]], target=paths["target"], mask=paths["mask"],
                      instruction_cn=cn, inverse_instruction=inv_en, inverse_instruction_cn=inv_cn,
                      task=sample["task"], metadata=dict(sample["metadata"]))


def _preview(records: list[EditRecord], path: Path, rows: int = 8) -> None:
    """A contact sheet (source | target | mask per row) to check the data by eye."""
    picked = records[:rows]
    if not picked:
        return
    tiles = [[Image.open(p).convert("RGB") for p in (r.sources[0], r.target, r.mask)] for r in picked]
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (3 * w + 4, len(tiles) * (h + 2)), (255, 255, 255))
    for y, row in enumerate(tiles):
        for x, tile in enumerate(row):
            sheet.paste(tile, (x * (w + 2), y * (h + 2)))
    sheet.save(path)


def synthesize(out_dir: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
               val_fraction: float = 0.1, test_fraction: float = 0.1, workers: int = 1,
               progress: bool = True) -> dict[str, Path]:
    """Write n samples (PNGs under images/) and train/val/test .jsonl manifests; returns split -> path.

    The folder appears complete or not at all; an existing folder is replaced only if it was
    written by this function (it holds synth.json).
    """
    out = Path(out_dir)
    if not 1 <= n <= MAX_SAMPLES:
        raise UserError(f"--n must be between 1 and {MAX_SAMPLES}, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} (shapes must stay recognisable) and {MAX_SIZE} pixels, "
                        f"got {size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError("val and test fractions must be in [0, 1) and sum to less than 1")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "synth.json").is_file())):
        raise UserError(f"{out}: exists and is not a synthetic dataset folder; choose a new --out folder")
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    split = _split_of(seed, n, n_val, n_test)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        jobs = [(seed, i, size, tmp) for i in range(n)]
        records = parallel_map(_write_sample, jobs, "synth", "samples", workers, chunksize=32, disable=not progress)
        for name in SPLITS:
            write_table([r for r, s in zip(records, split) if s == name], tmp / f"{name}.jsonl", "pairs")
        _preview(records, tmp / "preview.png")
        write_run_manifest(tmp, "data synth", {"n": n, "size": size, "val_fraction": val_fraction,
                                               "test_fraction": test_fraction}, seed=seed, name="synth.json",
                           counts={name: split.count(name) for name in SPLITS})
    return {name: out / f"{name}.jsonl" for name in SPLITS}
