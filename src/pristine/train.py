"""The one training loop: every method, every model family.

accelerate underneath (mixed precision, gradient accumulation, `accelerate launch`). Each step's
batches come from a generator seeded by (seed, step), so a run resumed from a checkpoint ends with
the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .checkpoint import atomic_save
from .data import ConceptImages, ConceptSpec, build_training_set, cache_latents, class_images, to_rgb
from .errors import UsageError
from .files import (PICKLE_SUFFIXES, atomic_write_text, check_safetensors, check_writable_folder, is_empty_folder,
                    remove_temporaries, safetensors_problem)
from .methods import get_method
from .methods.base import _coerce


@dataclass
class TrainConfig:
    out: str = ""
    model: str = "mini"
    method: str = "lora"
    method_args: dict = field(default_factory=dict)
    concepts: list = field(default_factory=list)  # of ConceptSpec
    # one prompt for every image without a caption of its own, instead of the templates ("{token}" and
    # "{cls}" stand for each concept's token and class word); "" the templates
    instance_prompt: str = ""
    steps: int = 400
    epochs: int = 0  # > 0: steps = epochs passes over the instance images (replaces steps)
    batch_size: int = 4
    gradient_accumulation: int = 1
    lr: float | None = None  # unset: the method's default, written into config.yaml
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # EMA of the trained weights (decay per optimizer step; 0: off; unset: the method's default, written
    # into config.yaml); the outputs hold the EMA weights, checkpoints hold both
    ema_decay: float | None = None
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    resolution: int = 0  # 0: the model's native size
    crop: str = "center"
    flip: bool = True
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str = "a photo of a {cls}"
    preserve: str = ""  # output preservation: "class", "unrelated" or a prompts file; "" off
    preserve_weight: float = 1.0
    # ICO (METHODS.md 5): per training image its own context vectors around "<v> <class>", n_ctx before and
    # n_end after, at ctx_lr_scale x the learning rate; in checkpoints, never in the outputs
    ico: bool = False
    n_ctx: int = 1
    n_end: int = 1
    ctx_lr_scale: float = 10.0
    checkpoint_every: int = 100  # 0: no checkpoints (and no --resume)
    keep_checkpoints: int = 2
    # validation grids of sample_prompts every sample_every steps and at the end (0: at the end only;
    # unset: every DEFAULT_SAMPLE_EVERY steps)
    sample_every: int | None = None
    sample_prompts: list = field(default_factory=list)
    report_to: str = ""  # "tensorboard" or "none"; "": tensorboard where it is installed
    export: list = field(default_factory=list)  # extra formats: "kohya"
    resume: str = ""  # "latest" or a checkpoint path
    overwrite: bool = False  # replace whatever run --out holds
    allow_pickle: bool = False  # load pickled model weights (.bin): a pickle can run code

    # settings a resumed run may change: where it is, how it is resumed, what it keeps and shows;
    # every other one shapes the weights, so a change is refused
    # (epochs is how steps was given: steps itself is compared)
    RESUMABLE_CHANGES = ("out", "resume", "overwrite", "allow_pickle", "checkpoint_every", "keep_checkpoints",
                         "sample_every", "sample_prompts", "export", "report_to", "epochs")
    # settings added after runs were already written: what an older config.yaml without them meant
    ADDED_LATER = {"ema_decay": 0.0, "ico": False, "n_ctx": 1, "n_end": 1, "ctx_lr_scale": 10.0, "instance_prompt": ""}
    # other names a YAML file may use for a key (the diffusers scripts' words)
    KEY_ALIASES = {"validation_prompt": "sample_prompts", "validation_prompts": "sample_prompts",
                   "validation_every": "sample_every"}

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        out = {}
        for key, value in values.items():
            if key in cls.KEY_ALIASES:
                key = cls.KEY_ALIASES[key]
                if key == "sample_prompts" and isinstance(value, str):
                    value = [value]
            if key not in known:
                raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
            if key == "concepts":
                out[key] = [_concept(c, f"{where}.concepts[{i}]") for i, c in enumerate(value or [])]
            elif key == "method_args":
                if not isinstance(value, dict):
                    raise UsageError(f"{where}.method_args: expected a mapping of method settings")
                out[key] = value
            else:
                default = getattr(cls, key, None)
                out[key] = _coerce(value, known[key].type, default, f"{where}.{key}")
        config = cls(**out)
        if config.epochs and "steps" in values:  # a run's own config.yaml has both: they must agree
            config._steps_given = (config.steps, where)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        if not self.out:
            raise UsageError(f"{where}.out: missing; give the run folder (--out)")
        if not self.concepts:
            raise UsageError(f"{where}.concepts: none given; pass --images, --token and --class-word, or a concepts list")
        method = get_method(self.method)
        if method.uses_text:
            for i, c in enumerate(self.concepts):
                for key in ("token", "class_word"):
                    if not getattr(c, key):
                        raise UsageError(f"{where}.concepts[{i}].{key}: missing (method {self.method} learns a token)")
            tokens = [c.token for c in self.concepts]
            if len(set(tokens)) != len(tokens):
                raise UsageError(f"{where}.concepts: tokens must differ, got {tokens}")
        for name, allowed in (("mixed_precision", ("no", "fp16", "bf16")), ("crop", ("center", "random")),
                              ("lr_scheduler", ("constant", "constant_with_warmup", "linear", "cosine"))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{where}.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "gradient_accumulation", "keep_checkpoints", "num_class_images"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{where}.{name}: must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "resolution", "seed", "weight_decay", "max_grad_norm",
                     "prior_weight", "preserve_weight", "epochs"):
            if not getattr(self, name) >= 0:  # also false for nan
                raise UsageError(f"{where}.{name}: must be zero or more, got {getattr(self, name)}")
        self._check_validation(where)
        self._check_report_to(where)
        if self.instance_prompt:
            self.instance_prompts(where)
        if self.ema_decay is None:
            self.ema_decay = method.default_ema_decay  # explicit in config.yaml
        elif not 0 <= self.ema_decay < 1:
            raise UsageError(f"{where}.ema_decay: must be at least 0 and below 1 (0 turns EMA off), got {self.ema_decay}")
        if self.prior_preservation and not method.uses_text:
            raise UsageError(f"{where}.prior_preservation: method {self.method} trains without text; turn it off")
        if self.lr is None:
            self.lr = get_method(self.method).default_lr  # explicit in config.yaml
        elif not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"{where}.lr: must be a positive number, got {self.lr}; leave it out for the method's "
                             f"default ({get_method(self.method).default_lr})")
        for fmt in self.export:
            if fmt not in ("kohya",):
                raise UsageError(f"{where}.export: unknown format {fmt!r}; extra formats: kohya")
        if "train_text_encoder" in self.method_args and "train_text_encoder" not in {f.name for f in fields(method.Config)}:
            raise UsageError(f"{where}.method_args.train_text_encoder (--train-text-encoder): method {self.method} has no "
                             "text-encoder LoRA; it applies to lora")
        get_method(self.method).Config.from_dict(self.method_args, f"{where}.method_args")
        if self.ico:
            if not method.takes_image_contexts:
                raise UsageError(f"{where}.ico: method {self.method} has no concept token to put contexts around; use "
                                 "lora, dreambooth, custom_diffusion, purecc or textual_inversion, or drop --ico")
            if self.n_ctx < 0 or self.n_end < 0 or self.n_ctx + self.n_end == 0:
                raise UsageError(f"{where}.n_ctx/n_end: zero or more each and at least one context vector in all, got "
                                 f"{self.n_ctx} and {self.n_end}; e.g. --n-ctx 1 --n-end 1")
            if not (math.isfinite(self.ctx_lr_scale) and self.ctx_lr_scale > 0):
                raise UsageError(f"{where}.ctx_lr_scale: must be a positive number, got {self.ctx_lr_scale}; e.g. 10")
        if self.preserve:
            self.output_preservation(f"{where}.")  # the source and the method, before any work

    def _check_validation(self, where: str) -> None:
        if self.sample_every is not None and not self.sample_every >= 0:
            raise UsageError(f"{where}.sample_every (--validation-every): must be zero or more, got {self.sample_every}")
        if self.sample_every and not self.sample_prompts:
            raise UsageError(f"{where}.sample_every (--validation-every {self.sample_every}): no validation prompt to "
                             "draw; add --validation-prompt TEXT, or drop --validation-every")
        if self.sample_prompts and self.sample_every is None:
            self.sample_every = DEFAULT_SAMPLE_EVERY  # explicit in config.yaml

    def _check_report_to(self, where: str) -> None:
        import importlib.util

        installed = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
        if self.report_to not in ("", "tensorboard", "none"):
            raise UsageError(f"{where}.report_to (--report-to): {self.report_to!r} is not tensorboard or none")
        if self.report_to == "tensorboard" and not installed:
            raise UsageError(f"{where}.report_to (--report-to tensorboard): the tensorboard package is not installed; "
                             "pip install tensorboard, or --report-to none (log.jsonl has every step either way)")
        if not self.report_to:
            self.report_to = "tensorboard" if installed else "none"  # explicit in config.yaml

    def instance_prompts(self, where: str = "config") -> list[str]:
        """Each concept's instance prompt ('' where the templates caption it); the prompt must name the
        concept's token, directly or as {token}."""
        if not self.instance_prompt:
            return [""] * len(self.concepts)
        method = get_method(self.method)
        if not method.uses_text:
            raise UsageError(f"{where}.instance_prompt (--instance-prompt): method {self.method} trains without text; "
                             "drop it")
        prompts = []
        for c in self.concepts:
            prompt = self.instance_prompt.replace("{token}", c.token).replace("{cls}", c.class_word)
            if c.token not in prompt:
                raise UsageError(f"{where}.instance_prompt (--instance-prompt): {self.instance_prompt!r} does not name "
                                 f"the token {c.token!r}; write it in the prompt (or {{token}}), e.g. "
                                 f"'a photo of {c.token} {c.class_word}'")
            prompts.append(prompt)
        return prompts

    def resolve_steps(self, n_images: int, processes: int = 1) -> None:
        """With epochs: steps = epochs passes over the n_images instance images, each optimizer step taking
        batch_size x gradient_accumulation x processes of them (a last partial batch counts as a step)."""
        if self.epochs:
            per_step = self.batch_size * self.gradient_accumulation * processes
            steps = self.epochs * math.ceil(n_images / per_step)
            given, where = getattr(self, "_steps_given", (steps, ""))
            if given != steps:
                raise UsageError(f"{where}: steps {given} and epochs {self.epochs} disagree ({self.epochs} passes over "
                                 f"{n_images} images at {per_step} per step are {steps} steps); give one of them")
            self.steps = steps

    def output_preservation(self, prefix: str = "config."):
        """The run's output preservation (None when off), its source read and checked; errors name
        f"{prefix}preserve"."""
        from .methods.base import OutputPreservation

        if not self.preserve:
            return None
        refusal = get_method(self.method).preserve_refusal
        if refusal:
            raise UsageError(f"{prefix}preserve: {refusal}")
        if not (self.preserve_weight > 0 and math.isfinite(self.preserve_weight)):
            raise UsageError(f"{prefix}preserve_weight: must be positive with preserve, got {self.preserve_weight}; "
                             "drop preserve to train without it")
        return OutputPreservation.from_setting(self.preserve, self.preserve_weight, self.concepts, f"{prefix}preserve")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["concepts"] = [asdict(c) if not isinstance(c, dict) else c for c in self.concepts]
        return d

    def changes_from(self, saved: dict) -> list[tuple[str, object, object]]:
        """(key, saved value, this value) for every weight-shaping setting that differs from a saved run's."""
        mine, changed = self.to_dict(), []
        method = get_method(self.method)
        for key, value in mine.items():
            if key in self.RESUMABLE_CHANGES:
                continue
            old = saved.get(key, self.ADDED_LATER.get(key))
            if key == "method_args" and saved.get("method") == self.method:  # compare settings, defaults filled in
                try:
                    old = asdict(method.Config.from_dict(old or {}))
                except UsageError:
                    pass
                value = asdict(method.Config.from_dict(value))
            if old != value:
                changed.append((key, old, value))
        return changed


