"""DreamBooth-LoRA (Ruiz et al. 2023 with low-rank adapters): LoRA on the denoiser's attention,
optionally with the concept token's embedding (pivotal tuning), optionally with prior preservation."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..files import durable_replace
from .base import Method, MethodConfig, TokenEmbeddings, register

ADAPTER = "learner"


@dataclass
class LoraConfig(MethodConfig):
    rank: int = 4
    alpha: float = 4.0
    targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    train_token: bool = True  # learn the token's embedding too (its row starts as the class word's)
    token_lr: float = 5e-3

    positive: ClassVar[tuple[str, ...]] = ("rank", "alpha", "token_lr")


def add_lora(denoiser, config: LoraConfig, name: str) -> list[torch.nn.Parameter]:
    """A LoRA adapter on the one copy of the denoiser's weights; returns its parameters."""
    from peft import LoraConfig as PeftLoraConfig

    denoiser.add_adapter(PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                        init_lora_weights="gaussian", target_modules=list(config.targets)),
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


def save_lora(pipeline_cls, denoiser, name: str, config: LoraConfig, out_dir: Path) -> Path:
    """pytorch_lora_weights.safetensors in the diffusers layout, rank and alpha in its metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=name))
    metadata = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": list(config.targets)}
    tmp = out_dir / ".lora.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    final = out_dir / "pytorch_lora_weights.safetensors"
    try:
        pipeline_cls.save_lora_weights(tmp, unet_lora_layers={k: v.float() for k, v in layers.items()},
                                       unet_lora_adapter_metadata=metadata, safe_serialization=True)
        durable_replace(tmp / "pytorch_lora_weights.safetensors", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
    return final


@register
class LoRA(Method):
    name = "lora"
    Config = LoraConfig
    default_lr = 1e-4

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        groups = [{"params": add_lora(self.backbone.denoiser, self.config, ADAPTER)}]
        if self.config.train_token:
            groups.append(self.token_group(self.config.token_lr))
        return groups

    def trainable_denoiser_params(self):
        return lora_params(self.backbone.denoiser, ADAPTER)

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        pipe_cls = type(self.backbone.pipeline())
        paths = [save_lora(pipe_cls, self.backbone.denoiser, ADAPTER, self.config, out_dir), self.tokens.save(out_dir)]
        if "kohya" in export:
            from ..export import write_kohya

            paths.append(write_kohya(paths[0], out_dir / "lora_kohya.safetensors", self.config.alpha,
                                     self.backbone.denoiser.config.layers_per_block))
        return paths
