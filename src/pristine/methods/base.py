"""What every method shares: the config/parameters/loss contract, the denoising loss, new tokens."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar

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
        config.check(where)
        return config

    def check(self, where: str) -> None:
        """A method's checks across its settings (choices, combinations); one UsageError naming the field."""


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


def encode_distinct(backbone, prompts: list[str]) -> dict[str, torch.Tensor]:
    """`backbone.encode_prompts(prompts)`, running the text encoders once per distinct prompt. A batch
    with one instance prompt (what most users give) encodes one prompt instead of batch-size copies:
    with a learned token that is a forward and backward pass through the text encoder each step. The
    rows are picked by index, so each copy's gradient still reaches the shared encoding."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) == len(prompts):
        return backbone.encode_prompts(prompts)
    encoded = backbone.encode_prompts(distinct)
    index = [distinct.index(p) for p in prompts]
    return {k: v[torch.tensor(index, device=v.device)] for k, v in encoded.items()}


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
                   weights: torch.Tensor | None = None, batch: dict | None = None,
                   predict: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain diffusion loss, per sample: (mean loss, per-sample losses). `predict(x_t, t, cond)`
    replaces the backbone's (a method adding rows of its own to the same forward)."""
    noise, t = draw_noise(backbone, latents, generator, batch)
    x_t = backbone.add_noise(latents, noise, t)
    pred = (predict or backbone.predict)(x_t, t, cond)
    per_sample = (pred.float() - backbone.target(latents, noise, t).float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        return (per_sample * weights).sum() / weights.sum(), per_sample
    return per_sample.mean(), per_sample


# ---- output preservation ---------------------------------------------------------------------------
#
# For prompts whose pictures must not change, the trained model's prediction is pulled toward the
# original model's for the same noisy input: || f_θ(x_t | p) - f_orig(x_t | p) ||². f_orig is the same
# weights with every adapter switched off (Backbone.original_denoiser), in a forward without gradient.

PRESERVE_SOURCES = ("class", "unrelated")  # or the path of a prompts file


def class_prompt(caption: str, concepts) -> str:
    """The caption with each concept's token replaced by its class word: 'a big <v1> star on grass' ->
    'a big star on grass' (the token is dropped where the class word follows it), '<v1> on grass' ->
    'star on grass'."""
    for c in concepts:
        caption = re.sub(rf"{re.escape(c.token)}\s+(?={re.escape(c.class_word)})", "", caption)
        caption = caption.replace(c.token, c.class_word)
    return re.sub(r"\s+", " ", caption).strip()


def fixed_preservation_prompts(source: str, concepts, where: str = "preserve") -> list[str]:
    """The fixed prompt set of a `preserve` setting: the world's unrelated prompts (none naming a
    concept's class word), or a file's non-blank lines; [] for `class`, whose prompts come from each
    batch's captions. Bad input is one UsageError naming `where`."""
    from ..data import read_text_file

    if source == "class":
        return []
    if source == "unrelated":
        from ..world.captions import unrelated_prompts

        classes = {c.class_word.lower() for c in concepts}
        prompts = [p for p in unrelated_prompts() if not classes & set(re.findall(r"[a-z]+", p.lower()))]
        if not prompts:
            raise UsageError(f"{where}: every unrelated prompt names a concept's class; give a prompts file")
        return prompts
    path = Path(source)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise UsageError(f"{where}: {source!r} is neither class, unrelated nor a prompts file ({what}); "
                         "give class, unrelated, or a UTF-8 text file with one prompt per line")
    lines = read_text_file(path).splitlines()
    for n, line in enumerate(lines, 1):
        named = [c.token for c in concepts if c.token in line]
        if named:
            raise UsageError(f"{where}: {path}:{n} names the token {named[0]!r}; preservation prompts are what must "
                             "not change, so leave the concept out of them")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"{where}: {path} holds no prompts; write one prompt per line")
    return prompts


