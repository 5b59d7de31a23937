"""The web app's logic as plain functions: start a session, run a turn, undo, show the history.

Nothing here imports Gradio: the page (`editkit.app.layout`) calls these and shows the returned
`View`. The multi-turn bookkeeping (current source, turns, undo) is the engine's `EditSession`;
this module adds the web-specific parts — upload checks, the editor's mask, LoRA scales chosen
per request, and one downloadable PNG per turn carrying its settings.

The page is handed PNG files, never PIL images. Gradio (6.31) writes a returned PIL image to
`<cache>/<content hash>/image.png` with a plain `write_bytes`, so two tabs showing the same
image (the same upload) rewrite one path in place: the second write truncates the file while
the first tab is still downloading it, which the server reports as "Too little data for
declared Content-Length" and the browser as a cut-off image. A file path instead goes through
Gradio's `save_file_to_cache`, which copies under a temporary name, renames it into place and
never rewrites a copy that exists; the files themselves are written once, atomically.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from editkit.app.limits import AppLimits, check_instruction, load_sources, load_uploaded_mask
from editkit.app.mask import mask_from_editor
from editkit.errors import UserError
from editkit.infer.defaults import STEPS, TRUE_CFG_SCALE
from editkit.infer.engine import Engine, Progress
from editkit.infer.fusion import FUSION_MODES
from editkit.infer.outputs import save_png
from editkit.infer.session import EditSession

MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_CFG = 50.0
"""The engine's limit (Flux Fill's embedded guidance defaults to 30)."""
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class AppDefaults:
    """Initial values of the page's settings."""

    steps: int = STEPS
    true_cfg_scale: float = TRUE_CFG_SCALE
    seed: int = 0


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA given with `--lora PATH[:SCALE]`: its display name and starting scale."""

    name: str
    path: str
    scale: float = 1.0


@dataclass
class EditSettings:
    """What the user set for one turn (raw widget values until `checked`)."""

    instruction: str
    negative_prompt: str | None = None
    true_cfg_scale: float = TRUE_CFG_SCALE
    steps: int = STEPS
    seed: int = 0
    width: int | None = None
    height: int | None = None
    fusion: str = "off"
    lora_scales: list[float] = field(default_factory=list)
    extras: list[str] | None = None
    """The adapter bundle's extra modules switched on (None: leave them as they are)."""

    def checked(self, limits: AppLimits, n_loras: int, extras: list[str] | None = None) -> EditSettings:
        """A copy with normalised types; UserError naming the field for anything out of range
        (`extras`: the adapter bundle's extra modules, which `self.extras` must be among)."""
        steps = _integer(self.steps, "Steps")
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"Steps is {steps}; choose 1 to {MAX_STEPS}")
        cfg = float(self.true_cfg_scale if self.true_cfg_scale is not None else 1.0)
        if not 1.0 <= cfg <= MAX_CFG:
            raise UserError(f"CFG is {cfg}; choose 1 (off) to {MAX_CFG:g}")
        seed = _integer(self.seed, "Seed")
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"Seed is {seed}; choose 0 to {MAX_SEED} (or press Random seed)")
        width, height = (_side(v, name, limits) for v, name in ((self.width, "width"), (self.height, "height")))
        if (width is None) != (height is None):
            raise UserError("Set both output width and height, or leave both at 0 to follow the source")
        if self.fusion not in FUSION_MODES:
            raise UserError(f"Mask fusion {self.fusion!r} is unknown; choose one of {', '.join(FUSION_MODES)}")
        if len(self.lora_scales) != n_loras:
            raise UserError(f"{len(self.lora_scales)} LoRA scales for {n_loras} LoRAs; reload the page")
        scales = [float(s) for s in self.lora_scales]
        if any(not 0.0 <= s <= 2.0 for s in scales):
            raise UserError("LoRA scales must be between 0 (off) and 2")
        unknown = [n for n in self.extras or [] if n not in (extras or [])]
        if unknown:
            raise UserError(f"Adapter extra {unknown[0]!r} is not in the loaded bundle; reload the page")
        return EditSettings(
            instruction=check_instruction(self.instruction, limits),
            negative_prompt=(self.negative_prompt or "").strip() or None,
            true_cfg_scale=cfg, steps=steps, seed=seed, width=width, height=height,
            fusion=self.fusion, lora_scales=scales, extras=None if self.extras is None else list(self.extras),
        )


