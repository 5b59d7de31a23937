"""The `editkit` command: a thin typer skin over library functions.

Each area owns its commands in `editkit/<area>/commands.py`, which exposes
`register(app)`. Command modules import heavy libraries (torch, diffusers) inside the command
functions so that `editkit --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys

import typer

from editkit.errors import UserError

COMMAND_MODULES = (
    "editkit.data.commands",
    "editkit.models.commands",
    "editkit.infer.commands",
    "editkit.train.commands",
    "editkit.eval.commands",
    "editkit.app.commands",
    "editkit.demo",
)

app = typer.Typer(
    name="editkit",
    help="Train, run and evaluate instruction-based image-editing models (Qwen-Image-Edit family).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Train, run and evaluate instruction-based image-editing models (Qwen-Image-Edit family)."""


@app.command()
def version() -> None:
    """Print editkit's version and those of the libraries it runs on."""
    from editkit.utils.runinfo import versions

    for name, value in versions().items():
        typer.echo(f"{name}: {value}")


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a UserError becomes one line on stderr and exit code 2."""
    try:
        app(args=argv)  # standalone: usage errors already exit with code 2
    except UserError as err:
        print(f"editkit: error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("editkit: interrupted (finished work is kept; run again to resume)", file=sys.stderr)
        sys.exit(130)
