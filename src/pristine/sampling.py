"""The sampling engine: one loop over `backbone.predict` for every method (METHODS.md 3).

Generalized classifier-free guidance (GCFG): a list of guidance terms, each a denoiser (the original
model, or a run's adapters on it, or a model of its own) with a prompt and a weight, plus the
unconditional prediction of the frozen original:

    f̃ = f_0(x_t | ∅) + Σ_i w_i [ f_i(x_t | c_i) - f_0(x_t | ∅) ]

Negative weights are negative prompts; ordinary CFG is one term on the original (or one run) and gives
the diffusers pipeline's pictures for the same seed and scheduler. Terms whose denoisers share weights
and active adapters run as one batched forward (∅ and a term on the original: CFG's batch of two).

What a run is comes from its saved settings (config.yaml's `method`): the method class's
`load_denoiser` builds its inference side, and a method may bring its own sampler class (a subclass
of `GuidedSampler`, e.g. with its own attention processors) through `Method.sampler`.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

SCHEDULERS = ("ddim", "euler", "ddpm")
SAMPLERS = ("", "dci")  # "": the engine's loop (or a run's method's own sampler)
PROMPT_SLOT = "{prompt}"  # in a guide's prompt: the grid row's --prompt


# ---- what the user gives ---------------------------------------------------------------------------


@dataclass
class Guide:
    """One guidance term as given: a run folder (empty: the original model), a prompt, a weight."""

    prompt: str = PROMPT_SLOT
    weight: float = 5.0
    adapter: str = ""

    KEYS = {"adapter": "adapter", "prompt": "prompt", "w": "weight", "weight": "weight"}

    @classmethod
    def parse(cls, text: str, where: str = "--guide") -> "Guide":
        """'adapter=runs/a,prompt=a star, on grass,w=2.5': commas inside a prompt are kept, since only a
        comma followed by `key=` starts a new field."""
        values = {}
        for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):
            key, sep, value = part.partition("=")
            if not sep:
                raise UsageError(f"{where} {text!r}: {part!r} is not KEY=VALUE; give adapter=RUN,prompt=TEXT,w=NUMBER")
            values[key.strip()] = value.strip()
        return cls.from_dict(values, where)

    @classmethod
    def from_dict(cls, values: dict, where: str = "guides") -> "Guide":
        if not isinstance(values, dict):
            raise UsageError(f"{where}: expected a mapping with adapter, prompt and w")
        out = {}
        for key, value in values.items():
            if key not in cls.KEYS:
                raise UsageError(f"{where}: unknown key {key!r}; known keys: adapter, prompt, w")
            out[cls.KEYS[key]] = value
        weight = out.get("weight", cls.weight)
        try:
            if isinstance(weight, bool):
                raise ValueError
            weight = float(weight)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: w must be a number, got {weight!r}; e.g. w=2.5 (negative: a negative prompt)")
        if not math.isfinite(weight):
            raise UsageError(f"{where}: w must be a finite number, got {weight}")
        prompt = out.get("prompt", PROMPT_SLOT)
        adapter = out.get("adapter") or ""
        if not isinstance(prompt, str) or not isinstance(adapter, str):
            raise UsageError(f"{where}: prompt and adapter are text; got {prompt!r} and {adapter!r}")
        if adapter in ("original", "none"):
            adapter = ""
        if adapter and not Path(adapter).is_dir():
            raise UsageError(f"{where}: adapter {adapter}: no such run folder; give a folder written by `pristine train`")
        return cls(prompt=prompt, weight=weight, adapter=adapter)


def check_dci_settings(agg_time, dci_lambda, dci_scale, where: str) -> None:
    """DCI's numbers (`pristine sample`'s and `bench context`'s): one line naming the setting and its flag."""
    for name, flag, value, low, high in (("agg_time", "--agg-time", agg_time, 0.0, 1.0),
                                         ("dci_lambda", "--dci-lambda", dci_lambda, -2.0, 2.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UsageError(f"{where}.{name} ({flag}): must be a number from {low:g} to {high:g}, got {value!r}")
    if isinstance(dci_scale, bool) or not isinstance(dci_scale, (int, float)) or not (
            math.isfinite(dci_scale) and dci_scale > 0):
        raise UsageError(f"{where}.dci_scale (--dci-scale): a positive number (the authors' 500), got {dci_scale!r}")


@dataclass
class SampleSettings:
    """Everything one sampling needs; the same from flags, from YAML (`pristine sample --config`) or Python."""

    guides: list = field(default_factory=list)  # of Guide
    prompts: list = field(default_factory=list)  # grid rows, filled into {prompt}
    model: str = "mini"
    n: int = 4
    seed: int = 0
    steps: int = 50
    scheduler: str = "ddim"
    allow_pickle: bool = False
    # where f(∅) comes from: empty, the frozen original (GCFG); a run folder, that run's own ∅ (ordinary
    # CFG with a customized model, as its diffusers pipeline samples it: `--adapter`)
    unconditional: str = ""
    # the loop: "" the engine's (or the one a run's method brings), "dci" DCI's two branches (dci.py)
    sampler: str = ""
    agg_time: float = 0.3  # dci: the early fraction of the steps with the auxiliary branch
    dci_lambda: float = 0.0  # dci: λ, the auxiliary branch's pull in the blend, in [-2, 2]
    dci_scale: float = 500.0  # dci: the constant in front of the pixel softmax (the authors' 500, made for SD1.x at 512 px)
    shared_guidance: bool = True  # dci: the auxiliary branch guided from the concept branch's f(∅)
    # what the guidance starts from instead of ∅, as a diffusers pipeline's negative_prompt
    negative_prompt: str = ""
    lora_scale: float = 1.0  # every run's LoRA update scaled by it (diffusers' cross_attention_kwargs scale)
    height: int = 0  # pixels; 0: the model's native size
    width: int = 0

    OPTIONAL = ("model", "n", "seed", "steps", "scheduler", "allow_pickle", "unconditional", "sampler", "agg_time",
                "dci_lambda", "dci_scale", "shared_guidance", "negative_prompt", "lora_scale", "height", "width")

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "SampleSettings":
        known = {"guides", "prompts", *cls.OPTIONAL}
        for key in values:
            if key not in known:
                raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        guides = values.get("guides") or []
        if not isinstance(guides, list):
            raise UsageError(f"{where}.guides: expected a list of mappings with adapter, prompt and w")
        prompts = values.get("prompts") or []
        if isinstance(prompts, str):
            prompts = [prompts]
        settings = cls(guides=[g if isinstance(g, Guide) else Guide.from_dict(g, f"{where}.guides[{i}]")
                               for i, g in enumerate(guides)],
                       prompts=[str(p) for p in prompts],
                       **{k: values[k] for k in cls.OPTIONAL if k in values})
        settings.validate(where)
        return settings

    def validate(self, where: str = "config") -> None:
        for name in ("n", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{where}.{name}: must be a positive whole number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"{where}.seed: must be a whole number, got {self.seed!r}")
        if not isinstance(self.model, str) or not isinstance(self.unconditional, str):
            raise UsageError(f"{where}: model and unconditional are folder names (or 'mini'), got {self.model!r}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"{where}.sampler (--sampler): {self.sampler!r} is unknown; choose dci, or leave it out "
                             "for the engine's own loop")
        check_dci_settings(self.agg_time, self.dci_lambda, self.dci_scale, where)
        if not isinstance(self.shared_guidance, bool):
            raise UsageError(f"{where}.shared_guidance: true or false, got {self.shared_guidance!r}")
        if not isinstance(self.negative_prompt, str):
            raise UsageError(f"{where}.negative_prompt (--negative-prompt): text, got {self.negative_prompt!r}")
        if isinstance(self.lora_scale, bool) or not isinstance(self.lora_scale, (int, float)) or not math.isfinite(self.lora_scale):
            raise UsageError(f"{where}.lora_scale (--lora-scale): a number such as 0.8, got {self.lora_scale!r}")
        self._check_size(where)
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"{where}.scheduler: {self.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
        if not self.guides:
            raise UsageError(f"{where}.guides: none given; give at least one (--guide adapter=RUN,prompt=TEXT,w=NUMBER)")
        if self.unconditional:
            read_run(self.unconditional, f"{where}.unconditional")
        for i, g in enumerate(self.guides):
            if g.adapter:
                # every run checked before any model loads
                read_run(g.adapter, f"--guide {i + 1}" if where == "flags" else f"{where}.guides[{i}]")
        runs = [g.adapter for g in self.guides if g.adapter] + ([self.unconditional] if self.unconditional else [])
        if self.lora_scale != 1 and not any((Path(r) / "pytorch_lora_weights.safetensors").is_file() for r in runs):
            raise UsageError(f"{where}.lora_scale (--lora-scale {self.lora_scale:g}): no run given has a LoRA "
                             "(pytorch_lora_weights.safetensors); drop it, or give a LoRA run with --adapter")

    def _check_size(self, where: str) -> None:
        """Height and width: whole multiples of what the model's latents and patches divide pictures by."""
        from .backbones import backbone_class, resolve_model

        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{where}.{name} (--{name}): a whole number of pixels, got {value!r}")
        if self.height or self.width:
            folder = resolve_model(self.model)
            step = backbone_class(folder).size_multiple(folder)
            for name in ("height", "width"):
                value = getattr(self, name)
                if value and value % step:
                    raise UsageError(f"{where}.{name} (--{name} {value}): this model draws pictures in steps of {step} "
                                     f"pixels; give a multiple of {step}, e.g. {max(step, value // step * step)}")

    def rows(self) -> list[str]:
        """The grid's rows: one per --prompt (none given: one row, {prompt} is the empty prompt), or a
        single one when no guide reads {prompt}."""
        if self.prompts and any(PROMPT_SLOT in g.prompt for g in self.guides):
            return list(self.prompts)
        return [self.prompts[0] if self.prompts else ""]


def foreign_run_method(run: Path) -> str | None:
    """The method whose inference side reads a folder another trainer wrote (diffusers' scripts, kohya
    converted to diffusers' layout): such a folder has no saved settings, only its files say what it is."""
    if (run / "pytorch_lora_weights.safetensors").is_file():
        return "lora"  # a LoRA, with learned embeddings if the folder has them
    if (run / "learned_embeds.safetensors").is_file():
        return "textual_inversion"
    return None


def read_run(path: str | Path, where: str = "--guide") -> dict:
    """A finished run folder's saved settings (config.yaml), its safetensors files checked: a bad run is
    one line naming it before any model loads."""
    import yaml

    from .files import check_safetensors

    run = Path(path)
    if not run.is_dir():
        raise UsageError(f"{where}: adapter {path}: no such run folder; give a folder written by `pristine train`")
    saved = run / "config.yaml"
    if not saved.is_file():
        foreign = foreign_run_method(run)
        if foreign is None:
            raise UsageError(f"{where}: adapter {path} has no config.yaml and no pytorch_lora_weights.safetensors or "
                             "learned_embeds.safetensors; give a folder written by `pristine train` or by another trainer")
        for f in sorted(run.glob("*.safetensors")):
            check_safetensors(f, "--adapter")
        return {"method": foreign}
    try:
        settings = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        settings = None
    if not isinstance(settings, dict) or not isinstance(settings.get("method"), str):
        raise UsageError(f"{where}: {saved} is unreadable (no method); the run folder is damaged, train it again")
    if not (run / "DONE").is_file():
        raise UsageError(f"{where}: adapter {path} is not finished (no DONE); resume it with `pristine train ... "
                         "--resume latest` first")
    for f in sorted(run.glob("*.safetensors")):
        check_safetensors(f, "--adapter")
    if (run / "model" / "model_index.json").is_file():
        from .files import check_model_weights

        check_model_weights(run / "model", False)
    return settings


# ---- denoisers: what a guidance term predicts with --------------------------------------------------


class Denoiser:
    """A way of predicting with one loaded copy of weights: the original model, or a run's adapters,
    tokens or swapped weights on it. Denoisers with equal `key` are interchangeable for a forward, so
    their terms are batched into one."""

    def __init__(self, backbone, name: str = "original", tokens: dict[str, int] | None = None):
        self.backbone, self.name = backbone, name
        self.tokens = tokens or {}  # the run's tokens and their vector counts
        self._cache: dict[str, dict] = {}

    @property
    def key(self) -> tuple:
        return (id(self.backbone), None)

    @contextmanager
    def active(self):
        """The backbone as this denoiser predicts: adapters and processors switched, restored after."""
        use_adapter(self.backbone, None)
        yield

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = sorted(set(prompts) - set(self._cache))
        if missing:
            expanded = [self.backbone.expand_prompt(p, self.tokens) for p in missing]
            with torch.no_grad(), self.active():  # a run's text-encoder LoRA encodes its own prompts only
                encoded = self.backbone.encode_prompts(expanded)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i] for k, v in encoded.items()}
        return {k: torch.stack([self._cache[p][k] for p in prompts]) for k in self._cache[prompts[0]]}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone.predict(x_t, t, cond)


