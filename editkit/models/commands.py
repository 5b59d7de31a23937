"""CLI commands of this area (registered by editkit.cli)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
