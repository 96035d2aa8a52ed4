"""DreamBooth (Ruiz et al. 2023): the whole denoiser fine-tunes; the result is a full model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Method, MethodConfig, TokenEmbeddings, register


@dataclass
class DreamBoothConfig(MethodConfig):
    train_token: bool = True
    token_lr: float = 5e-3


@register
class DreamBooth(Method):
    name = "dreambooth"
    Config = DreamBoothConfig
    default_lr = 2e-5

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        self.backbone.denoiser.requires_grad_(True)
        groups = [{"params": [p for p in self.backbone.denoiser.parameters()]}]
        if self.config.train_token:
            groups.append({"params": [self.tokens.make_trainable()], "lr": self.config.token_lr, "weight_decay": 0.0})
        return groups

    def trainable_state(self):
        return {**{f"denoiser.{k}": v.detach().clone() for k, v in self.backbone.denoiser.state_dict().items()},
                **self.tokens.state()}

    def load_trainable_state(self, state):
        self.backbone.denoiser.load_state_dict({k[len("denoiser."):]: v for k, v in state.items() if k.startswith("denoiser.")})
        self.tokens.load_state(state)

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        import shutil

        tmp, final = out_dir / ".model.tmp", out_dir / "model"
        shutil.rmtree(tmp, ignore_errors=True)
        self.backbone.pipeline().save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return [final, self.tokens.save(out_dir)]
