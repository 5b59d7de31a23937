"""Multi-turn editing: each turn edits the previous turn's result.

The first source image is replaced by the latest result at every turn; further source images
(references) stay as given. `undo` drops the last turn; `save` writes a folder with the sources,
one PNG per turn (settings in its text chunk) and `history.json`, all at once (temp folder, then
rename), so a crash never leaves half a history.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from editkit.errors import UserError
from editkit.infer.engine import EditRequest, Engine
from editkit.infer.outputs import save_png
from editkit.utils.atomic import atomic_dir, write_json

HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class Turn:
    prompt: str
    image: Image.Image
    settings: dict


class EditSession:
    """A conversation with the engine: `turn(prompt)` edits the latest image.

    `defaults` are `EditRequest` fields (steps, true_cfg_scale, seed, negative_prompt, ...) used
    by every turn unless a turn overrides them.
    """

    def __init__(self, engine: Engine, images: list[Image.Image], **defaults):
        if not images:
            raise UserError("a chat session needs a source image to edit")
        unknown = set(defaults) - (set(EditRequest.__dataclass_fields__) - {"prompt", "images"})
        if unknown:
            raise UserError(f"unknown edit setting(s): {', '.join(sorted(unknown))}")
        self.engine = engine
        self.sources = list(images)
        self.defaults = defaults
        self.history: list[Turn] = []

    @property
    def current(self) -> Image.Image:
        """The image the next turn edits: the last result, or the source before any turn."""
        return self.history[-1].image if self.history else self.sources[0]

    def request(self, prompt: str, **overrides) -> EditRequest:
        images = [self.current, *self.sources[1:]]
        return replace(EditRequest(prompt=prompt, images=images), **{**self.defaults, **overrides})

    def turn(self, prompt: str, progress=None, **overrides) -> Image.Image:
        """Edit the current image with `prompt`; returns (and records) the result."""
        request = self.request(prompt, **overrides)
        image = self.engine.edit([request], progress=progress)[0]
        settings = {**self.engine.settings(request), "turn": len(self.history) + 1}
        self.history.append(Turn(prompt, image, settings))
        return image

    def undo(self) -> Image.Image:
        """Drop the last turn; returns the image the next turn will edit."""
        if not self.history:
            raise UserError("nothing to undo: no turn yet")
        self.history.pop()
        return self.current

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `source-<i>.png`, `turn-<n>.png` per turn and `history.json` into `folder` (replaced whole)."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                        and not (folder / HISTORY_FILE).is_file())):
            raise UserError(f"{folder}: exists and is not an editkit session folder; choose another folder")
        with atomic_dir(folder) as tmp:
            sources = []
            for i, image in enumerate(self.sources):
                save_png(tmp / f"source-{i}.png", image)
                sources.append(f"source-{i}.png")
            turns = []
            for n, turn in enumerate(self.history, start=1):
                name = f"turn-{n:02d}.png"
                save_png(tmp / name, turn.image, turn.settings)
                turns.append({"file": name, "prompt": turn.prompt, "settings": turn.settings})
            write_json(tmp / HISTORY_FILE, {"sources": sources, "turns": turns})
        return folder
