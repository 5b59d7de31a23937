"""Small generated datasets and prediction folders for the eval tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from editkit.data import write_manifest
from editkit.data.records import EditRecord


def make_dataset(root: Path, n: int = 6, size: int = 48, seed: int = 0) -> tuple[Path, list[EditRecord]]:
    """n records: a textured source, a target with a coloured square edited in, and its mask."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    y, x = np.mgrid[:size, :size]
    for i in range(n):
        base = (0.5 + 0.3 * np.sin(x / (3 + i)) * np.cos(y / 5))[..., None] * np.ones(3)
        src = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
        mask = (abs(x - size // 2) < size // 5) & (abs(y - size // 2) < size // 5)
        tgt = src.copy()
        tgt[mask] = rng.random(3)
        paths = {}
        for name, arr in (("src", src), ("tgt", tgt)):
            paths[name] = root / f"{name}_{i}.png"
            Image.fromarray((arr * 255).round().astype(np.uint8)).save(paths[name])
        paths["mask"] = root / f"mask_{i}.png"
        Image.fromarray((mask * 255).astype(np.uint8)).save(paths["mask"])
        records.append(EditRecord(id=f"s{i}", instruction=f"paint the square {i}", sources=[paths["src"]],
                                  target=paths["tgt"], mask=paths["mask"], task="recolor" if i % 2 else "add",
                                  metadata={"edit_type": "color" if i % 2 else "object"}))
    manifest = write_manifest(records, root / "test.jsonl", format="pairs")
    return manifest, records


def make_predictions(folder: Path, records: list[EditRecord], noise: float, seed: int = 1,
                     skip: tuple[str, ...] = ()) -> Path:
    """Ground truth plus Gaussian noise, saved as <id>.png (records in `skip` left out)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        if record.id in skip:
            continue
        tgt = np.asarray(Image.open(record.target).convert("RGB"), dtype=np.float64) / 255
        pred = np.clip(tgt + rng.normal(0, noise, tgt.shape), 0, 1)
        Image.fromarray((pred * 255).round().astype(np.uint8)).save(folder / f"{record.id}.png")
    return folder
