"""Model families, component loading, tiny presets, the EditModel facade and LoRA.

`load_model` and `EditModel` are imported lazily so that importing this package (as the CLI
does) stays free of torch.
"""

from editkit.models.families import FAMILIES, Family, get_family

__all__ = ["FAMILIES", "EditModel", "Family", "get_family", "load_model", "save_tiny"]


def __getattr__(name: str):
    if name in ("load_model", "save_tiny"):
        from editkit.models import loading

        return getattr(loading, name)
    if name == "EditModel":
        from editkit.models.edit_model import EditModel

        return EditModel
    raise AttributeError(f"module 'editkit.models' has no attribute {name!r}")
