"""The Shapes world: a procedural, seeded world of captioned scenes with exact ground truth."""

from . import vocab
from .render import render
from .scene import FULL_WORLD, PRETRAINING_WORLD, Scene, SceneSampler, WorldObject

__all__ = ["vocab", "render", "Scene", "SceneSampler", "WorldObject", "FULL_WORLD", "PRETRAINING_WORLD"]
