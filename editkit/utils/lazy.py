"""A module imported on first use, so that light commands (`editkit model info`, `--help`) that only
read a family's facts do not pay for importing torch (seconds)."""

from __future__ import annotations

import importlib


class LazyModule:
    """Stands for the module `name`; the first attribute access imports it (then sys.modules caches it).

    The standard library's `importlib.util.LazyLoader` would replace the module in sys.modules,
    which torch's own import machinery does not tolerate; a proxy in one module's namespace does.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)
