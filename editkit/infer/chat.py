"""The chat loop: lines of instructions and /commands driving an `EditSession`.

Input and output are plain callables, so the loop runs the same from a terminal, a pipe or a
test's list of lines (`editkit chat` feeds it stdin and `typer.echo`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from editkit.infer.engine import Progress
    from editkit.infer.session import EditSession

COMMANDS = "/undo, /save DIR or /quit"
USAGE = f"type an instruction per line; {COMMANDS}"


def run_chat(session: EditSession, lines: Iterable[str], save_dir: str | os.PathLike,
             echo: Callable[..., None], new_progress: Callable[[], Progress] | None = None,
             mask: Image.Image | None = None) -> Path:
    """Run one chat until `lines` ends or a `/quit` line; returns the session folder.

    Each line is an instruction that edits the last result, or a command: `/undo` (drop the last
    turn), `/save DIR` (write the session there too), `/quit`. The session is saved to `save_dir`
    after every turn and at the end. `echo(text)` reports what happened and `echo(text, err=True)`
    a bad line, which does not end the chat (`typer.echo` fits). `new_progress()`, when given,
    makes the progress callback of each turn. `mask` (white = edit region, drawn on the first
    source) goes with every turn, resized to the image the turn edits (`turn_mask`): a result can
    have another size than the source.
    """
    save_dir = Path(save_dir)
    for line in lines:
        line = line.strip()
        if line == "/quit":
            break
        if not line:
            continue
        try:
            _run_line(session, line, save_dir, echo, new_progress, mask)
        except UserError as err:  # a bad line must not end the session
            echo(f"editkit: error: {err}", err=True)
    session.save(save_dir)
    echo(f"session saved to {save_dir} ({len(session.history)} turn(s))")
    return save_dir


def turn_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The chat's mask at the size of the image a turn edits (nearest neighbour: it stays binary)."""
    from PIL import Image

    return mask if mask.size == tuple(size) else mask.resize(tuple(size), Image.Resampling.NEAREST)


def _run_line(session: EditSession, line: str, save_dir: Path, echo: Callable[..., None],
              new_progress: Callable[[], Progress] | None, mask: Image.Image | None = None) -> None:
    if line == "/undo":
        session.undo()
        session.save(save_dir)
        echo(f"undone; {len(session.history)} turn(s) left")
    elif line.startswith("/save"):
        target = line.removeprefix("/save").strip()
        if not target:
            raise UserError("/save needs a folder: /save DIR")
        echo(f"saved session to {session.save(target)}")
    elif line.startswith("/"):
        raise UserError(f"unknown command {line.split()[0]}; use {COMMANDS}")
    else:
        overrides = {"mask": turn_mask(mask, session.current.size)} if mask is not None else {}
        session.turn(line, progress=new_progress() if new_progress else None, **overrides)
        session.save(save_dir)
        echo(f"turn {len(session.history)}: {save_dir / f'turn-{len(session.history):02d}.png'}")
