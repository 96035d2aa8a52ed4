"""The one small interface every model family implements.

A method only ever asks a backbone to encode prompts, add noise, give the training target and
predict; epsilon, v-prediction and flow-matching families all fit behind these calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backbone(ABC):
    family: str = ""
    denoiser: torch.nn.Module  # where adapters attach (UNet or transformer)
    text_encoders: list[torch.nn.Module]
    tokenizers: list

    # ---- prompts ----
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning for the denoiser, as keyword tensors batched along dim 0."""

    @abstractmethod
    def add_tokens(self, tokens: list[str], init_words: list[str], vectors_per_token: int = 1) -> list[int]:
        """Add new tokens to every tokenizer/text encoder, their rows initialised from init words."""

    # ---- images and noise ----
    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents."""

    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output: eps, v, or the flow velocity eps - x0."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...

    # ---- inference ----
    @abstractmethod
    def pipeline(self):
        """A diffusers pipeline over these very modules (no copies)."""