DEFAULT_SAMPLE_EVERY = 100  # validation grids when prompts are given without an interval
VALIDATION_STEPS = 25  # DDIM steps of a validation grid


def _concept(value, where: str) -> ConceptSpec:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a mapping with images, token and class_word")
    known = {f.name for f in fields(ConceptSpec)}
    for key in value:
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    if not value.get("images"):  # token and class word: checked against the method in validate()
        raise UsageError(f"{where}.images: missing")
    return ConceptSpec(**{k: str(v) for k, v in value.items()})


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config {path}: no such file")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UsageError(f"config {path}: not UTF-8 text; save it as UTF-8")
    except yaml.YAMLError as e:
        raise UsageError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        raise UsageError(f"config {path}: expected a mapping of settings at the top level")
    return values


# ---- the run folder ------------------------------------------------------------------------------

# what --overwrite clears of an earlier run, because a new run would resume from or append to it
EARLIER_RUN = ("checkpoints", "log.jsonl", "logs", "samples", "DONE")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_run_folder(out: Path, config: TrainConfig) -> None:
    """Before any work: --out is a folder this user can write, and it is empty, or a run of the same
    settings being resumed, or given up explicitly with --overwrite. Nothing else in it is touched."""
    check_writable_folder(out, "--out")
    if not out.is_dir() or is_empty_folder(out) or config.overwrite:
        return
    saved_path = out / "config.yaml"
    if not config.resume:
        what = "already holds a run" if saved_path.is_file() else "is not empty"
        raise UsageError(f"--out {out} {what}; add --resume latest to continue it, --overwrite to replace it, "
                         "or give a new --out")
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
    except (UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {out} holds no readable config.yaml, so it is no run to resume; "
                         "give a new --out (or --overwrite)")
    changes = config.changes_from(saved)
    if changes:
        key, old, new = changes[0]
        more = f" (and {len(changes) - 1} more settings)" if len(changes) > 1 else ""
        raise UsageError(f"--resume: {saved_path} has {key}: {_short(old)} but this command gives {_short(new)}{more}; "
                         "resume with the run's settings, or start a new run (a new --out, or --overwrite)")
    if (out / "DONE").is_file() and not _checkpoints(out) and config.resume == "latest":
        raise UsageError(f"--resume: {out} is a finished run whose checkpoints are gone; nothing to resume "
                         "(--overwrite trains it again)")


