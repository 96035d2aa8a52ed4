"""Drawing pictures from a base model plus at most one run, for the demo, the benches and the eval
presets: through the sampling engine (sampling.py) for the families it drives, through the family's
diffusers pipeline for the others (SD3, FLUX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

SCHEDULERS = ("ddim", "euler", "ddpm")


def set_scheduler(pipe, name: str) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        if name not in ("euler", "ddim"):  # ddim: the default, means "the usual sampler" here
            raise UsageError(f"--scheduler {name!r}: flow-matching models sample with euler (flow matching) only")
        return
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}.get(name)
    if cls is None:
        raise UsageError(f"--scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 50, guidance: float = 5.0, batch: int = 50,
             desc: str = "generate", scheduler: str = "ddim", **call) -> list[np.ndarray]:
    """One seeded generator per image, so every picture is reproducible on its own. `pipe` is what
    `load_pipeline` gives (the engine's RunSampler, or a diffusers pipeline); `call`: more arguments of a
    diffusers pipeline's call (negative_prompt, height, width)."""
    from tqdm import tqdm

    from .sampling import RunSampler

    if isinstance(pipe, RunSampler):
        if call:
            raise TypeError(f"the engine's RunSampler takes no {', '.join(call)}; use sampling.sample(...)")
        return pipe.generate(prompts, seeds, steps=steps, guidance=guidance, batch=batch, desc=desc, scheduler=scheduler)

    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=len(prompts) <= batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        if isinstance(call.get("negative_prompt"), str):  # the pipelines want one per prompt of the list
            call = {**call, "negative_prompt": [call["negative_prompt"]] * len(generators)}
        with torch.no_grad():
            out = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, output_type="np", **call)
        images.extend((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
    return images


def grid_for_prompts(pipe, prompts: list[str], n: int = 4, seed: int = 0, labels: list[str] | None = None, **kw):
    from .eval.grids import make_grid

    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + k for _ in prompts for k in range(n)]
    images = generate(pipe, all_prompts, seeds, **kw)
    return make_grid([images[i * n : (i + 1) * n] for i in range(len(prompts))], labels or prompts)


RUN_OUTPUTS = ("pytorch_lora_weights.safetensors", "custom_diffusion.safetensors", "learned_embeds.safetensors")


def run_tokens(run: Path) -> list[str]:
    path = run / "learned_embeds.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    from .files import check_safetensors

    check_safetensors(path, "--adapter")

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def load_pipeline(model: str, adapter: str | None = None, allow_pickle: bool = False, lora_scale: float = 1.0):
    """The base model with a run's outputs applied: the engine's RunSampler where the engine drives the
    family, else the family's diffusers pipeline; a run's LoRA scaled by `lora_scale`."""
    from .backbones import backbone_class, resolve_model
    from .backbones.base import load_embeddings, pipeline_denoiser
    from .files import check_model_weights, check_safetensors

    folder = resolve_model(model)
    family = backbone_class(folder)
    if family.GUIDED_SAMPLING:
        from .sampling import RunSampler

        return RunSampler(model, adapter, allow_pickle, lora_scale)
    # flow families: their own pipeline with the run's files loaded
    run = Path(adapter) if adapter else None
    if run is not None and not run.is_dir():
        raise UsageError(f"--adapter {adapter}: no such run folder")
    full_model = run is not None and (run / "model" / "model_index.json").is_file()
    model_folder = run / "model" if full_model else folder
    check_model_weights(model_folder, allow_pickle)
    for name in RUN_OUTPUTS if run is not None else ():
        if (run / name).is_file():
            check_safetensors(run / name, "--adapter")
    pipe = family.pipeline_class().from_pretrained(str(model_folder), torch_dtype=torch.float32, local_files_only=True,
                                                   use_safetensors=None if allow_pickle else True, **family.PIPELINE_KWARGS)
    if run is None or full_model:
        return pipe
    found = False
    if (run / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors", adapter_name="run")
        if lora_scale != 1:
            pipe.set_adapters(["run"], adapter_weights=[lora_scale])
        found = True
    if (run / "custom_diffusion.safetensors").is_file():
        from .methods.custom_diffusion import apply_custom_diffusion

        apply_custom_diffusion(pipeline_denoiser(pipe), run / "custom_diffusion.safetensors")
        found = True
    found = load_embeddings(pipe, run, family.TEXT_PAIRS) or found
    if not found:
        raise UsageError(f"--adapter {adapter}: holds no pristine outputs (LoRA, embeddings or a model folder)")
    return pipe


def pipeline_rows(settings) -> list[list[np.ndarray]]:
    """`pristine sample` for the families the engine does not drive yet (SD3, FLUX): ordinary CFG with at
    most one run through the family's own diffusers pipeline; one row of settings.n pictures per prompt."""
    from .backbones import backbone_class, resolve_model

    family = backbone_class(resolve_model(settings.model))
    one_term = len(settings.guides) == 1 and settings.unconditional == settings.guides[0].adapter
    if not one_term or not settings.prompts:
        raise UsageError(f"the {family.family} family samples with ordinary CFG only for now: give --prompt (and "
                         "--adapter, --guidance), not --guide or --unconditional")
    if settings.negative_prompt and not family.NEGATIVE_PROMPT:
        raise UsageError(f"--negative-prompt: {family.family} models are guidance-distilled and draw without a "
                         "negative prompt; drop it")
    g = settings.guides[0]
    pipe = load_pipeline(settings.model, g.adapter or None, allow_pickle=settings.allow_pickle,
                         lora_scale=settings.lora_scale)
    call = {k: v for k, v in (("negative_prompt", settings.negative_prompt), ("height", settings.height),
                              ("width", settings.width)) if v}
    seeds = [settings.seed + k for k in range(settings.n)]
    return [generate(pipe, [prompt] * settings.n, seeds, steps=settings.steps, guidance=g.weight,
                     scheduler=settings.scheduler, **call) for prompt in settings.prompts]
