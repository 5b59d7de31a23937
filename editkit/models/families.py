"""The registry of model families: name -> the family object its module defines.

Each family lives in one module of `editkit/models/` that exposes `FAMILIES`, a tuple of objects
satisfying `editkit.models.family.ModelFamily` (several releases of one architecture may share a
module). Modules are imported on first use, so that the CLI can list names without torch.
Adding a family: write its module, add one line to FAMILY_MODULES.
"""

from __future__ import annotations

import importlib

from editkit.errors import UserError

FAMILY_MODULES = {
    "qwen-image-edit": "editkit.models.qwen_image_edit",
    "qwen-image-edit-2509": "editkit.models.qwen_image_edit",
    "qwen-image-edit-2511": "editkit.models.qwen_image_edit",
    "instruct-pix2pix": "editkit.models.instruct_pix2pix",
    "flux-fill": "editkit.models.flux_fill",
    "ace-plus": "editkit.models.ace_plus",
    "qwen-image-layered": "editkit.models.qwen_image_layered",
    "qwen-image-2.1": "editkit.models.qwen_image_21",
}
"""Family name -> the module that defines it."""

FAMILY_NAMES = tuple(FAMILY_MODULES)
DEFAULT_FAMILY = "qwen-image-edit-2511"


def get_family(name: str):
    """The family called `name`; a UserError lists the known ones otherwise."""
    if name not in FAMILY_MODULES:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(FAMILY_NAMES)}")
    module = importlib.import_module(FAMILY_MODULES[name])
    return next(family for family in module.FAMILIES if family.name == name)


def all_families() -> list:
    """Every registered family object, in registry order."""
    return [get_family(name) for name in FAMILY_NAMES]


def detect_family(model_index: dict, transformer_config: dict) -> str | None:
    """The family of a diffusers folder from its model_index.json and transformer config.

    editkit-written folders name it (`_editkit_family`); otherwise the first family whose
    `detect` accepts the folder.
    """
    if model_index.get("_editkit_family") in FAMILY_MODULES:
        return model_index["_editkit_family"]
    return next((f.name for f in all_families() if f.detect(model_index, transformer_config)), None)
