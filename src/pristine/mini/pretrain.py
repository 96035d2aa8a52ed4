"""Pre-training pristine-mini on the Shapes world, one resumable stage at a time.

Stages: vae -> clip -> unet (the unet stage needs the other two); oracle is independent.
Every stage checkpoints to WORKDIR/<stage>/state.safetensors, logs losses to log.jsonl, resumes
from its last checkpoint when run again, and on completion writes its part of the model folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_training_state, save_training_state
from ..world import PRETRAINING_WORLD, render
from ..world.captions import caption
from . import architecture as arch

CAPTIONS_PER_SCENE = 3


# ---- the corpus: rendered once, cached in the work folder -------------------------------------


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    seed, n = args
    rng = np.random.default_rng(seed)
    images, masks, captions = np.zeros((n, 32, 32, 3), np.uint8), np.zeros((n, 32, 32), bool), []
    for i in range(n):
        scene = PRETRAINING_WORLD.sample(rng)
        images[i], object_masks = render(scene)
        masks[i] = np.any(object_masks, axis=0)
        captions.append([caption(scene, rng) for _ in range(CAPTIONS_PER_SCENE)])
    return images, masks, captions


def build_corpus(workdir: Path, n: int, seed: int = 0, workers: int = 2) -> Path:
    """Render n pre-training scenes (with where their objects are) and several captions each; cached."""
    path = workdir / f"corpus_v2_seed{seed}_n{n}.npz"
    if path.exists():
        return path
    chunk = 2000
    jobs = [(seed * 1_000_003 + i, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk))]
    from multiprocessing import Pool

    with Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render corpus"))
    images, masks = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    captions = [c for p in parts for c in p[2]]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=images, masks=masks, captions=np.array(captions, dtype=object).astype(str))
    tmp.rename(path)
    return path


def load_corpus(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    data = np.load(path)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # [-1, 1]
    return images, data["captions"]


def tokenize(tokenizer, texts) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---- one resumable loop for every stage ---------------------------------------------------------


@dataclass
class StageSettings:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    checkpoint_every: int = 200
    seed: int = 0


class StageHooks:
    """What a stage adds to the loop besides its loss (the unet stage keeps an EMA)."""

    def after_update(self, step: int) -> None: ...

    def save(self) -> None: ...

    def load(self) -> None: ...


def run_stage(name: str, workdir: Path, model: torch.nn.Module, params, settings: StageSettings, loss_fn,
              hooks: StageHooks | None = None) -> dict:
    """Train `params` with AdamW and a warm-up/cosine schedule, resuming from the stage's checkpoint.

    loss_fn(step, generator) returns (loss, logs); its batches must be drawn from `generator`
    so a resumed run sees the same batches as an uninterrupted one.
    """
    stage_dir = workdir / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = stage_dir / "state.safetensors", stage_dir / "log.jsonl"
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)

    def lr_at(step):
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    hooks = hooks or StageHooks()
    start = 0
    if state_path.exists():
        start = load_training_state(state_path, model, optimizer, scheduler)["step"]
        hooks.load()
    if start >= settings.steps:
        return {"step": start}
    model.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=f"pretrain {name}")
    t0 = time.time()
    with open(log_path, "a") as log:
        for step in bar:
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            loss, logs = loss_fn(step, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}; last good checkpoint kept at {state_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            hooks.after_update(step + 1)
            record = {"step": step + 1, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0], **logs}
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{record['lr']:.2e}", it_s=f"{(step + 1 - start) / (time.time() - t0):.2f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                log.flush()
                hooks.save()
                save_training_state(state_path, model, optimizer, {"step": step + 1}, scheduler)
    return {"step": settings.steps}


def read_log(workdir: Path, name: str) -> list[dict]:
    path = workdir / name / "log.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():  # a resumed run re-logs steps after its checkpoint
        rec = json.loads(line)
        by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def _batch(n_items: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n_items, (batch_size,), generator=generator)


# ---- stages ---------------------------------------------------------------------------------------


def pretrain_vae(workdir: Path, out: Path, corpus: Path, settings: StageSettings) -> None:
    images, _ = load_corpus(corpus)
    # objects cover a few percent of the pixels: weigh them (and a pixel around them) 5x, or the
    # autoencoder learns textured backgrounds long before shapes and colors
    masks = torch.from_numpy(np.load(corpus)["masks"])[:, None].float()
    weights = 1 + 4 * F.max_pool2d(masks, 3, stride=1, padding=1)
    torch.manual_seed(settings.seed)
    vae = arch.new_vae()
    with torch.no_grad():  # start with a small posterior std: unit noise on fresh latents drowns them
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0

    def edges(img):
        return img[..., 1:, :] - img[..., :-1, :], img[..., :, 1:] - img[..., :, :-1]

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        x, w = images[idx], weights[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        err = recon - x
        l1, mse = (err.abs() * w).mean(), (err.pow(2) * w).mean()
        # matching image gradients keeps edges sharp
        edge = sum(((a - b).abs()).mean() for a, b in zip(edges(recon), edges(x)))
        kl = posterior.kl().mean() / x[0].numel()
        return l1 + mse + edge + 1e-4 * kl, {"l1": round(l1.item(), 5), "kl": round(kl.item(), 4)}

    run_stage("vae", workdir, vae, list(vae.parameters()), settings, loss_fn)
    vae.eval()
    with torch.no_grad():  # unit-variance latents, as Stable Diffusion's scaling factor gives
        z = torch.cat([vae.encode(images[i : i + 500]).latent_dist.mean for i in range(0, min(4000, len(images)), 500)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)


def pretrain_clip(workdir: Path, out: Path, corpus: Path, settings: StageSettings, tokenizer_dir: Path) -> None:
    from .tokenizer import load_tokenizer

    images, captions = load_corpus(corpus)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenize(tokenizer, captions.reshape(-1)).reshape(len(images), CAPTIONS_PER_SCENE, 77)[:, :, :40]
    torch.manual_seed(settings.seed)
    clip = arch.new_clip()

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        which = torch.randint(0, CAPTIONS_PER_SCENE, (len(idx),), generator=g)
        out_ = clip(input_ids=ids[idx, which], pixel_values=images[idx], return_loss=True)
        acc = (out_.logits_per_image.argmax(1) == torch.arange(len(idx))).float().mean()
        return out_.loss, {"acc": round(acc.item(), 4), "scale": round(clip.logit_scale.exp().item(), 2)}

    run_stage("clip", workdir, clip, list(clip.parameters()), settings, loss_fn)
    clip = clip.to(torch.float16)
    clip.save_pretrained(out / "clip", safe_serialization=True)
    write_clip_processor(out / "clip")
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # transformers 5 flattened it
    text.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    import shutil

    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(tokenizer_dir, out / "clip", dirs_exist_ok=True)


def write_clip_processor(folder: Path) -> None:
    """The image preprocessing the mini CLIP was trained with: 32x32, pixels mapped to [-1, 1]."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": arch.IMAGE_SIZE},
        "do_center_crop": True,
        "crop_size": {"height": arch.IMAGE_SIZE, "width": arch.IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


class EMA(StageHooks):
    """An exponential moving average of a model's weights, saved beside the stage's checkpoint."""

    def __init__(self, model: torch.nn.Module, path: Path, decay: float):
        self.model, self.path, self.decay = model, path, decay
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def after_update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.weights[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    self.weights[k].copy_(v)

    def save(self) -> None:
        from ..checkpoint import atomic_save

        atomic_save(self.weights, self.path)

    def load(self) -> None:
        from safetensors.torch import load_file

        self.weights.update(load_file(str(self.path)))


def _min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def pretrain_unet(workdir: Path, out: Path, corpus: Path, settings: StageSettings, caption_dropout: float = 0.1,
                  ema_decay: float = 0.999) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from .tokenizer import load_tokenizer

    images, captions = load_corpus(corpus)
    import hashlib

    vae_hash = hashlib.sha1((out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]
    latents_path = workdir / f"unet_latents_{corpus.stem}_vae{vae_hash}.safetensors"  # stale if either changes
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32, use_safetensors=True).eval()
    if latents_path.exists():
        from safetensors.torch import load_file

        latents = load_file(str(latents_path))["latents"]
    else:
        with torch.no_grad():  # the VAE is frozen: encode the corpus once
            latents = torch.cat([vae.encode(images[i : i + 500]).latent_dist.mean for i in
                                 tqdm(range(0, len(images), 500), desc="encode latents")]) * vae.config.scaling_factor
        from ..checkpoint import atomic_save

        atomic_save({"latents": latents}, latents_path)
    del images
    tokenizer = load_tokenizer(out / "tokenizer")
    ids = tokenize(tokenizer, captions.reshape(-1)).reshape(len(latents), CAPTIONS_PER_SCENE, 77)
    empty_ids = tokenize(tokenizer, [""])[0]
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32, use_safetensors=True).eval().requires_grad_(False)
    scheduler = arch.new_scheduler()
    torch.manual_seed(settings.seed)
    unet = arch.new_unet()
    ema = EMA(unet, workdir / "unet" / "ema.safetensors", ema_decay)

    def loss_fn(step, g):
        idx = _batch(len(latents), settings.batch_size, g)
        which = torch.randint(0, CAPTIONS_PER_SCENE, (len(idx),), generator=g)
        tokens = ids[idx, which]
        drop = torch.rand(len(idx), generator=g) < caption_dropout
        tokens[drop] = empty_ids
        with torch.no_grad():
            cond = text_encoder(tokens).last_hidden_state
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, cond).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weights(scheduler, t)).mean()
        return loss, {"mse": round(per_sample.mean().item(), 5)}

    run_stage("unet", workdir, unet, list(unet.parameters()), settings, loss_fn, hooks=ema)
    unet.load_state_dict(ema.weights)
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    write_pipeline_files(out)


