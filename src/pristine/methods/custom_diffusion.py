"""Custom Diffusion (Kumari et al. 2023): cross-attention key/value projections plus the token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint import atomic_save
from .base import Method, MethodConfig, TokenEmbeddings, register

WEIGHTS = "custom_diffusion.safetensors"


def cross_attention_kv(denoiser) -> dict[str, torch.nn.Parameter]:
    """The to_k / to_v weights of every cross-attention block (attn2 reads the text)."""
    return {n: p for n, p in denoiser.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}


@dataclass
class CustomDiffusionConfig(MethodConfig):
    token_lr: float = 1e-3

    positive: ClassVar[tuple[str, ...]] = ("token_lr",)


@register
class CustomDiffusion(Method):
    name = "custom_diffusion"
    Config = CustomDiffusionConfig
    default_lr = 1e-5

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        params = list(cross_attention_kv(self.backbone.denoiser).values())
        for p in params:
            p.requires_grad_(True)
        return [{"params": params}, self.token_group(self.config.token_lr)]

    def trainable_denoiser_params(self):
        return cross_attention_kv(self.backbone.denoiser)

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        path = out_dir / WEIGHTS
        atomic_save({k: v.float() for k, v in cross_attention_kv(self.backbone.denoiser).items()}, path,
                    metadata={"format": "pristine.custom_diffusion", "keys": "unet parameter names"})
        return [path, self.tokens.save(out_dir)]


def apply_custom_diffusion(unet, path: Path) -> None:
    """Load saved key/value projections into a UNet (sampling)."""
    from safetensors.torch import load_file

    params = dict(unet.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(path)).items():
            params[k].copy_(v.to(params[k].dtype))