class AdapterDenoiser(Denoiser):
    """A run's LoRA adapter on the shared copy of the weights, switched on for its forwards only."""

    def __init__(self, backbone, adapter: str, tokens: dict[str, int] | None = None):
        super().__init__(backbone, adapter, tokens)
        self.adapter = adapter

    @property
    def key(self) -> tuple:
        return (id(self.backbone), self.adapter)

    @contextmanager
    def active(self):
        use_adapter(self.backbone, self.adapter)
        yield


def scale_lora(backbone, name: str, scale: float) -> None:
    """Adapter `name`'s update times `scale` in every layer (denoiser and text encoders), once, where it
    is loaded: what diffusers' `cross_attention_kwargs={"scale": s}` does for the length of a call."""
    from peft.tuners.lora import LoraLayer

    for model in (backbone.denoiser, *backbone.text_encoders):
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and name in layer.scaling:
                layer.scaling[name] *= scale


def use_adapter(backbone, name: str | None) -> None:
    """Only adapter `name` of the denoiser and the text encoders on (None: none); a model without
    adapters is left alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = backbone.__dict__.get("_tuner_layers")
    if layers is None:
        layers = [m for model in (backbone.denoiser, *backbone.text_encoders) for m in model.modules()
                  if isinstance(m, BaseTunerLayer)]
        backbone._tuner_layers = layers
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(name, inference_mode=True)
            layer._disable_adapters = False


class Models:
    """Every copy of weights one sampling loads, each once: the original model and what runs bring
    (adapters on the original's copy where they can be, a copy of their own where they change it)."""

    def __init__(self, model: str = "mini", allow_pickle: bool = False, lora_scale: float = 1.0):
        from .backbones import resolve_model

        self.model, self.allow_pickle, self.lora_scale = model, allow_pickle, lora_scale
        self.folder = resolve_model(model)
        self._copies: dict[str, object] = {}
        self._runs: dict[str, Denoiser] = {}
        self._tokens: dict[tuple[int, str], str] = {}  # (copy, token) -> the run that brought it

    @property
    def original(self) -> Denoiser:
        """The frozen original (loaded on first use, after every run was checked)."""
        if "_original" not in self.__dict__:
            self._original = Denoiser(self.backbone())
        return self._original

    def backbone(self, folder: str | Path | None = None):
        """The loaded copy of a model folder (default: the original), loaded on first use."""
        from .backbones import load_backbone

        key = str(Path(folder or self.folder).resolve())
        if key not in self._copies:
            backbone = load_backbone(str(folder or self.folder), allow_pickle=self.allow_pickle)
            if not backbone.GUIDED_SAMPLING:
                raise UsageError(f"the {backbone.family} family is not sampled by pristine's guidance engine yet; "
                                 "sample sd or sdxl models")
            self._copies[key] = backbone
        return self._copies[key]

    def fresh_backbone(self):
        """A copy of the original's weights that nothing else shares (a method that rebuilds the model)."""
        from .backbones import load_backbone

        return load_backbone(str(self.folder), allow_pickle=self.allow_pickle)

    def run(self, path: str | Path, where: str = "--guide") -> Denoiser:
        """A run folder's denoiser, built by its method's inference side from the run's saved settings."""
        from .methods import get_method

        run = Path(path)
        key = str(run.resolve())
        if key in self._runs:
            return self._runs[key]
        settings = read_run(run, where)
        method = get_method(settings["method"])
        denoiser = method.load_denoiser(run, settings, self)
        denoiser.method = method
        denoiser.concepts = settings.get("concepts") or []  # tokens and class words (DCI reads them)
        self._runs[key] = denoiser
        return denoiser

    # helpers for the methods' inference sides
    def load_lora(self, run: Path, backbone=None) -> str:
        """The run's pytorch_lora_weights.safetensors as an adapter named after the run; returns its name."""
        from .files import check_safetensors

        backbone = backbone or self.backbone()
        path = run / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise UsageError(f"--guide: adapter {run} lacks {path.name}; the run is incomplete, train it again")
        check_safetensors(path, "--adapter")
        name = f"run{len(self._runs)}_{re.sub(r'[^A-Za-z0-9_]', '_', run.name)}"
        backbone.pipeline().load_lora_weights(str(run), weight_name=path.name, adapter_name=name)
        backbone.__dict__.pop("_tuner_layers", None)  # new adapter layers: collect them again
        if self.lora_scale != 1:
            scale_lora(backbone, name, self.lora_scale)
        return name

    def load_tokens(self, run: Path, backbone=None) -> dict[str, int]:
        """The run's learned tokens into the copy's text encoders; {token: vectors}. Two runs naming the
        same token on one copy would overwrite each other: refused."""
        from safetensors import safe_open

        from .backbones.base import embeddings_file, load_embeddings
        from .files import check_safetensors

        backbone = backbone or self.backbone()
        first = run / embeddings_file(0, "")
        if not first.is_file():
            return {}
        check_safetensors(first, "--adapter")
        with safe_open(str(first), "pt") as f:
            tokens = {t: (f.get_tensor(t).shape[0] if f.get_tensor(t).ndim == 2 else 1) for t in f.keys()}
        for token in tokens:
            other = self._tokens.get((id(backbone), token))
            if other is not None and other != str(run):
                raise UsageError(f"--guide: runs {other} and {run} both name their token {token}; sample them in "
                                 "separate commands (or train one with another --token)")
            self._tokens[(id(backbone), token)] = str(run)
        pipe = backbone.pipeline()
        load_embeddings(pipe, run, type(backbone).TEXT_PAIRS)
        backbone.__dict__.pop("_text_pipeline", None)
        return tokens


# ---- the engine ------------------------------------------------------------------------------------


@dataclass
class Term:
    denoiser: Denoiser
    prompts: list[str]  # one per image of the batch
    weight: float


def make_scheduler(backbone, name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}.get(name)
    if cls is None:
        raise UsageError(f"--scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    # the config as the family's pipeline holds it: its constructor mends outdated ones (steps_offset)
    if "_pipeline_scheduler_config" not in backbone.__dict__:
        backbone._pipeline_scheduler_config = backbone.pipeline().scheduler.config
    return cls.from_config(backbone._pipeline_scheduler_config)


class GuidedSampler:
    """The one sampling loop. A method with its own way of sampling subclasses it (`Method.sampler`):
    `forward_group` is where its attention processors go, `combine` where its own guidance rule goes."""

    negative_prompt: str = ""  # encoded by the unconditional denoiser in place of ∅ (a pipeline's negative_prompt)
    size: tuple[int, int] | None = None  # (height, width) in pixels; None: the model's native size

    def __init__(self, unconditional: Denoiser, scheduler: str = "ddim"):
        self.unconditional, self.scheduler_name = unconditional, scheduler
        self.backbone = unconditional.backbone  # noise shape, scheduler, VAE (the frozen original's by default)

    def forward_group(self, denoiser: Denoiser, x: torch.Tensor, t, conds: list[dict]) -> list[torch.Tensor]:
        """One batched forward for terms sharing a denoiser's weights and adapters."""
        n = len(x)
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        with denoiser.active():
            out = denoiser.predict(torch.cat([x] * len(conds)), t, cond)
        return list(out.split(n))

    def groups(self, n: int, terms: list[Term]) -> list[list[tuple]]:
        """The forwards of a step: per denoiser key its members (term index, -1 for ∅; denoiser; encoded
        prompts), ∅ first (CFG's order)."""
        groups: dict[tuple, list] = {self.unconditional.key: [(-1, self.unconditional, self._uncond(n))]}
        for i, term in enumerate(terms):
            groups.setdefault(term.denoiser.key, []).append((i, term.denoiser, term.denoiser.encode(term.prompts)))
        return list(groups.values())

    def predictions(self, x: torch.Tensor, t, terms: list[Term]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f_0(∅), [f_i(c_i)]): every term with the same denoiser key in one forward, ∅ first (CFG's order)."""
        found: dict[int, torch.Tensor] = {}
        for members in self.groups(len(x), terms):
            outs = self.forward_group(members[0][1], x, t, [c for _, _, c in members])
            found.update({i: o for (i, _, _), o in zip(members, outs)})
        return found[-1], [found[i] for i in range(len(terms))]

    def combine(self, f0: torch.Tensor, fs: list[torch.Tensor], terms: list[Term]) -> torch.Tensor:
        out = f0
        for f, term in zip(fs, terms):
            out = out + term.weight * (f - f0)
        return out

    def _uncond(self, n: int) -> dict:
        if getattr(self, "_uncond_cache", (0, None))[0] != n:
            if self.negative_prompt:
                self._uncond_cache = (n, self.unconditional.encode([self.negative_prompt] * n))
            else:
                with torch.no_grad(), self.unconditional.active():  # with the run's text-encoder LoRA, if any
                    self._uncond_cache = (n, self.backbone.unconditional(n))
        return self._uncond_cache[1]

    @torch.no_grad()
    def sample(self, terms: list[Term], generators: list[torch.Generator], steps: int) -> np.ndarray:
        """Pictures (n, h, w, 3) uint8, one per generator."""
        scheduler, latents, extra = self.start(generators, steps)
        for t in scheduler.timesteps:
            latents = self.step(scheduler, t, latents, terms, extra)
        return self.finish(latents)

    def start(self, generators: list[torch.Generator], steps: int) -> tuple:
        """(scheduler with its timesteps set, starting latents from the generators, the step's extra arguments)."""
        import inspect

        from diffusers.utils.torch_utils import randn_tensor

        bb = self.backbone
        scheduler = make_scheduler(bb, self.scheduler_name)
        scheduler.set_timesteps(steps)
        dtype = next(bb.denoiser.parameters()).dtype
        shape = bb.latent_shape(len(generators), *(self.size or ()))
        latents = randn_tensor(shape, generator=generators, device=bb.denoiser.device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = set(inspect.signature(scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in accepted}
        return scheduler, latents, extra

    def step(self, scheduler, t, latents: torch.Tensor, terms: list[Term], extra: dict) -> torch.Tensor:
        """One denoising step of the guided prediction."""
        x = scheduler.scale_model_input(latents, t)
        f0, fs = self.predictions(x, t, terms)
        return scheduler.step(self.combine(f0, fs, terms), t, latents, **extra, return_dict=False)[0]

    def finish(self, latents: torch.Tensor) -> np.ndarray:
        images = self.backbone.decode_images(latents).numpy()
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def sampler_for(models: Models, denoisers: list[Denoiser], scheduler: str, unconditional: Denoiser | None = None,
                sampler: str = "", **options) -> GuidedSampler:
    """The engine, or the one sampler class a term's method brings, or the one named (`sampler`, with its
    `options`); ∅ from `unconditional` (default: the original)."""
    classes = {d.method.sampler for d in denoisers if getattr(getattr(d, "method", None), "sampler", None)}
    if sampler == "dci":
        from .dci import DCISampler

        if classes:
            raise UsageError(f"--sampler dci: the runs bring their own sampler ({', '.join(c.__name__ for c in classes)}); "
                             "sample them without --sampler")
        return DCISampler(unconditional or models.original, scheduler, **options)
    if len(classes) > 1:
        raise UsageError(f"--guide: the runs bring different samplers ({', '.join(c.__name__ for c in classes)}); "
                         "sample them in separate commands")
    cls = classes.pop() if classes else GuidedSampler
    return cls(unconditional or models.original, scheduler)


def sample(settings: SampleSettings | None = None, models: Models | None = None, desc: str = "sample",
           **values) -> list[list[np.ndarray]]:
    """Pictures per grid row (`settings.rows()`), n per row, image k of every row from seed + k.

    The Python API: `sample(guides=[Guide(adapter="runs/a", prompt="...", weight=2.5)], prompts=[...])`."""
    from tqdm import tqdm

    settings = settings or SampleSettings.from_dict(values, "sample()")
    models = models or Models(settings.model, settings.allow_pickle, settings.lora_scale)
    denoisers = [models.run(g.adapter) if g.adapter else models.original for g in settings.guides]
    unconditional = models.run(settings.unconditional) if settings.unconditional else None
    engine = sampler_for(models, denoisers, settings.scheduler, unconditional, settings.sampler,
                         **({"agg_time": settings.agg_time, "lam": settings.dci_lambda, "scale": settings.dci_scale,
                             "shared_guidance": settings.shared_guidance} if settings.sampler == "dci" else {}))
    engine.negative_prompt = settings.negative_prompt
    if settings.height or settings.width:
        native = engine.backbone.image_size
        engine.size = (settings.height or native, settings.width or native)
    rows = settings.rows()
    out = []
    for row in tqdm(rows, desc=desc, disable=len(rows) < 2):
        terms = [Term(d, [g.prompt.replace(PROMPT_SLOT, row)] * settings.n, g.weight)
                 for d, g in zip(denoisers, settings.guides)]
        generators = [torch.Generator().manual_seed(settings.seed + k) for k in range(settings.n)]
        out.append(list(engine.sample(terms, generators, settings.steps)))
    return out


class RunSampler:
    """A model with at most one run, drawn with ordinary CFG by the engine and ∅ from the run itself, as
    the run's diffusers pipeline would draw it (tested to the same pictures): what the demo, the
    benches and the eval presets draw with."""

    def __init__(self, model: str = "mini", adapter: str | None = None, allow_pickle: bool = False,
                 lora_scale: float = 1.0):
        self.models = Models(model, allow_pickle, lora_scale)
        self.denoiser = self.models.run(adapter, "--adapter") if adapter else self.models.original

    def generate(self, prompts: list[str], seeds: list[int], steps: int = 50, guidance: float = 5.0, batch: int = 50,
                 desc: str = "generate", scheduler: str = "ddim") -> list[np.ndarray]:
        from tqdm import tqdm

        engine = sampler_for(self.models, [self.denoiser], scheduler, unconditional=self.denoiser)
        images = []
        for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=len(prompts) <= batch):
            generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
            images.extend(engine.sample([Term(self.denoiser, list(prompts[i : i + batch]), guidance)], generators, steps))
        return images


def write_images(rows: list[list[np.ndarray]], out: Path, seed: int) -> list[Path]:
    """Each picture of a grid as a PNG of its own beside it: <grid>-<row>-seed<seed>.png (image k of
    every row is drawn from seed + k), each written through a temporary name."""
    from PIL import Image

    from .files import durable_replace

    paths = []
    for r, row in enumerate(rows):
        for k, picture in enumerate(row):
            path = out.with_name(f"{out.stem}-{r:02d}-seed{seed + k}.png")
            tmp = path.with_name(path.stem + ".tmp.png")
            try:
                Image.fromarray(np.asarray(picture)).save(tmp, format="PNG")
                durable_replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(path)
    return paths


def write_grid(rows: list[list[np.ndarray]], labels: list[str], out: Path) -> Path:
    """The grid PNG, written through a temporary name."""
    from .eval.grids import make_grid
    from .files import durable_replace

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    try:
        make_grid(rows, labels).save(tmp, format="PNG")
        durable_replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
