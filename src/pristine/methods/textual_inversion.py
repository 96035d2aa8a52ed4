"""Textual Inversion (Gal et al. 2023): only the new tokens' embedding vectors learn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .base import Method, MethodConfig, TokenEmbeddings, register


@dataclass
class TextualInversionConfig(MethodConfig):
    vectors: int = 1  # vectors per token: "<v1>" becomes "<v1> <v1>_1 ..." inside prompts

    positive: ClassVar[tuple[str, ...]] = ("vectors",)


@register
class TextualInversion(Method):
    name = "textual_inversion"
    Config = TextualInversionConfig
    default_lr = 5e-3
    takes_image_contexts = True
    preserve_refusal = ("textual_inversion trains only the token's embedding: prompts without the token already "
                        "draw what the original model draws, so there is nothing to preserve; drop --preserve")

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts, self.config.vectors)
        return [self.token_group()]

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        return [self.tokens.save(out_dir)]

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        from ..sampling import Denoiser

        # the original weights: only the text side changes, so its terms batch with the original's
        return Denoiser(models.backbone(), run.name, models.load_tokens(run))