def _clear_earlier_run(out: Path, config: TrainConfig) -> None:
    """Main process only, once every check has passed: stray temporaries of a killed run go; with
    --overwrite, so does what a new run would otherwise resume from or append to."""
    import shutil

    remove_temporaries(out)
    if config.overwrite:
        for name in EARLIER_RUN:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _keep_log_until(out: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: drop them from log.jsonl first."""
    log = out / "log.jsonl"
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    atomic_write_text(log, "".join(line + "\n" for line in kept))


# ---- checkpoints -----------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))


def _resume_candidates(out: Path, config: TrainConfig) -> list[Path]:
    """The checkpoints to try, best first: the named one, or every one of the run, newest first."""
    if not config.resume:
        return []
    if config.resume == "latest":
        return _checkpoints(out)[::-1]
    path = Path(config.resume)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"--resume {path}: a pickle file; pristine checkpoints are safetensors "
                         "(checkpoints/step_*.safetensors in a run folder)")
    if not path.is_file():
        raise UsageError(f"--resume {config.resume}: no such checkpoint; give 'latest' or a checkpoints/step_*.safetensors file")
    check_safetensors(path, "--resume")
    return [path]


def _save_checkpoint(out: Path, step: int, method, optimizer, scheduler, keep: int, ema: "EMA | None" = None) -> Path:
    from .checkpoint import optimizer_tensors

    path = out / "checkpoints" / f"step_{step:07d}.safetensors"
    tensors = {f"trainable.{k}": v for k, v in method.trainable_state().items()}
    if ema is not None:
        tensors.update(ema.state())
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save(tensors, path, {**opt_meta, "step": str(step), "lr_scheduler": json.dumps(scheduler.state_dict())})
    for old in _checkpoints(out)[:-keep]:
        old.unlink()
    return path


def _load_checkpoint(path: Path, method, optimizer, scheduler, ema: "EMA | None" = None) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .checkpoint import load_optimizer_tensors

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    saved = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    expected = method.trainable_state()
    wrong = sorted(set(saved) ^ set(expected)) or [k for k in expected if saved[k].shape != expected[k].shape]
    if wrong or "step" not in meta:
        raise UsageError(f"--resume {path}: written by another method or other settings ({_short(wrong[:1] or 'no step')} "
                         f"differs); resume the run it belongs to, or start a new one")
    if ema is not None and not ema.fits(tensors):
        raise UsageError(f"--resume {path}: holds no EMA weights for this run's settings (ema_decay); resume the run "
                         "it belongs to, or start a new one")
    method.load_trainable_state(saved)
    if ema is not None:
        ema.load_state(tensors)
    load_optimizer_tensors(optimizer, tensors, meta)
    scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def _resume(candidates: list[Path], method, optimizer, scheduler, main: bool, say, ema: "EMA | None" = None) -> int:
    """Load the first intact checkpoint. A damaged one (a bad copy, a full disk) is passed over with a
    line saying so and renamed *.damaged (kept, never picked again); a named one was checked already."""
    for path in candidates:
        problem = safetensors_problem(path)
        if problem:
            say(f"warning: checkpoint {path} is damaged ({problem}); kept as {path.name}.damaged, "
                "resuming from the checkpoint before it")
            if main:
                path.rename(path.with_name(path.name + ".damaged"))
            continue
        return _load_checkpoint(path, method, optimizer, scheduler, ema)
    if candidates:
        say("warning: no intact checkpoint left; training starts from step 0")
    return 0


class EMA:
    """An exponential moving average of the trained tensors, updated after every optimizer step. Its
    decay warms up as (1 + n) / (10 + n) so early weights do not linger; it travels in each checkpoint."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"ema.{i}": s for i, s in enumerate(self.shadow)}, "ema.updates": torch.tensor(self.updates)}

    def fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        return "ema.updates" in tensors and all(
            f"ema.{i}" in tensors and tensors[f"ema.{i}"].shape == s.shape for i, s in enumerate(self.shadow))

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(tensors[f"ema.{i}"])
        self.updates = int(tensors["ema.updates"])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """The averaged weights into the model, for saving the outputs."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))


def _optimizer(groups, config: TrainConfig, lr: float):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=config.weight_decay)
        except ImportError:
            raise UsageError("use_8bit_adam: bitsandbytes is not installed; pip install bitsandbytes or turn it off")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


# ---- the loop --------------------------------------------------------------------------------------


def _to_device(backbone, device) -> None:
    """Every model of the backbone (denoiser, text encoders, VAE) on the process's device."""
    for value in vars(backbone).values():
        if isinstance(value, torch.nn.Module):
            value.to(device)


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the run folder with the method's outputs."""
    return run_training(config)[0]


def run_training(config: TrainConfig):
    """`train`, returning the trained method as well: (run folder, method)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    from .backbones import load_backbone
    from .methods.base import TrainableParameters

    out = Path(config.out)
    method_cls = get_method(config.method)
    method_config = method_cls.Config.from_dict(config.method_args)
    # checks every file before anything else
    concepts = [ConceptImages.load(c, captioned=method_cls.uses_text, instance_prompt=p)
                for c, p in zip(config.concepts, config.instance_prompts())]
    config.resolve_steps(sum(len(c.paths) for c in concepts), _processes())
    check_run_folder(out, config)  # after the steps are known: a resumed run's are compared
    candidates = _resume_candidates(out, config)
    torch.manual_seed(config.seed)
    backbone = load_backbone(config.model, allow_pickle=config.allow_pickle)
    backbone.check_export(config.export)
    size = config.resolution or backbone.image_size
    method = method_cls(method_config, backbone, config.concepts)
    groups = method.setup()  # checks the tokens: the run folder is made only once everything is valid
    if config.preserve:  # before resuming: the base weights it keeps are the loaded ones
        method.use_preservation(config.output_preservation())
    if config.ico:  # before resuming: checkpoints carry the contexts
        from .ico import ImageContexts

        method.use_contexts(ImageContexts(backbone, config.concepts, [len(c.paths) for c in concepts], config.n_ctx,
                                          config.n_end))
        groups.append({"params": method.contexts.parameters(), "lr": (config.lr or method_cls.default_lr) * config.ctx_lr_scale})

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
        AcceleratorState._reset_state()  # a second run in one process (API, demo, benchmarks) with another precision
    # some trained tensors take no part in some steps (PureCC's stages, a token absent from prior prompts)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    report_to = config.report_to or "tensorboard"  # a config built in Python, not validated: the old default
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
                              log_with=None if report_to == "none" else report_to, project_dir=str(out / "logs"),
                              kwargs_handlers=[ddp])
    accelerator.wait_for_everyone()  # every process has checked --out before the first one writes in it
    main = accelerator.is_main_process

    def say(line: str) -> None:
        if main:
            print(line, file=sys.stderr)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        _clear_earlier_run(out, config)
    lr = config.lr or method_cls.default_lr
    if config.gradient_checkpointing and hasattr(backbone.denoiser, "enable_gradient_checkpointing"):
        backbone.denoiser.enable_gradient_checkpointing()

    prior = None
    if config.prior_preservation:
        from PIL import Image

        images, prompts = [], []
        with accelerator.main_process_first():  # generated once, then read by the other processes
            for c in config.concepts:
                prompt = config.class_prompt.format(cls=c.class_word)
                for p in class_images(backbone, prompt, config.num_class_images, out.parent / ".class_images", seed=config.seed):
                    with Image.open(p) as im:
                        images.append(to_rgb(im))
                    prompts.append(prompt)
        prior = (images, prompts)
    data = build_training_set(concepts, size, flip=config.flip, crop=config.crop, prior=prior)
    if config.crop == "center":
        cache_latents(data, backbone)

    # every trained tensor, whichever model holds it, in the one module accelerate prepares: under
    # several processes (DDP) each one's gradient is averaged and each starts equal everywhere
    device = accelerator.device
    _to_device(backbone, device)
    method.prepare(data)  # after the models moved: a method's own measuring passes run on the device
    trainable = [p for g in groups for p in g["params"]]
    model = TrainableParameters(method, trainable)
    ema = EMA(trainable, config.ema_decay) if config.ema_decay else None
    optimizer = _optimizer(groups, config, lr)
    # stepped here once per optimizer step: accelerate's wrapper would step it once per process
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    start = _resume(candidates, method, optimizer, scheduler, main, say, ema)
    if main:
        _write_config(out, config)
        _keep_log_until(out, start)

    prior_batch = config.batch_size if config.prior_preservation else 0
    sample_every = DEFAULT_SAMPLE_EVERY if config.sample_every is None else config.sample_every
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {config.method}",
               disable=not main)
    t0 = time.time()
    accelerator.init_trackers("train")
    for step in bar:
        for micro in range(config.gradient_accumulation):
            # the same generator on every process: each takes its share of one batch of batch_size x processes
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + micro)
            batch = data.draw(config.batch_size, generator, prior_batch, shard=(rank, world))
            batch["step"] = step  # methods with stages (PureCC) switch on it
            if "latents" not in batch:
                batch["latents"] = backbone.encode_images(batch["pixels"].to(device), generator)
            batch["latents"] = batch["latents"].to(device)
            n_all, mine = batch["global_size"], batch["positions"]
            noise = torch.randn((n_all, *batch["latents"].shape[1:]), generator=generator)
            batch["noise"], batch["timesteps"] = noise[mine], backbone.sample_timesteps(n_all, generator)[mine]
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, logs = model(batch, generator, config.prior_weight)
                losses = accelerator.gather(loss.detach().float().reshape(1))
                if not bool(torch.isfinite(losses).all()):
                    last = _checkpoints(out)
                    where = f"; the last good checkpoint is {last[-1]}" if last else ""
                    bad = losses[~torch.isfinite(losses)][0].item()
                    raise UsageError(f"loss became {bad} at step {step + 1}: lower the learning rate (now {lr}){where}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                method.adjust_learning_rates(optimizer.param_groups, step)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                    if ema is not None:
                        ema.update()
                optimizer.zero_grad(set_to_none=True)
        record = {"loss": losses.mean().item(), "lr": scheduler.get_last_lr()[0], **logs}
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}", it_s=f"{(step + 1 - start) / (time.time() - t0):.2f}")
        if not main:
            continue
        accelerator.log(record, step=step + 1)
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step + 1, **record}) + "\n")
        if config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            _save_checkpoint(out, step + 1, method, optimizer, scheduler, config.keep_checkpoints, ema)
        if config.sample_prompts and sample_every and (step + 1) % sample_every == 0 and step + 1 < config.steps:
            _sample_during_training(method, config, out / "samples" / f"step_{step + 1:07d}.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if ema is not None:
        ema.copy_to_params()  # the outputs are the averaged weights (and so is the returned method)
    if main and config.sample_prompts:  # the last grid shows the outputs' weights (EMA included)
        _sample_during_training(method, config, out / "samples" / f"step_{config.steps:07d}.png")
    if main:
        method.save(out, config.export)
        atomic_write_text(out / "DONE", json.dumps({"steps": config.steps, "method": config.method}))
    return out, method


def _processes() -> int:
    """How many processes train together (`accelerate launch` says so in WORLD_SIZE), before accelerate starts."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _write_config(out: Path, config: TrainConfig) -> None:
    """The run's settings, the method's with their defaults filled in: the file says what the run was
    trained with even after a default changes, so loading it and resuming it stay what they were."""
    settings = config.to_dict()
    settings["method_args"] = asdict(get_method(config.method).Config.from_dict(config.method_args))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))


def _sample_during_training(method, config: TrainConfig, path: Path) -> None:
    import os

    from .sample import grid_for_prompts

    pipe = method.backbone.pipeline()
    prompts = [method.tokens.prompt(p) if method.tokens else p for p in config.sample_prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    pipe.set_progress_bar_config(disable=True)
    # 25 steps, as diffusers' DreamBooth scripts draw their validation images
    grid_for_prompts(pipe, prompts, n=4, seed=config.seed, steps=VALIDATION_STEPS, labels=config.sample_prompts).save(tmp)
    os.replace(tmp, path)
