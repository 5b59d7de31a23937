"""Where the app listens unless told otherwise; imports nothing, so `editkit serve`'s options
can use it without loading the server (Gradio, torch)."""

DEFAULT_HOST = "127.0.0.1"
"""Loopback only: the app is not reachable from the network unless `--host` says so."""
DEFAULT_PORT = 7999