def write_pipeline_files(out: Path) -> None:
    """model_index.json and the scheduler: what makes the folder a diffusers Stable Diffusion model."""
    arch.new_scheduler().save_pretrained(out / "scheduler")
    from diffusers import __version__ as diffusers_version

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


# ---- the oracle --------------------------------------------------------------------------------


def _render_labelled_chunk(args):
    from ..world import FULL_WORLD
    from .oracle import labels

    seed, n = args
    rng = np.random.default_rng(seed)
    images, targets, scenes = np.zeros((n, 32, 32, 3), np.uint8), [], []
    for i in range(n):
        sampler = FULL_WORLD if i % 2 else PRETRAINING_WORLD
        scene = sampler.sample(rng)
        images[i] = render(scene)[0]
        targets.append(labels(scene))
        scenes.append(scene)
    stacked = {k: np.stack([t[k] for t in targets]) for k in targets[0]}
    return images, stacked, scenes


def labelled_renders(n: int, seed: int, workers: int = 1):
    """Fresh renders from the whole world (held-out parts included) with the oracle's targets."""
    chunk = 1000
    jobs = [(seed * 7_000_003 + i, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk))]
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            parts = list(tqdm(pool.imap(_render_labelled_chunk, jobs), total=len(jobs), desc="render labelled"))
    else:
        parts = [_render_labelled_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    targets = {k: torch.from_numpy(np.concatenate([p[1][k] for p in parts])) for k in parts[0][1]}
    return images, targets, [s for p in parts for s in p[2]]


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and tone shifts: generated pictures are never as clean as renders."""
    b = len(x)
    blur = torch.rand(b, generator=g) < 0.4
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3), x)
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.08
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.1
    return (x * gain + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def pretrain_oracle(workdir: Path, out: Path, settings: StageSettings, n_train: int = 60000) -> dict:
    from .oracle import Oracle, accuracy, loss

    cache = workdir / f"oracle_corpus_n{n_train}.safetensors"
    if cache.exists():
        from safetensors.torch import load_file

        data = load_file(str(cache))
        images, targets = data.pop("images"), data
    else:
        images, targets, _ = labelled_renders(n_train, seed=settings.seed + 1, workers=2)
        from ..checkpoint import atomic_save

        atomic_save({"images": images, **targets}, cache)
    torch.manual_seed(settings.seed)
    oracle = Oracle()

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        _, logits = oracle(degrade(images[idx], g))
        return loss(logits, {k: v[idx] for k, v in targets.items()})

    run_stage("oracle", workdir, oracle, list(oracle.parameters()), settings, loss_fn)
    oracle.eval()
    test_images, _, test_scenes = labelled_renders(min(2000, n_train), seed=settings.seed + 999)
    acc = accuracy(oracle, test_images, test_scenes)
    oracle.save(out / "oracle")
    (out / "oracle" / "selftest.json").write_text(json.dumps(acc, indent=2))
    return acc
