"""Model families behind one interface; `load_backbone` picks the family from model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .base import Backbone

# model_index.json's _class_name -> the backbone class of that family (module relative to this package)
FAMILIES = {
    "StableDiffusionPipeline": ".sd.StableDiffusionBackbone",
    "StableDiffusionXLPipeline": ".sdxl.StableDiffusionXLBackbone",
    "StableDiffusion3Pipeline": ".sd3.StableDiffusion3Backbone",
    "FluxPipeline": ".flux.FluxBackbone",
}


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


def backbone_class(folder: Path) -> type[Backbone]:
    """The family of a diffusers folder, from its model_index.json's pipeline class."""
    import importlib

    index = folder / "model_index.json"
    try:
        cls_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{index}: unreadable; expected a diffusers model_index.json with _class_name")
    if cls_name not in FAMILIES:
        raise UsageError(f"{index}: _class_name {cls_name} is not a supported family; supported: {', '.join(FAMILIES)}")
    module, name = FAMILIES[cls_name].rsplit(".", 1)
    return getattr(importlib.import_module(module, __name__), name)


def load_backbone(model: str, dtype=None, allow_pickle: bool = False) -> Backbone:
    import torch

    from ..files import check_model_weights

    folder = resolve_model(model)
    check_model_weights(folder, allow_pickle)  # one line naming a damaged or pickled file, before loading
    return backbone_class(folder)(folder, dtype or torch.float32, allow_pickle)


__all__ = ["Backbone", "backbone_class", "load_backbone", "resolve_model"]
