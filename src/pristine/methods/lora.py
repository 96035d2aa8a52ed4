"""DreamBooth-LoRA (Ruiz et al. 2023 with low-rank adapters): LoRA on the denoiser's attention,
optionally with the concept token's embedding (pivotal tuning), optionally with prior preservation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .base import Method, MethodConfig, TokenEmbeddings, register

ADAPTER = "learner"


@dataclass
class LoraConfig(MethodConfig):
    rank: int = 4
    alpha: float = 4.0
    targets: list = field(default_factory=list)  # empty: the family's attention projections
    dropout: float = 0.0
    train_token: bool = True  # learn the token's embedding too (its row starts as the class word's)
    token_lr: float = 5e-3
    # a LoRA of the same rank and alpha on the CLIP text encoders' attention too, at the run's learning
    # rate; saved in the same files (pytorch_lora_weights / kohya), which load_lora_weights reads whole
    train_text_encoder: bool = False

    positive: ClassVar[tuple[str, ...]] = ("rank", "alpha", "token_lr")


def lora_targets(backbone, config: LoraConfig) -> list[str]:
    return list(config.targets) or list(backbone.LORA_TARGETS)


def add_lora(backbone, config: LoraConfig, name: str) -> list[torch.nn.Parameter]:
    """A LoRA adapter on the one copy of the denoiser's weights; returns its parameters."""
    from peft import LoraConfig as PeftLoraConfig

    denoiser = backbone.denoiser
    denoiser.add_adapter(PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                        init_lora_weights="gaussian", target_modules=lora_targets(backbone, config)),
                         adapter_name=name)
    params = list(lora_params(denoiser, name).values())
    for p in params:
        p.requires_grad_(True)
    return params


def lora_params(denoiser, name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in denoiser.named_parameters() if f".{name}." in n and "lora_" in n}


class AdapterSwitch:
    """Switches which LoRA adapter of one denoiser is active, or none; the base weights are shared.

    Goes straight to the adapter layers (collected once) instead of walking all of the model's modules
    on every switch as `set_adapters` does: PureCC switches four times per step.
    """

    def __init__(self, denoiser):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]

    def use(self, name: str | None, trainable: bool = True) -> None:
        """`name` alone is active (None: the base model); `trainable` sets its parameters' requires_grad."""
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name, inference_mode=not trainable)
                layer._disable_adapters = False  # enable_adapters(True) would set the adapter a second time


def save_lora(backbone, name: str, config: LoraConfig, out_dir: Path) -> Path:
    """The adapter `name` in the family's diffusers LoRA layout."""
    return backbone.save_lora(name, config.rank, config.alpha, lora_targets(backbone, config), out_dir)


@register
class LoRA(Method):
    name = "lora"
    Config = LoraConfig
    default_lr = 1e-4
    takes_image_contexts = True

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        groups = [{"params": add_lora(self.backbone, self.config, ADAPTER)}]
        if self.config.train_text_encoder:
            groups.append({"params": self.backbone.add_text_lora(ADAPTER, self.config.rank, self.config.alpha,
                                                                 self.config.dropout)})
        if self.config.train_token:
            groups.append(self.token_group(self.config.token_lr))
        return groups

    def trainable_denoiser_params(self):
        return lora_params(self.backbone.denoiser, ADAPTER)

    def trainable_text_params(self):
        return self.backbone.text_lora_params(ADAPTER) if self.config.train_text_encoder else {}

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        paths = [save_lora(self.backbone, ADAPTER, self.config, out_dir), self.tokens.save(out_dir)]
        if "kohya" in export:
            paths.append(self.backbone.write_kohya(paths[0], out_dir / "lora_kohya.safetensors", self.config.alpha))
        return paths

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        return lora_run_denoiser(run, models)


def lora_run_denoiser(run: Path, models):
    """A run's saved LoRA (and tokens) as an adapter on the original's copy of the weights."""
    from ..sampling import AdapterDenoiser

    tokens = models.load_tokens(run)
    return AdapterDenoiser(models.backbone(), models.load_lora(run), tokens)
