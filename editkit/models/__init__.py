"""Model families (the interface in `family.py`, one file per family, the registry in `families.py`),
loading, tiny presets, speed switches and LoRA.

`load_model` is imported lazily so that importing this package (as the CLI does) stays free of torch.
"""

from editkit.models.families import DEFAULT_FAMILY, FAMILY_NAMES, get_family

__all__ = ["DEFAULT_FAMILY", "FAMILY_NAMES", "get_family", "load_model", "save_model", "save_tiny"]


def __getattr__(name: str):
    if name in ("load_model", "save_model", "save_tiny"):
        from editkit.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'editkit.models' has no attribute {name!r}")
