"""The one training loop: every method, every model family.

accelerate underneath (mixed precision, gradient accumulation, `accelerate launch`). Each step's
batches come from a generator seeded by (seed, step), so a run resumed from a checkpoint ends with
the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .checkpoint import atomic_save
from .data import ConceptImages, ConceptSpec, build_training_set, cache_latents, class_images, to_rgb
from .errors import UsageError
from .methods import get_method
from .methods.base import _coerce


@dataclass
class TrainConfig:
    out: str = ""
    model: str = "mini"
    method: str = "lora"
    method_args: dict = field(default_factory=dict)
    concepts: list = field(default_factory=list)  # of ConceptSpec
    steps: int = 400
    batch_size: int = 4
    gradient_accumulation: int = 1
    lr: float = 0.0  # 0: the method's default
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
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
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_prompts: list = field(default_factory=list)
    export: list = field(default_factory=list)  # extra formats: "kohya"
    resume: str = ""  # "latest" or a checkpoint path

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        out = {}
        for key, value in values.items():
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
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        if not self.out:
            raise UsageError(f"{where}.out: missing; give the run folder (--out)")
        if not self.concepts:
            raise UsageError(f"{where}.concepts: none given; pass --images, --token and --class-word, or a concepts list")
        tokens = [c.token for c in self.concepts]
        if len(set(tokens)) != len(tokens):
            raise UsageError(f"{where}.concepts: tokens must differ, got {tokens}")
        for name, allowed in (("mixed_precision", ("no", "fp16", "bf16")), ("crop", ("center", "random")),
                              ("lr_scheduler", ("constant", "constant_with_warmup", "linear", "cosine"))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{where}.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{where}.{name}: must be positive, got {getattr(self, name)}")
        for fmt in self.export:
            if fmt not in ("kohya",):
                raise UsageError(f"{where}.export: unknown format {fmt!r}; extra formats: kohya")
        get_method(self.method).Config.from_dict(self.method_args, f"{where}.method_args")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["concepts"] = [asdict(c) if not isinstance(c, dict) else c for c in self.concepts]
        return d


def _concept(value, where: str) -> ConceptSpec:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a mapping with images, token and class_word")
    known = {f.name for f in fields(ConceptSpec)}
    for key in value:
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    for key in ("images", "token", "class_word"):
        if not value.get(key):
            raise UsageError(f"{where}.{key}: missing")
    return ConceptSpec(**{k: str(v) for k, v in value.items()})


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config {path}: no such file")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        raise UsageError(f"config {path}: expected a mapping of settings at the top level")
    return values


# ---- the loop ------------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))


def _save_checkpoint(out: Path, step: int, method, optimizer, scheduler, keep: int) -> Path:
    from .checkpoint import optimizer_tensors

    path = out / "checkpoints" / f"step_{step:07d}.safetensors"
    tensors = {f"trainable.{k}": v for k, v in method.trainable_state().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save(tensors, path, {**opt_meta, "step": str(step), "lr_scheduler": json.dumps(scheduler.state_dict())})
    for old in _checkpoints(out)[:-keep]:
        old.unlink()
    return path


def _load_checkpoint(path: Path, method, optimizer, scheduler) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .checkpoint import load_optimizer_tensors

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    method.load_trainable_state({k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")})
    load_optimizer_tensors(optimizer, tensors, meta)
    scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def _optimizer(groups, config: TrainConfig, lr: float):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=config.weight_decay)
        except ImportError:
            raise UsageError("use_8bit_adam: bitsandbytes is not installed; pip install bitsandbytes or turn it off")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def train(config: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the run folder with the method's outputs."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    from .backbones import load_backbone

    out = Path(config.out)
    method_cls = get_method(config.method)
    method_config = method_cls.Config.from_dict(config.method_args)
    concepts = [ConceptImages.load(c) for c in config.concepts]  # checks every file before anything else
    if out.exists() and (out / "config.yaml").exists() and not config.resume and _checkpoints(out):
        raise UsageError(f"run folder {out} already holds a run; pass --resume latest to continue it or pick a new --out")
    torch.manual_seed(config.seed)
    backbone = load_backbone(config.model)
    backbone.check_export(config.export)
    size = config.resolution or backbone.image_size
    method = method_cls(method_config, backbone, config.concepts)
    groups = method.setup()  # checks the tokens: the run folder is made only once everything is valid
    out.mkdir(parents=True, exist_ok=True)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
        AcceleratorState._reset_state()  # a second run in one process (API, demo, benchmarks) with another precision
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
                              log_with="tensorboard", project_dir=str(out / "logs"))
    lr = config.lr or method_cls.default_lr
    if config.gradient_checkpointing and hasattr(backbone.denoiser, "enable_gradient_checkpointing"):
        backbone.denoiser.enable_gradient_checkpointing()

    prior = None
    if config.prior_preservation:
        from PIL import Image

        images, prompts = [], []
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

    if accelerator.num_processes > 1:  # `accelerate launch`: gradients of the trained modules all-reduce
        backbone.denoiser = accelerator.prepare(backbone.denoiser)
    optimizer = _optimizer(groups, config, lr)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    start = 0
    if config.resume:
        ckpts = _checkpoints(out)
        path = ckpts[-1] if config.resume == "latest" and ckpts else Path(config.resume)
        if config.resume == "latest" and not ckpts:
            start = 0  # nothing saved yet: start over
        elif not path.is_file():
            raise UsageError(f"--resume {config.resume}: no such checkpoint")
        else:
            start = _load_checkpoint(path, method, optimizer, scheduler)
    _write_config(out, config)

    trainable = [p for g in groups for p in g["params"]]
    prior_batch = config.batch_size if config.prior_preservation else 0
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {config.method}")
    t0 = time.time()
    accelerator.init_trackers("train")
    for step in bar:
        for micro in range(config.gradient_accumulation):
            generator = torch.Generator().manual_seed(
                config.seed * 1_000_003 + step * 101 + micro + accelerator.process_index * 7_919)
            batch = data.draw(config.batch_size, generator, prior_batch)
            batch["step"] = step  # methods with stages (PureCC) switch on it
            if "latents" not in batch:
                batch["latents"] = backbone.encode_images(batch["pixels"], generator)
            with accelerator.accumulate(*[m for m in (backbone.denoiser,)]):
                with accelerator.autocast():
                    loss, logs = method.loss(batch, generator, config.prior_weight)
                if not torch.isfinite(loss):
                    last = _checkpoints(out)
                    where = f"; the last good checkpoint is {last[-1]}" if last else ""
                    raise UsageError(f"loss became {loss.item()} at step {step + 1}: lower the learning rate (now {lr}){where}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        record = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], **logs}
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}", it_s=f"{(step + 1 - start) / (time.time() - t0):.2f}")
        if not accelerator.is_main_process:
            continue
        accelerator.log(record, step=step + 1)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step + 1, **record}) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(out, step + 1, method, optimizer, scheduler, config.keep_checkpoints)
        if config.sample_every and (step + 1) % config.sample_every == 0 and config.sample_prompts:
            _sample_during_training(method, config, out / "samples" / f"step_{step + 1:07d}.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        method.save(out, config.export)
        (out / "DONE").write_text(json.dumps({"steps": config.steps, "method": config.method}))
    return out


def _write_config(out: Path, config: TrainConfig) -> None:
    tmp = out / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(out / "config.yaml")


def _sample_during_training(method, config: TrainConfig, path: Path) -> None:
    from .sample import grid_for_prompts

    pipe = method.backbone.pipeline()
    prompts = [method.tokens.prompt(p) if method.tokens else p for p in config.sample_prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_for_prompts(pipe, prompts, n=4, seed=config.seed, labels=config.sample_prompts).save(path)
