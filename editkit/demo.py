"""`editkit demo`: the whole loop on the embedded synthetic dataset."""

import typer


def register(app: typer.Typer) -> None:
    """Add the demo command to the editkit app."""
