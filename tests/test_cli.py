import subprocess
import sys

import pytest
import typer

from editkit.cli import app


def _all_command_paths():
    root = typer.main.get_command(app)
    stack = [((), root)]
    while stack:
        path, cmd = stack.pop()
        yield path
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                stack.append((path + (name,), sub))


@pytest.mark.parametrize("path", sorted(_all_command_paths()), ids=lambda p: " ".join(p) or "editkit")
def test_every_command_has_help(path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_user_error_is_one_line_and_exit_2(tmp_path):
    code = (
        "import typer\n"
        "from editkit import cli\n"
        "from editkit.errors import UserError\n"
        "@cli.app.command('boom')\n"
        "def boom():\n"
        "    raise UserError('manifest.jsonl:3: field \"instruction\" is empty; write one')\n"
        "cli.main(['boom'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'editkit: error: manifest.jsonl:3: field "instruction" is empty; write one']
