"""Custom Diffusion (Kumari et al. 2023): the projections of text to keys and values plus the token
(cross-attention to_k/to_v in a UNet, the text side add_k_proj/add_v_proj of MMDiT joint attention)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint import atomic_save
from ..sampling import Denoiser, use_adapter
from .base import Method, MethodConfig, TokenEmbeddings, register

WEIGHTS = "custom_diffusion.safetensors"


@dataclass
class CustomDiffusionConfig(MethodConfig):
    token_lr: float = 1e-3

    positive: ClassVar[tuple[str, ...]] = ("token_lr",)


@register
class CustomDiffusion(Method):
    name = "custom_diffusion"
    Config = CustomDiffusionConfig
    default_lr = 1e-5
    takes_image_contexts = True

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        params = list(self.backbone.text_kv_params().values())
        for p in params:
            p.requires_grad_(True)
        return [{"params": params}, self.token_group(self.config.token_lr)]

    def trainable_denoiser_params(self):
        return self.backbone.text_kv_params()

    def base_weights_trained(self):
        return self.backbone.text_kv_params()  # trained in place: preservation keeps their loaded values

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        from diffusers import UNet2DConditionModel

        from ..export import CUSTOM_DIFFUSION_PROCS, custom_diffusion_attn_procs

        path = out_dir / WEIGHTS
        trained = {k: v.float() for k, v in self.backbone.text_kv_params().items()}
        atomic_save(trained, path, metadata={"format": "pristine.custom_diffusion", "keys": "denoiser parameter names"})
        paths = [path, self.tokens.save(out_dir)]
        unet = self.backbone._unwrapped(self.backbone.denoiser)
        if isinstance(unet, UNet2DConditionModel):  # diffusers' processors exist for UNet attention only
            procs = out_dir / CUSTOM_DIFFUSION_PROCS
            atomic_save(custom_diffusion_attn_procs(unet, trained), procs, metadata={"format": "pt"})
            paths.append(procs)
        return paths

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        from ..errors import UsageError
        from ..files import check_safetensors

        path = run / WEIGHTS
        if not path.is_file():
            raise UsageError(f"--guide: adapter {run} lacks {WEIGHTS}; the run is incomplete, train it again")
        check_safetensors(path, "--adapter")
        return SwappedKeyValues(models.backbone(), run.name, models.load_tokens(run), path)


def apply_custom_diffusion(denoiser, path: Path) -> None:
    """Load saved key/value projections into a pipeline's denoiser (sampling)."""
    from safetensors.torch import load_file

    params = dict(denoiser.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(path)).items():
            params[k].copy_(v.to(params[k].dtype))



class SwappedKeyValues(Denoiser):
    """The run's key/value projections swapped into the original's copy for its forwards only."""

    def __init__(self, backbone, name: str, tokens: dict[str, int], path: Path):
        from safetensors.torch import load_file

        super().__init__(backbone, name, tokens)
        self.weights = load_file(str(path))

    @property
    def key(self) -> tuple:
        return (id(self.backbone), f"custom_diffusion:{self.name}")

    @contextmanager
    def active(self):
        use_adapter(self.backbone, None)
        params = dict(self.backbone.denoiser.named_parameters())
        kept = {k: params[k].detach().clone() for k in self.weights}
        with torch.no_grad():
            for k, v in self.weights.items():
                params[k].copy_(v.to(params[k]))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in kept.items():
                    params[k].copy_(v)
