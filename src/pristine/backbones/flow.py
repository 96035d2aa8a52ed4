"""What the flow-matching families (SD3/3.5, FLUX.1) share: a transformer on VAE latents, the
rectified-flow forward process x_t = (1 - σ) x0 + σ ε and its velocity target ε - x0.

Timesteps: `t` is a number u in (0, 1), drawn logit-normal (SD3's choice) or uniform; σ is u
after the scheduler's shift (a fixed shift, or FLUX.1-dev's resolution-dependent one), computed
from u and the latents' size wherever σ is needed, so methods never see or depend on it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Backbone


class FlowMatchingBackbone(Backbone):
    LORA_PREFIX = "transformer"
    # the image and the text sides of joint attention (diffusers' own SD3/FLUX LoRA scripts' choice)
    LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    # MMDiT has no separate cross-attention: text enters joint attention through its own projections
    TEXT_KV = (".add_k_proj.", ".add_v_proj.")
    # what stands for cross-attention in joint attention: the text side's keys and values
    CROSS_ATTENTION_TARGETS = ("add_k_proj", "add_v_proj")
    ENCODES_WITH_PIPELINE = True
    TIMESTEP_SAMPLING: ClassVar[str] = "logit_normal"  # or "uniform"
    MAX_SEQUENCE_LENGTH: ClassVar[int] = 256  # T5 tokens, as the pipeline's own default
    GUIDED_SAMPLING = False  # their timesteps and packing are not in sampling.py's loop yet
    SIZE_PATCH = 2  # the transformer reads 2x2 latent patches

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mean
        return (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.TIMESTEP_SAMPLING == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=generator))
        return torch.rand(n, generator=generator)

    def shift(self, latents: torch.Tensor) -> float:
        """The scheduler's σ shift; FLUX.1-dev's grows with the image's token count."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        tokens = latents.shape[-2] * latents.shape[-1] // 4  # 2x2 patches
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        return math.exp(cfg.base_shift + slope * (tokens - cfg.base_image_seq_len))

    def sigma(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        s = self.shift(latents)
        return (s * t / (1 + (s - 1) * t)).to(latents.dtype)

    def add_noise(self, x0, noise, t):
        sigma = self.sigma(t, x0).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0, noise, t):
        return noise - x0

    def predict_x0(self, x_t, t, pred):
        return x_t - self.sigma(t, x_t).view(-1, *([1] * (x_t.ndim - 1))) * pred

    def decode_latents(self, latents):
        latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample
