"""Usage errors click finds (unknown option, bad or out-of-range value, missing argument) are one
editkit line and exit 2 for every command; --help and Ctrl+C keep working."""

import subprocess
import sys

import pytest
import typer

from editkit.cli import app, main


def _command_paths():
    stack = [((), typer.main.get_command(app))]
    while stack:
        path, cmd = stack.pop()
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((path + (name,), sub))


def _run(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def _one_error_line(capsys, *args) -> str:
    code, _, err = _run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editkit: error: "), err
    return lines[0]


@pytest.mark.parametrize("path", sorted(_command_paths()), ids=lambda p: " ".join(p) or "editkit")
def test_unknown_option_is_one_line_for_every_command(capsys, path):
    line = _one_error_line(capsys, *path, "--no-such-option")
    assert "No such option: --no-such-option" in line
    assert line.endswith(f"; see '{' '.join(('editkit', *path))} --help'")


@pytest.mark.parametrize(("args", "expected"), [
    (("eval", "--pred", "p", "--data", "d", "--out", "o", "--batch-size", "0"),
     "Invalid value for '--batch-size'"),
    (("data", "validate"), "Missing argument 'manifest'; see 'editkit data validate --help'"),
    (("edit", "--model", "tiny", "--steps", "abc"), "Invalid value for '--steps'"),
    (("no-such-command",), "No such command 'no-such-command'; see 'editkit --help'"),
])
def test_click_usage_errors_are_one_line(capsys, args, expected):
    assert expected in _one_error_line(capsys, *args)


def test_help_still_prints_and_exits_0(capsys):
    code, out, err = _run(capsys, "data", "validate", "--help")
    assert code == 0 and "Usage: editkit data validate" in out and err == ""


def test_bare_group_shows_its_help(capsys):
    code, out, _ = _run(capsys, "data")
    assert code == 2 and "validate" in out


def test_ctrl_c_is_one_line_and_exit_130():
    code = (
        "from editkit import cli\n"
        "@cli.app.command('sleep')\n"
        "def sleep():\n"
        "    raise KeyboardInterrupt\n"
        "cli.main(['sleep'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == ["editkit: interrupted (finished work is kept; run again to resume)"]


HEAVY = ("torch", "diffusers", "transformers", "gradio", "matplotlib", "scipy", "peft", "accelerate")


def test_help_and_validate_import_no_heavy_library(tmp_path):
    """Start-up stays cheap: heavy libraries load inside the commands that need them (a fresh
    interpreter, since this test process has them loaded already)."""
    from PIL import Image

    for name in ("s.png", "t.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"source_image": "s.png", "target_image": "t.png", "instruction": "x"}\n')
    paths = [list(p) for p in _command_paths()]
    code = (
        "import contextlib, io, sys\n"
        "from editkit.cli import main\n"
        f"for path in {paths!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([*path, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "try:\n"
        f"    main(['data', 'validate', {str(manifest)!r}])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code == 0, exit_.code\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_full_disk_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    import errno

    from PIL import Image

    from editkit.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SystemExit) as exit_:
        main(["data", "synth", "--out", str(tmp_path / "set"), "--n", "2", "--size", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1].startswith("editkit: error: the disk is full while writing") and "Traceback" not in "".join(err)
