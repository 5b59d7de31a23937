"""The `editkit` command: a thin typer skin over library functions.

Each area owns its commands in `editkit/<area>/commands.py`, which exposes
`register(app)`. Command modules import heavy libraries (torch, diffusers) inside the command
functions so that `editkit --help` stays instant.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import typer

from editkit.errors import UserError

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

COMMAND_MODULES = (
    "editkit.data.commands",
    "editkit.layers.commands",
    "editkit.models.commands",
    "editkit.infer.commands",
    "editkit.train.commands",
    "editkit.eval.commands",
    "editkit.app.commands",
    "editkit.queue.commands",
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
    """Run the CLI. A user mistake — editkit's UserError, or a usage error click finds (unknown
    option, bad or out-of-range value, missing argument) — is one line on stderr and exit code 2.

    The command runs outside typer's standalone mode, which would print usage errors as a boxed
    multi-line panel and turn Ctrl+C into a silent exit 130.
    """
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with command.make_context("editkit", args) as ctx:
            command.invoke(ctx)
    except click_errors.NoArgsIsHelpError as err:  # bare `editkit` / `editkit data`: the help
        if err.format_message().strip():  # typer's rich help is already printed
            print(err.format_message())
        sys.exit(err.exit_code)
    except click_errors.UsageError as err:
        _error_line(_usage_message(err))
    except click_errors.ClickException as err:
        _error_line(err.format_message())
    except UserError as err:
        _error_line(str(err))
    except typer.Exit as exit_:  # --help, and commands that end with typer.Exit(code)
        sys.exit(exit_.exit_code)
    except typer.Abort:
        print("editkit: aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("editkit: interrupted (finished work is kept; run again to resume)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `editkit ... | head` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        _error_line(f"the disk is full{where}; free space and run the command again (finished work is kept; "
                    "writes are atomic, so nothing half-written was left)")
    else:
        sys.exit(0)  # as typer's standalone mode did: callers (and tests) see the exit code


def _usage_message(err) -> str:
    """click's message as one line, pointing at the command's --help."""
    what = " ".join(err.format_message().split()).rstrip(".")
    if err.ctx is None:
        return what
    return f"{what}; see '{err.ctx.command_path} --help'"


def _error_line(message: str) -> None:
    print(f"editkit: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(UserError.exit_code)
