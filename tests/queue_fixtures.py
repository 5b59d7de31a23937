"""The queue CLI on a scratch queue folder, for the queue tests."""

import pytest
import typer
from typer.testing import CliRunner

from editkit.queue.commands import register


@pytest.fixture
def queue_cli(tmp_path, monkeypatch):
    """`cli(*args)`: `editkit queue ARGS` through typer's runner, the queue under tmp_path/q."""
    monkeypatch.setenv("EDITKIT_QUEUE", str(tmp_path / "q"))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return lambda *args: CliRunner().invoke(app, ["queue", *args])