@dataclass
class OutputPreservation:
    """What output preservation pulls toward the original model: for each instance example of a batch,
    a prompt (its caption with the class word for the token, or one of a fixed set) and a weight."""

    source: str  # "class", "unrelated" or a prompts file
    weight: float
    prompts: list[str] = field(default_factory=list)  # the fixed set (unrelated, a file)

    @classmethod
    def from_setting(cls, source: str, weight: float, concepts, where: str = "preserve") -> "OutputPreservation":
        return cls(source, weight, fixed_preservation_prompts(source, concepts, where))

    def rows(self, batch: dict, concepts) -> tuple[list[int], list[str]]:
        """(rows of the batch, their preservation prompts): the instance examples (prior images are the
        class already). A fixed set is walked in turn by the example's place in the step's whole batch,
        so every process and a resumed run pick the same prompts."""
        is_prior = batch.get("is_prior")
        n = len(batch["prompts"])
        rows = [i for i in range(n) if is_prior is None or not bool(is_prior[i])]
        if self.source == "class":
            return rows, [class_prompt(batch["prompts"][i], concepts) for i in rows]
        positions = batch.get("positions")
        positions = positions.tolist() if positions is not None else list(range(n))
        start = batch.get("step", 0) * batch.get("global_size", n)
        return rows, [self.prompts[(start + positions[i]) % len(self.prompts)] for i in rows]