def _integer(value: Any, name: str) -> int:
    if value is None or float(value) != int(float(value)):
        raise UserError(f"{name} must be a whole number (got {value!r})")
    return int(float(value))


def _side(value: Any, name: str, limits: AppLimits) -> int | None:
    side = _integer(value or 0, f"Output {name}")
    if side == 0:
        return None
    if side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= limits.max_image_side:
        raise UserError(f"Output {name} is {side}; use a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} "
                        f"to {limits.max_image_side}, or 0 to follow the source")
    return side


@dataclass
class View:
    """What the page shows after an action; images are PNG file paths (see the module docstring)."""

    session: Any
    editor_value: dict[str, Any] | None
    result: str | None
    history: list[tuple[str, str]]
    download_path: str | None
    status: str
    warning: str | None = None


@dataclass
class AppSession:
    """One browser tab's work: the engine's multi-turn session and the tab's folder of PNGs."""

    edit: EditSession
    folder: Path
    source_file: str  # the first source as shown on the page
    downloads: list[str] = field(default_factory=list)  # one PNG per turn: downloads[n - 1] is turn n

    @property
    def current_file(self) -> str:
        """The PNG of the image the next turn edits."""
        return self.downloads[-1] if self.downloads else self.source_file


class AppController:
    """The app's operations over one loaded engine; the Gradio page calls these.

    The engine is shared by every browser tab; the page's queue runs one edit at a time, so the
    LoRA scales and adapter extras chosen for a request stay in place while it runs.
    """

    def __init__(self, engine: Engine, limits: AppLimits | None = None, loras: list[LoraChoice] | None = None,
                 defaults: AppDefaults | None = None, output_dir: str | Path | None = None):
        self.engine = engine
        self.limits = limits or AppLimits()
        self.loras = list(loras or [])
        self.defaults = defaults or AppDefaults()
        if output_dir is None:
            output_dir = tempfile.mkdtemp(prefix="editkit-app-")
            atexit.register(shutil.rmtree, output_dir, True)  # downloads are per run, not kept
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lora_scales: list[float] | None = None
        self._set_lora_scales([c.scale for c in self.loras])
        adapter = getattr(engine, "adapter", None)
        self.extras: list[str] = list(adapter.names) if adapter else []
        """The adapter bundle's extra modules (a switch each on the page); `extras_on`: those on at start."""
        self.extras_on: list[str] = list(adapter.active) if adapter else []

    @property
    def model_name(self) -> str:
        return self.engine.model_name or "model"

    @property
    def decomposer(self):
        """The served model when it decomposes images into layers (the page's Decompose tab), else None."""
        model = self.engine.model
        return model if callable(getattr(model, "decompose", None)) else None

    def start(self, paths: list[str] | None) -> View:
        """A new session on the uploaded sources (none: back to the empty page)."""
        if not paths:
            return self.view(None)
        images = load_sources(paths, self.limits)
        folder = self.output_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        source_file = str(save_png(folder / "source.png", images[0]))
        session = AppSession(EditSession(self.engine, images), folder, source_file)
        return self.view(session, f"Loaded {len(images)} source image(s). Describe the edit and press Edit.")

    def check(self, session: AppSession | None, settings: EditSettings, editor_value: dict | None = None,
              mask_path: str | None = None) -> tuple[EditSettings, Image.Image | None]:
        """The checked settings and the mask (uploaded, else painted, else None) — no model work.

        The page runs this first, outside the GPU queue, so a mistake is reported at once.
        """
        if session is None:
            raise UserError("No source image: upload one first (PNG, JPEG, WebP or BMP)")
        settings = settings.checked(self.limits, len(self.loras), self.extras)
        size = session.edit.current.size
        mask = load_uploaded_mask(mask_path, size, self.limits) if mask_path else mask_from_editor(editor_value, size)
        if settings.fusion != "off" and mask is None:
            raise UserError(f"Mask fusion '{settings.fusion}' needs a mask: paint the edit region or upload a mask")
        if mask is None and self.engine.takes_mask():
            raise UserError("This model fills a masked region: paint the region to edit or upload a mask")
        return settings, mask

    def edit(self, session: AppSession | None, settings: EditSettings, editor_value: dict | None = None,
             mask_path: str | None = None, progress: Progress | None = None) -> View:
        """Run one turn on the current image; its result becomes the next turn's source."""
        settings, mask = self.check(session, settings, editor_value, mask_path)
        self._set_lora_scales(settings.lora_scales)
        if settings.extras is not None and self.extras:
            self.engine.set_adapter_extras(settings.extras)
        overrides = {"negative_prompt": settings.negative_prompt} if settings.negative_prompt else {}
        try:
            session.edit.turn(
                settings.instruction, progress=progress, true_cfg_scale=settings.true_cfg_scale, steps=settings.steps,
                seed=settings.seed, width=settings.width, height=settings.height, mask=mask, fusion=settings.fusion,
                **overrides,
            )
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # leave the GPU usable for the next request in the queue
            raise UserError("Out of GPU memory for this edit: lower the output size, the steps or the number "
                            "of source images and try again") from None
        turn = session.edit.history[-1]
        path = session.folder / f"editkit-turn{len(session.edit.history)}-seed{settings.seed}.png"
        session.downloads.append(str(save_png(path, turn.image, turn.settings)))
        masked = "" if mask is None else f", mask covers {_coverage(mask):.0%} of the image"
        return self.view(session, f"Turn {len(session.edit.history)} done (seed {settings.seed}{masked}).")

    def undo(self, session: AppSession | None) -> View:
        """Back one turn; only a warning when there is nothing to undo."""
        if session is None or not session.edit.history:
            view = self.view(session, "Nothing to undo.")
            view.warning = "Nothing to undo: no edit has been made yet"
            return view
        session.edit.undo()
        Path(session.downloads.pop()).unlink(missing_ok=True)
        return self.view(session, f"Undone: back to turn {len(session.edit.history)}.")

    def close(self, session: AppSession | None) -> None:
        """Free a finished tab's downloads (Gradio calls this when the tab's state expires)."""
        if session is not None:
            shutil.rmtree(session.folder, ignore_errors=True)

    def view(self, session: AppSession | None, status: str = "") -> View:
        """What the page shows for `session` (None: the empty page)."""
        if session is None:
            return View(None, None, None, [], None, status or "Upload a source image to start.")
        turns = session.edit.history
        current = session.current_file
        history = [(session.source_file, "source")]
        history += [(path, f"turn {n}: {turn.prompt}")
                    for n, (turn, path) in enumerate(zip(turns, session.downloads), start=1)]
        return View(
            session=session,
            editor_value={"background": current, "layers": [], "composite": current},
            result=current if turns else None,
            history=history,
            download_path=session.downloads[-1] if turns else None,
            status=status,
        )

    def _set_lora_scales(self, scales: list[float]) -> None:
        """Reload the `--lora` adapters when the chosen scales differ from those loaded."""
        if scales == self._lora_scales or not self.loras:
            return
        from editkit.models.lora import LoraSpec

        self.engine.load_loras([LoraSpec(c.path, s) for c, s in zip(self.loras, scales)])
        self._lora_scales = list(scales)


def _coverage(mask: Image.Image) -> float:
    histogram = mask.histogram()
    return histogram[255] / max(1, mask.width * mask.height)
