"""Model families behind one interface; `load_backbone` picks the family from model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .base import Backbone

FAMILIES = {"StableDiffusionPipeline": "sd"}


def resolve_model(model: str) -> Path:
    """'mini' -> the embedded pristine-mini; otherwise a local diffusers model folder."""
    if model == "mini":
        from .. import mini

        return Path(mini.path())
    folder = Path(model)
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(f"model {model}: not a diffusers model folder (no model_index.json); give a folder or 'mini'")
    return folder


def load_backbone(model: str, dtype=None, allow_pickle: bool = False) -> Backbone:
    import torch

    from ..files import check_model_weights

    folder = resolve_model(model)
    check_model_weights(folder, allow_pickle)  # one line naming a damaged or pickled file, before loading
    try:
        cls_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (ValueError, KeyError):
        raise UsageError(f"{folder / 'model_index.json'}: unreadable; expected a diffusers model_index.json")
    family = FAMILIES.get(cls_name)
    if family == "sd":
        from .sd import StableDiffusionBackbone

        return StableDiffusionBackbone(folder, dtype or torch.float32, allow_pickle)
    raise UsageError(f"model {model}: pipeline {cls_name} is not supported yet; supported: {', '.join(FAMILIES)}")


__all__ = ["Backbone", "load_backbone", "resolve_model"]