class Method:
    """A customization method: its config, its trainable parameters, its loss, its outputs."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # True when prompts' text embeddings never change during training and can be cached
    frozen_text: ClassVar[bool] = False
    # why output preservation cannot apply to this method; empty where it can
    preserve_refusal: ClassVar[str] = ""
    # whether its training prompts name a concept token, so ICO's per-image contexts can go around it
    takes_image_contexts: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, backbone, concepts: list[ConceptSpec]):
        self.config, self.backbone, self.concepts = config, backbone, concepts
        self.tokens: TokenEmbeddings | None = None
        self.preservation: OutputPreservation | None = None
        self._original_weights: dict[str, torch.Tensor] = {}
        self.contexts = None  # ICO's per-image context vectors (ico.ImageContexts), when the run uses them

    def setup(self) -> list[dict]:
        """Add adapters/tokens; return optimizer parameter groups."""
        raise NotImplementedError

    def trainable_denoiser_params(self) -> dict[str, torch.nn.Parameter]:
        """The denoiser weights this method trains, by name (checkpoints save exactly these)."""
        return {}

    def trainable_text_params(self) -> dict[str, torch.nn.Parameter]:
        """Text-encoder weights this method trains (a text-encoder LoRA), by '<encoder>.<parameter>'."""
        return {}

    def adjust_learning_rates(self, param_groups: list[dict], step: int) -> None:
        """Called before each optimizer step, after the scheduler set the rates: a method whose stages train
        one tensor at different rates (CLIF's token rows) changes its groups' `lr` here; most do nothing."""

    def base_weights_trained(self) -> dict[str, torch.nn.Parameter]:
        """Base weights this method trains in place (Custom Diffusion's K/V), by denoiser parameter name:
        output preservation keeps their loaded values to put back for the original's prediction."""
        return {}

    def use_preservation(self, preservation: OutputPreservation, where: str = "preserve") -> None:
        """Output preservation from here on; called after setup, before any training or resuming, so the
        values kept of base weights trained in place are the loaded ones."""
        if self.preserve_refusal:
            raise UsageError(f"{where}: {self.preserve_refusal}")
        self.preservation = preservation
        self._original_weights = {n: p.detach().clone() for n, p in self.base_weights_trained().items()}

    def preservation_targets(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> dict | None:
        """This batch's preservation rows: noisy inputs (the examples' own), conditioning, and the original
        model's prediction (adapters off, no gradient); None without output preservation."""
        if self.preservation is None:
            return None
        rows, prompts = self.preservation.rows(batch, self.concepts)
        if not rows:
            return None
        index = torch.tensor(rows, device=x_t.device)
        x, tt = x_t[index], t[index]
        cond = self.encode_fixed(prompts)
        with torch.no_grad(), self.backbone.original_denoiser(self._original_weights):
            # a text-encoder LoRA changes the prompts' encoding as well: the original's is encoded afresh
            original_cond = self.encode_fixed(prompts) if self.trainable_text_params() else cond
            original = self.backbone.predict(x, tt, original_cond)
        return {"x": x, "t": tt, "cond": cond, "original": original}

    def predict_preserving(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                           preserve: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The active model's prediction; with `preserve` (preservation_targets) its rows join the same
        forward and the second value is || f_θ(p) - f_orig(p) ||² over them."""
        if preserve is None:
            return self.backbone.predict(x_t, t, cond), None
        n = len(x_t)
        both = {k: torch.cat([cond[k], preserve["cond"][k]]) for k in cond}
        out = self.backbone.predict(torch.cat([x_t, preserve["x"]]), torch.cat([t, preserve["t"]]), both)
        return out[:n], (out[n:].float() - preserve["original"].float()).pow(2).mean()

    def denoise(self, latents: torch.Tensor, cond: dict, generator: torch.Generator, batch: dict,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The plain diffusion loss of the active model plus output preservation's weighted term:
        (loss, per-sample diffusion losses, logs)."""
        preserved = {}

        def predict(x_t, t, c):
            pred, preserved["loss"] = self.predict_preserving(x_t, t, c, self.preservation_targets(x_t, t, batch))
            return pred

        loss, per_sample = denoising_loss(self.backbone, latents, cond, generator, weights, batch, predict=predict)
        if preserved.get("loss") is None:
            return loss, per_sample, {}
        return loss + self.preservation.weight * preserved["loss"], per_sample, {"preserve": preserved["loss"].item()}

    def use_contexts(self, contexts) -> None:
        """ICO from here on (after setup, before resuming): instance images are encoded with their own
        context vectors (`encode_batch`), which checkpoints carry and outputs do not."""
        if not self.takes_image_contexts:
            raise UsageError(f"ico: method {self.name} has no concept token to put contexts around; use lora, "
                             "dreambooth, custom_diffusion, purecc or textual_inversion, or drop --ico")
        self.contexts = contexts

    def encode_batch(self, batch: dict) -> dict:
        """The conditioning of a training batch: its captions, or with ICO each image's context prompt."""
        if self.contexts is None:
            return self.encode(batch["prompts"])
        return self.contexts.encode(self, batch)

    def token_group(self, lr: float | None = None) -> dict:
        """The optimizer group of the new tokens' rows: no weight decay, so no other row ever moves."""
        group = {"params": self.tokens.make_trainable(), "weight_decay": 0.0}
        if lr is not None:
            group["lr"] = lr
        return group

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"denoiser.{k}": p.detach().clone() for k, p in self.trainable_denoiser_params().items()}
        state.update({f"text.{k}": p.detach().clone() for k, p in self.trainable_text_params().items()})
        if self.tokens is not None:
            state.update(self.tokens.state())
        if self.contexts is not None:
            state.update(self.contexts.state())
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_denoiser_params()
        text_params = self.trainable_text_params()
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("denoiser."):
                    params[k[len("denoiser."):]].copy_(v)
                elif k.startswith("text."):
                    text_params[k[len("text."):]].copy_(v)
        if self.tokens is not None:
            self.tokens.load_state(state)
        if self.contexts is not None:
            self.contexts.load_state(state)

    def encode(self, prompts: list[str]) -> dict:
        if self.tokens is not None:
            prompts = [self.tokens.prompt(p) for p in prompts]
        if (self.tokens is not None and self.tokens.trainable) or self._text_encoders_train():
            return encode_distinct(self.backbone, prompts)
        return self._encode_once(prompts)

    def encode_fixed(self, prompts: list[str]) -> dict:
        """Prompts that name no new token: their encoding does not depend on the tokens' rows, so with
        frozen text encoders each is encoded once, even while the tokens learn."""
        if self._text_encoders_train():
            return encode_distinct(self.backbone, prompts)
        return self._encode_once(prompts)

    def _text_encoders_train(self) -> bool:
        return any(p.requires_grad for te in self.backbone.text_encoders for p in te.parameters())

    def _encode_once(self, prompts: list[str]) -> dict:
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
        cond = self.encode_batch(batch)
        weights = torch.where(batch["is_prior"], torch.tensor(prior_weight), torch.tensor(1.0))
        loss, per_sample, logs = self.denoise(batch["latents"], cond, generator, batch, weights.to(batch["latents"].device))
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
