"""Customization methods: each a small class (config, trainable parameters, loss), found by name."""

from . import clif, concept_centric, custom_diffusion, dreambooth, lora, purecc, spf, textual_inversion  # noqa: F401  (registers them)
from .base import METHODS, Method, MethodConfig, get_method

__all__ = ["METHODS", "Method", "MethodConfig", "get_method"]
