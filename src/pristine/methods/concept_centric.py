"""The concept-centric (null-text) model (METHODS.md 3, arXiv 2312.08195): a denoiser for a whole domain,
trained on an uncaptioned image folder, without text.

Every cross-attention block's output is replaced by a constant vector, the mean output of that block for
the empty prompt measured by real forward passes (real latents of the training images, real noise, a
spread of timesteps; the authors' release never runs that pass and trains with a zero buffer loaded with
strict=False), and the norm before it is dropped. The rest fine-tunes (or a LoRA on it) with the plain
loss; the trainer's EMA of the weights is on by default. At sampling time it is one guidance term,
beside the frozen original's ∅ and a control prompt on the original or a customized model:

    f̃ = f_SD(∅) + s_c [f_CDM(x_t) - f_SD(∅)] + s_ctrl [f_ctrl(c_ctrl) - f_SD(∅)]

Which blocks are cross-attention and how they are replaced is the backbone's business (`make_text_free`,
`measure_null_text`); this file only decides when.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint import atomic_save
from ..errors import UsageError
from ..sampling import Denoiser, use_adapter
from .base import Method, MethodConfig, denoising_loss, register
from .lora import LoraConfig, add_lora, lora_params, save_lora

ADAPTER = "concept"
MODEL_FILE = "concept_model.safetensors"  # the whole denoiser, constants included (full fine-tune)
CONSTANTS_FILE = "null_text.safetensors"  # the constants alone (the LoRA option, beside its LoRA)
CONSTANT_PREFIX = "null_text."


@dataclass
class ConceptCentricConfig(MethodConfig):
    lora: bool = False  # a LoRA on the text-free denoiser instead of the full fine-tune
    rank: int = 16
    alpha: float = 16.0
    measure_passes: int = 8  # forward passes for the constants, each with fresh noise and timesteps
    measure_images: int = 32  # training images per pass

    positive: ClassVar[tuple[str, ...]] = ("rank", "alpha", "measure_passes", "measure_images")


@register
class ConceptCentric(Method):
    name = "concept_centric"
    Config = ConceptCentricConfig
    default_lr = 1e-5  # the reference setting (full fine-tune)
    uses_text = False
    default_ema_decay = 0.999

    def setup(self) -> list[dict]:
        # the cross-attention blocks stay until `prepare` has measured them with the training images
        self.constant_modules = self.backbone.make_text_free(measure=True)
        if self.config.lora:
            return [{"params": add_lora(self.backbone, LoraConfig(rank=self.config.rank, alpha=self.config.alpha), ADAPTER)}]
        self.backbone.denoiser.requires_grad_(True)
        return [{"params": list(self.backbone.denoiser.parameters())}]

    def prepare(self, data) -> None:
        n = min(self.config.measure_images, len(data))
        if data.latents is not None:
            latents = data.latents[:n, 0]  # the unflipped views
        else:
            with torch.no_grad():
                latents = self.backbone.encode_images(data.pixels[:n].to(self.backbone.denoiser.device))
        generator = torch.Generator().manual_seed(0)
        self.measured = self.backbone.measure_null_text(latents, generator, self.config.measure_passes)

    def trainable_denoiser_params(self):
        if self.config.lora:
            return lora_params(self.backbone.denoiser, ADAPTER)
        return dict(self.backbone.denoiser.named_parameters())

    def constants(self) -> dict[str, torch.Tensor]:
        return {name: m.constant for name, m in self.constant_modules.items()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # the constants travel with every checkpoint: a resumed run never re-measures
        return {**super().trainable_state(), **{CONSTANT_PREFIX + k: v.detach().clone() for k, v in self.constants().items()}}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state({k: v for k, v in state.items() if not k.startswith(CONSTANT_PREFIX)})
        with torch.no_grad():
            for name, constant in self.constants().items():
                constant.copy_(state[CONSTANT_PREFIX + name])

    def loss(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        latents = batch["latents"]
        with torch.no_grad():  # no text: the same condition for every example (it reaches no block that reads it)
            cond = self.backbone.unconditional(len(latents))
        loss, _ = denoising_loss(self.backbone, latents, cond, generator, batch=batch)
        return loss, {}

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        constants = {k: v.detach().float() for k, v in self.constants().items()}
        if self.config.lora:
            path = out_dir / CONSTANTS_FILE
            atomic_save(constants, path, metadata={"format": "pristine.null_text_constants"})
            return [save_lora(self.backbone, ADAPTER, LoraConfig(self.config.rank, self.config.alpha), out_dir), path]
        path = out_dir / MODEL_FILE
        state = self.backbone._unwrapped(self.backbone.denoiser).state_dict()
        atomic_save({k: v.detach().float() for k, v in state.items()}, path,
                    metadata={"format": "pristine.concept_centric (denoiser state dict, text-free)"})
        return [path]

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        """A copy of the run's base model made text-free, then loaded strictly: a missing constant is an error."""
        from safetensors.torch import load_file

        from ..files import check_safetensors

        config = cls.Config.from_dict(settings.get("method_args") or {})
        backbone = models.fresh_backbone()
        backbone.make_text_free(measure=False)
        denoiser = backbone._unwrapped(backbone.denoiser)
        files = [CONSTANTS_FILE, "pytorch_lora_weights.safetensors"] if config.lora else [MODEL_FILE]
        for name in files:
            if not (run / name).is_file():
                raise UsageError(f"--guide: adapter {run} lacks {name}; the run is incomplete, train it again")
            check_safetensors(run / name, "--adapter")
        if config.lora:
            saved = {k + ".constant": v for k, v in load_file(str(run / CONSTANTS_FILE)).items()}
            expected = {k for k in denoiser.state_dict() if k.endswith(".attn2.constant")}
            if set(saved) != expected:
                raise UsageError(f"--guide: {run / CONSTANTS_FILE} does not match the model's cross-attention blocks; "
                                 f"sample it with the model it was trained on ({settings.get('model')})")
            denoiser.load_state_dict(saved, strict=False)  # exactly the constants, checked above
            backbone.pipeline().load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors",
                                                  adapter_name=ADAPTER)
        else:
            try:
                denoiser.load_state_dict(load_file(str(run / MODEL_FILE)), strict=True)
            except RuntimeError as e:
                raise UsageError(f"--guide: {run / MODEL_FILE} does not fit the model ({str(e).splitlines()[0][:120]}); "
                                 f"sample it with the model it was trained on ({settings.get('model')})")
        return NullTextDenoiser(backbone, run.name, ADAPTER if config.lora else None)


class NullTextDenoiser(Denoiser):
    """A concept-centric model: a copy of its own, no text (any prompt gives the same prediction)."""

    def __init__(self, backbone, name: str, adapter: str | None):
        super().__init__(backbone, name)
        self.adapter = adapter

    @property
    def key(self) -> tuple:
        return (id(self.backbone), "null_text")

    @contextmanager
    def active(self):
        use_adapter(self.backbone, self.adapter)
        yield

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if getattr(self, "_null", (0, None))[0] != len(prompts):
            with torch.no_grad():
                self._null = (len(prompts), self.backbone.unconditional(len(prompts)))
        return self._null[1]
