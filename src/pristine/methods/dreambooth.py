"""DreamBooth (Ruiz et al. 2023): the whole denoiser fine-tunes; the result is a full model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .base import Method, MethodConfig, TokenEmbeddings, register


@dataclass
class DreamBoothConfig(MethodConfig):
    train_token: bool = True
    token_lr: float = 5e-3

    positive: ClassVar[tuple[str, ...]] = ("token_lr",)


@register
class DreamBooth(Method):
    name = "dreambooth"
    Config = DreamBoothConfig
    default_lr = 2e-5
    takes_image_contexts = True
    preserve_refusal = ("dreambooth fine-tunes the whole denoiser, so the original's prediction would need a second "
                        "copy of the model; use --method lora (DreamBooth with LoRA) for --preserve, or "
                        "--prior-preservation with dreambooth")

    def setup(self) -> list[dict]:
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        self.backbone.denoiser.requires_grad_(True)
        groups = [{"params": list(self.backbone.denoiser.parameters())}]
        if self.config.train_token:
            groups.append(self.token_group(self.config.token_lr))
        return groups

    def trainable_denoiser_params(self):
        return dict(self.backbone.denoiser.named_parameters())

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        from ..files import replace_folder

        self.tokens.write_back()  # the saved text encoder carries the learned token
        pipe = self.backbone.pipeline()
        final = replace_folder(out_dir / "model", lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
        return [final, self.tokens.save(out_dir)]

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        from ..errors import UsageError
        from ..sampling import Denoiser

        if not (run / "model" / "model_index.json").is_file():
            raise UsageError(f"--guide: adapter {run} lacks its model/ folder; the run is incomplete, train it again")
        return Denoiser(models.backbone(run / "model"), run.name)  # a copy of its own: every weight changed
