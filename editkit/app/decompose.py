"""The web app's Decompose tab as plain functions: check the upload and settings, decompose, package.

Nothing here imports Gradio (`editkit.app.decompose_tab` shows the returned `DecomposeView`). The tab
writes what `editkit layers decompose` writes, with its writers (editkit.layers.decompose) —
layer_00.png … (bottom first), layers.psd, recomposite.png — into a fresh folder per request, and
adds layers.zip (the PNGs and the PSD) for one download.
Like the edit tab, the page is handed file paths, never PIL images (see `editkit.app.actions`).
"""

from __future__ import annotations

import math
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.app.limits import AppLimits, load_sources
from editkit.errors import UserError

MAX_LAYERS = 16
"""The page's layer slider goes this far (the released model was shown with 3 to 8)."""
ZIP_FILE = "layers.zip"


@dataclass
class DecomposeRequest:
    """What the user set on the tab (raw widget values until `checked`)."""

    image: str | None
    layers: Any = 4
    steps: Any = 50
    seed: Any = 0
    cfg: Any = 4.0
    prompt: str | None = None

    def checked(self, limits: AppLimits) -> DecomposeRequest:
        """A copy with normalised types; a UserError naming the field for anything out of range."""
        from editkit.app.actions import MAX_CFG, MAX_SEED, MAX_STEPS, _integer

        if not self.image:
            raise UserError("No image: upload the image to decompose first (PNG, JPEG, WebP or BMP)")
        load_sources([self.image], limits)  # type, file size and pixel size, before any model work
        layers = _integer(self.layers, "Layers")
        if not 1 <= layers <= MAX_LAYERS:
            raise UserError(f"Layers is {layers}; choose 1 to {MAX_LAYERS}")
        steps = _integer(self.steps, "Steps")
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"Steps is {steps}; choose 1 to {MAX_STEPS}")
        seed = _integer(self.seed, "Seed")
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"Seed is {seed}; choose 0 to {MAX_SEED}")
        cfg = float(self.cfg if self.cfg is not None else 1.0)
        if not (math.isfinite(cfg) and 1.0 <= cfg <= MAX_CFG):
            raise UserError(f"CFG is {cfg}; choose 1 (off) to {MAX_CFG:g}")
        prompt = (self.prompt or "").strip()
        if len(prompt) > limits.max_instruction_chars:
            raise UserError(f"The description has {len(prompt)} characters; shorten it to at most "
                            f"{limits.max_instruction_chars}")
        return DecomposeRequest(self.image, layers, steps, seed, cfg, prompt or None)


@dataclass
class DecomposeView:
    """What the tab shows after a decomposition: PNG paths with captions, the downloads, a status line."""

    layers: list[tuple[str, str]]
    recomposite: str
    zip_path: str
    psd_path: str
    status: str


def decompose_upload(model, request: DecomposeRequest, limits: AppLimits, output_dir: Path,
                     progress=None) -> DecomposeView:
    """Decompose the uploaded image with the served model into a new folder under `output_dir`;
    `progress(steps_done, total_steps)` follows the sampling."""
    from editkit.data.images import load_image
    from editkit.layers.decompose import (
        PSD_FILE,
        RECOMPOSITE_FILE,
        recomposite,
        recomposition_psnr,
        write_layer_pngs,
        write_psd,
    )
    from editkit.utils.atomic import atomic_path

    request = request.checked(limits)
    picture = load_image(request.image, "RGBA")
    (layers,) = model.decompose([picture], layers=request.layers, steps=request.steps, cfg=request.cfg,
                                seeds=[request.seed], prompts=[request.prompt], max_batch=1, callback=progress)
    folder = Path(output_dir) / "decompose" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    paths = write_layer_pngs(folder, layers)
    psd = write_psd(folder / PSD_FILE, layers)
    recomposed = recomposite(layers)
    with atomic_path(folder / RECOMPOSITE_FILE) as tmp:
        recomposed.save(tmp, format="PNG")
    with atomic_path(folder / ZIP_FILE) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in [*paths, psd]:
            archive.write(path, arcname=path.name)
    psnr = recomposition_psnr(recomposed, model.layer_view(picture))
    captions = ["layer 0 (bottom)", *(f"layer {i}" for i in range(1, len(paths)))]
    shown = "identical" if math.isinf(psnr) else f"{psnr:.2f} dB"
    return DecomposeView(layers=[(str(p), c) for p, c in zip(paths, captions)],
                         recomposite=str(folder / RECOMPOSITE_FILE), zip_path=str(folder / ZIP_FILE),
                         psd_path=str(psd), status=f"{len(paths)} layers (seed {request.seed}); recomposition "
                                                   f"PSNR {shown} against the input.")
