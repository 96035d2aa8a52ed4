"""What every method shares: the config/parameters/loss contract, the denoising loss, new tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint import atomic_save
from ..data import ConceptSpec
from ..errors import UsageError


@dataclass
class MethodConfig:
    """Fields common to all methods; each method's Config adds its own."""

    positive: ClassVar[tuple[str, ...]] = ()  # numeric settings that must be above zero (ranks, rates)

    @classmethod
    def from_dict(cls, values: dict, where: str = "method_args") -> "MethodConfig":
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise UsageError(f"{where}.{key}: unknown setting for this method; known: {', '.join(known) or 'none'}")
        out = {}
        for key, value in values.items():
            default = getattr(cls, key, None) if not callable(getattr(cls, key, None)) else None
            out[key] = _coerce(value, known[key].type, default, f"{where}.{key}")
        config = cls(**out)
        for name in cls.positive:
            if not getattr(config, name) > 0:
                raise UsageError(f"{where}.{name}: must be positive, got {getattr(config, name)}")
        return config


def _coerce(value, type_name, default, where: str):
    """YAML/CLI values against a dataclass field's annotation (annotations are strings here)."""
    t = str(type_name)
    if value is None and default is None and t.endswith("None"):
        return None  # an optional setting left unset
    try:
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise UsageError(f"{where}: must be a finite number, got {value}")
            return value
        if t.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t.startswith("str"):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # `--method-arg stage=1` reads 1 as a number
            if not isinstance(value, str):
                raise ValueError
            return value
        if t.startswith("list") or t.startswith("tuple"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {t}, got {value!r}")
    return value


class _EncoderRows:
    """The new tokens' rows of one text encoder, in a parameter of their own.

    A forward hook puts them in place of the embedding's output wherever a new token's id appears:
    the optimizer then holds (n_tokens, dim) values instead of the whole (vocabulary, dim) matrix,
    which made each step and each checkpoint cost as much as the vocabulary.
    """

    def __init__(self, name: str, encoder, ids: list[int]):
        self.name, self.ids = name, ids
        self.weight = encoder.get_input_embeddings().weight
        # every embedding module sharing that matrix: T5's encoder looks tokens up in its own
        # `embed_tokens`, tied to (but not the same module as) the `shared` one get_input_embeddings gives
        self.embeddings = [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is self.weight]
        self.rows = torch.nn.Parameter(self.weight[ids].detach().clone(), requires_grad=False)
        self._id_tensor = torch.tensor(ids)
        self._hooks = []

    def make_trainable(self) -> torch.nn.Parameter:
        self.rows.requires_grad_(True)
        if not self._hooks:
            self._hooks = [e.register_forward_hook(self._substitute) for e in self.embeddings]
        return self.rows

    def _substitute(self, module, args, output):
        hit = args[0].unsqueeze(-1) == self._id_tensor.to(args[0].device)  # (..., n_new)
        if not bool(hit.any()):
            return output
        rows = hit.to(self.rows.dtype) @ self.rows  # each position's new row (zero where none)
        return torch.where(hit.any(-1, keepdim=True), rows.to(output.dtype), output)

    def write_back(self) -> None:
        with torch.no_grad():
            self.weight[self.ids] = self.rows.detach().to(self.weight.dtype)


class TokenEmbeddings:
    """New tokens in every text encoder of the model; only their rows learn, every other row stays
    bit-identical. `write_back` copies the rows into the embedding matrices for saving a model."""

    def __init__(self, backbone, concepts: list[ConceptSpec], vectors_per_token: int = 1):
        self.backbone = backbone
        self.tokens = {c.token: vectors_per_token for c in concepts}
        ids = backbone.add_tokens([c.token for c in concepts], [c.init_word or c.class_word for c in concepts],
                                  vectors_per_token)
        self.encoders = [_EncoderRows(name, enc, enc_ids) for (name, _, enc), enc_ids in zip(backbone.text_pairs(), ids)]
        # the first encoder's, for single-encoder callers
        self.ids, self.rows = self.encoders[0].ids, self.encoders[0].rows

    @property
    def trainable(self) -> bool:
        return self.rows.requires_grad

    def make_trainable(self) -> list[torch.nn.Parameter]:
        return [e.make_trainable() for e in self.encoders]

    def freeze(self) -> None:
        for e in self.encoders:
            e.rows.requires_grad_(False)

    def write_back(self) -> None:
        for e in self.encoders:
            e.write_back()

    def _key(self, k: int, i: int) -> str:
        return f"token.{i}" if k == 0 else f"token.{self.encoders[k].name}.{i}"  # the first keeps the old name

    def state(self) -> dict[str, torch.Tensor]:
        return {self._key(k, i): e.rows[j].detach().clone()
                for k, e in enumerate(self.encoders) for j, i in enumerate(e.ids)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, e in enumerate(self.encoders):
                for j, i in enumerate(e.ids):
                    e.rows[j] = state[self._key(k, i)]
        self.write_back()

    def learned_embeds(self, k: int = 0) -> dict[str, torch.Tensor]:
        """{token: (n_vectors, dim)} of encoder k: the layout diffusers' load_textual_inversion reads."""
        out, j = {}, 0
        for token, n in self.tokens.items():
            out[token] = self.encoders[k].rows[j:j + n].detach().clone()
            j += n
        return out

    @staticmethod
    def file_name(k: int, encoder_name: str) -> str:
        from ..backbones.base import embeddings_file

        return embeddings_file(k, encoder_name)

    def save(self, out_dir: Path) -> Path:
        """One file per text encoder (each loads with load_textual_inversion into that encoder); returns the first."""
        paths = []
        for k, e in enumerate(self.encoders):
            path = out_dir / self.file_name(k, e.name)
            embeds = self.learned_embeds(k)
            atomic_save({t: (v[0] if len(v) == 1 else v).float() for t, v in embeds.items()}, path,
                        metadata={"tokens": ",".join(embeds), "text_encoder": e.name})
            paths.append(path)
        return paths[0]

    def load_saved(self, run: Path) -> None:
        """The rows from a run's saved embeddings (PureCC stage 2 reads stage 1's)."""
        from safetensors.torch import load_file

        with torch.no_grad():
            for k, e in enumerate(self.encoders):
                learned = load_file(str(run / self.file_name(k, e.name)))
                j = 0
                for token, n in self.tokens.items():
                    e.rows[j:j + n] = learned[token].reshape(n, -1)
                    j += n
        self.write_back()

    def prompt(self, text: str) -> str:
        return self.backbone.expand_prompt(text, self.tokens)


def draw_noise(backbone, latents: torch.Tensor, generator: torch.Generator,
               batch: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's noise and timesteps. The training loop draws them for the whole batch of all processes
    and hands each process its rows (so N processes see what one process with N times the batch would);
    called outside the loop, they come from the generator."""
    if batch is not None and "noise" in batch:
        return batch["noise"].to(latents), batch["timesteps"].to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return noise, backbone.sample_timesteps(len(latents), generator).to(latents.device)


def denoising_loss(backbone, latents: torch.Tensor, cond: dict, generator: torch.Generator,
                   weights: torch.Tensor | None = None, batch: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain diffusion loss, per sample: (mean loss, per-sample losses)."""
    noise, t = draw_noise(backbone, latents, generator, batch)
    x_t = backbone.add_noise(latents, noise, t)
    pred = backbone.predict(x_t, t, cond)
    per_sample = (pred.float() - backbone.target(latents, noise, t).float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        return (per_sample * weights).sum() / weights.sum(), per_sample
    return per_sample.mean(), per_sample


class Method:
    """A customization method: its config, its trainable parameters, its loss, its outputs."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # True when prompts' text embeddings never change during training and can be cached
    frozen_text: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, backbone, concepts: list[ConceptSpec]):
        self.config, self.backbone, self.concepts = config, backbone, concepts
        self.tokens: TokenEmbeddings | None = None

    def setup(self) -> list[dict]:
        """Add adapters/tokens; return optimizer parameter groups."""
        raise NotImplementedError

    def trainable_denoiser_params(self) -> dict[str, torch.nn.Parameter]:
        """The denoiser weights this method trains, by name (checkpoints save exactly these)."""
        return {}

    def token_group(self, lr: float | None = None) -> dict:
        """The optimizer group of the new tokens' rows: no weight decay, so no other row ever moves."""
        group = {"params": self.tokens.make_trainable(), "weight_decay": 0.0}
        if lr is not None:
            group["lr"] = lr
        return group

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"denoiser.{k}": p.detach().clone() for k, p in self.trainable_denoiser_params().items()}
        if self.tokens is not None:
            state.update(self.tokens.state())
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_denoiser_params()
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("denoiser."):
                    params[k[len("denoiser."):]].copy_(v)
        if self.tokens is not None:
            self.tokens.load_state(state)

    def encode(self, prompts: list[str]) -> dict:
        if self.tokens is not None:
            prompts = [self.tokens.prompt(p) for p in prompts]
        if (self.tokens is not None and self.tokens.trainable) or any(
                p.requires_grad for te in self.backbone.text_encoders for p in te.parameters()):
            return self.backbone.encode_prompts(prompts)
        # the text side is frozen: each prompt is encoded once
        cache = self.__dict__.setdefault("_text_cache", {})
        missing = sorted(set(prompts) - set(cache))
        if missing:
            with torch.no_grad():
                encoded = self.backbone.encode_prompts(missing)
            for i, p in enumerate(missing):
                cache[p] = {k: v[i] for k, v in encoded.items()}
        return {k: torch.stack([cache[p][k] for p in prompts]) for k in cache[prompts[0]]}

    def loss(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        cond = self.encode(batch["prompts"])
        weights = torch.where(batch["is_prior"], torch.tensor(prior_weight), torch.tensor(1.0))
        loss, per_sample = denoising_loss(self.backbone, batch["latents"], cond, generator, weights.to(batch["latents"].device),
                                          batch)
        logs = {}
        if batch["is_prior"].any():
            logs["prior"] = per_sample[batch["is_prior"]].mean().item()
        return loss, logs

    def prepare(self, data) -> None:
        """After the training set is built and the models are on their device, before the first step:
        a method that needs the training images themselves (concept_centric measures with them) does it here."""

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        raise NotImplementedError

    # ---- the inference side (sampling.py) ----
    # A GuidedSampler subclass for a method that samples its own way (own attention processors, own
    # guidance rule); None: the engine's loop.
    sampler: ClassVar[type | None] = None
    # whether training reads captions and a token; False: an uncaptioned image folder is the data
    uses_text: ClassVar[bool] = True
    # EMA of the trained weights when the run does not say (0: off)
    default_ema_decay: ClassVar[float] = 0.0

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        """The finished run's outputs as a `sampling.Denoiser` on the engine's `models` (adapters on the
        original's copy where possible). `settings` is the run's config.yaml."""
        raise UsageError(f"runs of method {cls.name} cannot be sampled yet")


class TrainableParameters(torch.nn.Module):
    """Every parameter a method trains (LoRA weights, a whole denoiser, new tokens' rows), registered in
    one module whose forward is the method's loss.

    It is the one thing the training loop gives accelerate to prepare: under several processes DDP then
    all-reduces the gradient of each of these tensors, whichever model it sits in, and starts them
    equal on every process. The parameters are the method's own (not copies), so nothing else changes.
    """

    def __init__(self, method: "Method", params: list[torch.nn.Parameter]):
        super().__init__()
        for p in params:  # DDP follows only what requires a gradient when it is built; a method with
            p.requires_grad_(True)  # stages (PureCC) switches some off until their stage, which it will redo
        self.trained = torch.nn.ParameterList(params)
        self._method = [method]  # in a list: the method's models are not submodules of this one

    def forward(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0):
        return self._method[0].loss(batch, generator, prior_weight)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UsageError(f"method {name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
