"""Pre-training pristine-mini on the Shapes world, one resumable stage at a time.

Stages: vae -> clip -> unet (the unet stage needs the other two); oracle is independent.
Every stage checkpoints to WORKDIR/<stage>/state.safetensors, logs losses to log.jsonl, resumes
from its last checkpoint when run again, and on completion writes its part of the model folder.
"""

from __future__ import annotations

import json
import math
import os
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


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray, list[list[str]], list[str]]:
    seed, n = args
    rng = np.random.default_rng(seed)
    images, masks, captions = np.zeros((n, 32, 32, 3), np.uint8), np.zeros((n, 32, 32), bool), []
    scenes = []
    for i in range(n):
        scene = PRETRAINING_WORLD.sample(rng)
        images[i], object_masks = render(scene)
        masks[i] = np.any(object_masks, axis=0)
        captions.append([caption(scene, rng) for _ in range(CAPTIONS_PER_SCENE)])
        scenes.append(json.dumps(scene.attributes()))
    return images, masks, captions, scenes


def build_corpus(workdir: Path, n: int, seed: int = 0, workers: int | None = None) -> Path:
    """Render n pre-training scenes (with where their objects are, their ground truth and several
    captions each); cached."""
    path = workdir / f"corpus_v3_seed{seed}_n{n}.npz"
    if path.exists():
        return path
    chunk = 2000
    jobs = [(seed * 1_000_003 + i, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk))]
    from multiprocessing import Pool

    with Pool(workers or os.cpu_count()) as pool:  # chunks are seeded by index: any worker count gives the same corpus
        parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render corpus"))
    images, masks = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    captions = [c for p in parts for c in p[2]]
    scenes = np.array([s for p in parts for s in p[3]])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=images, masks=masks, captions=np.array(captions, dtype=object).astype(str), scenes=scenes)
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
    """Train `params` (tensors, or AdamW parameter groups) with a warm-up/cosine schedule, resuming
    from the stage's checkpoint.

    loss_fn(step, generator) returns (loss, logs); its batches must be drawn from `generator`
    so a resumed run sees the same batches as an uninterrupted one. Wall-clock seconds add up across
    resumes and are logged with every step (`wall`).
    """
    stage_dir = workdir / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = stage_dir / "state.safetensors", stage_dir / "log.jsonl"
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    flat_params = [p for g in optimizer.param_groups for p in g["params"]]

    def lr_at(step):
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    hooks = hooks or StageHooks()
    start, wall_before = 0, 0.0
    if state_path.exists():
        extra = load_training_state(state_path, model, optimizer, scheduler)
        start, wall_before = extra["step"], extra.get("wall", 0.0)
        hooks.load()
    if start >= settings.steps:
        return {"step": start, "wall": wall_before}
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
            torch.nn.utils.clip_grad_norm_(flat_params, 1.0)
            optimizer.step()
            scheduler.step()
            hooks.after_update(step + 1)
            wall = wall_before + time.time() - t0
            record = {"step": step + 1, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0],
                      "wall": round(wall, 1), **logs}
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{record['lr']:.2e}", it_s=f"{(step + 1 - start) / (time.time() - t0):.2f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                log.flush()
                hooks.save()
                save_training_state(state_path, model, optimizer, {"step": step + 1, "wall": wall}, scheduler)
    return {"step": settings.steps, "wall": wall_before + time.time() - t0}


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


def _vae_reconstruction(vae, x: torch.Tensor, w: torch.Tensor, g: torch.Generator) -> tuple:
    """(posterior, weighted L1, weighted MSE, image-gradient L1) of one sampled round trip: the VAE
    stages' reconstruction terms (matching image gradients keeps edges sharp)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
    recon = vae.decode(z).sample
    err = recon - x
    l1, mse = (err.abs() * w).mean(), (err.pow(2) * w).mean()
    edge = sum(((a - b).abs()).mean() for a, b in zip(_image_gradients(recon), _image_gradients(x)))
    return posterior, l1, mse, edge


def _image_gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return img[..., 1:, :] - img[..., :-1, :], img[..., :, 1:] - img[..., :, :-1]


def pretrain_vae(workdir: Path, out: Path, corpus: Path, settings: StageSettings, device: str = "cpu") -> None:
    images, _ = load_corpus(corpus)
    # objects cover a few percent of the pixels: weigh them (and a pixel around them) 5x, or the
    # autoencoder learns textured backgrounds long before shapes and colors
    masks = torch.from_numpy(np.load(corpus)["masks"])[:, None].float()
    weights = 1 + 4 * F.max_pool2d(masks, 3, stride=1, padding=1)
    _train_fresh_vae("vae", workdir, out, images, weights, arch.VAE_CONFIG, settings, device, scale_on=4000)


def pretrain_vae16(workdir: Path, out: Path, settings: StageSettings, n_per_part: int = 6000, device: str = "cpu") -> None:
    """v3's autoencoder, from scratch: a 4x16x16 latent (architecture.VAE16_CONFIG), trained on the
    whole world's pixels (the vae-world stage's renders: pre-training scenes, held-out patterns and
    concept markings, the retro style), with the vae stage's loss. A new latent space: the denoiser
    stages that follow train on it (unet-joint warm-starts from the model folder's UNet)."""
    images, weights = whole_world_pixels(workdir, n_per_part)
    _train_fresh_vae("vae16", workdir, out, images, weights, arch.VAE16_CONFIG, settings, device, scale_on=4500)


def _train_fresh_vae(stage: str, workdir: Path, out: Path, images: torch.Tensor, weights: torch.Tensor, config: dict,
                     settings: StageSettings, device: str, scale_on: int) -> None:
    """fit_fresh_vae, then the scaling factor from the first `scale_on` images' latents, and out/vae."""
    vae, _ = fit_fresh_vae(stage, workdir, images, weights, config, settings, device)
    with torch.no_grad():  # unit-variance latents, as Stable Diffusion's scaling factor gives
        z = torch.cat([vae.encode(images[i : i + 500]).latent_dist.mean for i in range(0, min(scale_on, len(images)), 500)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    _write_vae(vae, out)


def fit_fresh_vae(stage: str, workdir: Path, images: torch.Tensor, weights: torch.Tensor, config: dict,
                  settings: StageSettings, device: str = "cpu") -> tuple:
    """A new autoencoder of `config` trained on `images` (pixel weights `weights`): weighted L1 + MSE,
    image gradients, KL 1e-4 per element. Returns it (float32, eval, on the CPU) and run_stage's result."""
    torch.manual_seed(settings.seed)
    vae = arch.new_vae(config)
    with torch.no_grad():  # start with a small posterior std: unit noise on fresh latents drowns them
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    vae.to(device)

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        x, w = images[idx].to(device), weights[idx].to(device)
        posterior, l1, mse, edge = _vae_reconstruction(vae, x, w, g)
        kl = posterior.kl().mean() / x[0].numel()
        return l1 + mse + edge + 1e-4 * kl, {"l1": round(l1.item(), 5), "kl": round(kl.item(), 4)}

    result = run_stage(stage, workdir, vae, list(vae.parameters()), settings, loss_fn)
    return vae.eval().cpu(), result


def _write_vae(vae, out: Path) -> None:
    """out/vae in float16, replaced whole (a stop mid-write leaves the old folder)."""
    from ..files import replace_folder

    def write(folder: Path) -> None:
        vae.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("_name_or_path", None)  # a workdir's path, meaningless where the model ships
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    replace_folder(out / "vae", write)


def pretrain_clip(workdir: Path, out: Path, corpus: Path, settings: StageSettings, tokenizer_dir: Path,
                  device: str = "cpu") -> None:
    from .tokenizer import load_tokenizer

    images, captions = load_corpus(corpus)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenize(tokenizer, captions.reshape(-1)).reshape(len(images), CAPTIONS_PER_SCENE, 77)[:, :, :40]
    torch.manual_seed(settings.seed)
    clip = arch.new_clip().to(device)

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        which = torch.randint(0, CAPTIONS_PER_SCENE, (len(idx),), generator=g)
        out_ = clip(input_ids=ids[idx, which].to(device), pixel_values=images[idx].to(device), return_loss=True)
        acc = (out_.logits_per_image.argmax(1).cpu() == torch.arange(len(idx))).float().mean()
        return out_.loss, {"acc": round(acc.item(), 4), "scale": round(clip.logit_scale.exp().item(), 2)}

    run_stage("clip", workdir, clip, list(clip.parameters()), settings, loss_fn)
    clip = clip.cpu().to(torch.float16)
    clip.save_pretrained(out / "clip", safe_serialization=True)
    write_clip_processor(out / "clip")
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # transformers 5 flattened it
    save_text_encoder(text, out / "text_encoder")
    import shutil

    if Path(tokenizer_dir).resolve() != (out / "tokenizer").resolve():
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(tokenizer_dir, out / "clip", dirs_exist_ok=True)


class ClipWithAttributeHeads(torch.nn.Module):
    """The CLIP under training plus one linear read-out per attribute on its image embedding.

    The heads are a training aid only (the shipped CLIP is the plain CLIPModel): they make the image
    tower encode what the contrastive objective lets it skip, shape above all (a supervised probe of
    the same ViT learns shape; the contrastive loss alone left it at chance).

    With `binding`, both towers also get one read-out per place and attribute (`clip_reading.SLOTS`):
    the image embedding must say which object is where, and the complete caption's embedding the
    same, so two objects' words cannot trade places unnoticed on either side.
    """

    def __init__(self, clip, width: int, binding: bool = False):
        super().__init__()
        from . import clip_reading as R

        self.clip = clip
        with torch.random.fork_rng():  # the same heads in every process: a resumed run must match a straight one
            torch.manual_seed(0)
            self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(values)) for name, (values, _) in R.ZERO_SHOT.items()})
            if binding:
                places = len(R.vocab.POSITIONS)
                self.image_slots = torch.nn.ModuleDict({name: torch.nn.Linear(width, places * len(v)) for name, v in R.SLOTS.items()})
                self.text_slots = torch.nn.ModuleDict({name: torch.nn.Linear(width, places * len(v)) for name, v in R.SLOTS.items()})

    def slot_loss(self, image_raw: torch.Tensor, text_raw: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of both towers' per-place read-outs; truth: (B, places, attributes), -100
        where a place is empty. Logs each tower's accuracy over the objects."""
        from . import clip_reading as R

        loss, logs = 0.0, {}
        for side, raw, heads in (("image", image_raw, self.image_slots), ("text", text_raw, self.text_slots)):
            hits, count = 0.0, 0
            for j, (name, values) in enumerate(R.SLOTS.items()):
                logits = heads[name](raw).view(len(raw), truth.shape[1], len(values))
                target = truth[..., j]
                loss = loss + F.cross_entropy(logits.reshape(-1, len(values)), target.reshape(-1), ignore_index=-100)
                keep = target >= 0
                hits += (logits.argmax(-1)[keep] == target[keep]).float().sum().item()
                count += int(keep.sum())
            logs[f"{side}_slots"] = round(hits / max(count, 1), 3)
        return loss, logs


def pretrain_clip_image(workdir: Path, out: Path, corpus: Path, settings: StageSettings, device: str = "cpu") -> dict:
    """Teach a fresh mini CLIP's image tower the world's attributes from their labels, before any text.

    Under the contrastive loss, with or without hard negatives, the image tower never learned shape
    (zero-shot shape stayed near chance) while a plain supervised read-out of the same ViT does learn
    it: so the image tower first learns every attribute of single-object pictures (and the background
    of all) through linear heads on its projected embedding; `clip-negatives` then starts from this
    tower and a new text tower. Writes workdir/clip_image/tower (a CLIPModel folder).
    """
    from . import clip_reading as R
    from ..world.scene import Scene

    images, _ = load_corpus(corpus)
    truths = [R.zero_shot_truth(Scene.from_attributes(json.loads(s))) for s in np.load(corpus)["scenes"]]
    torch.manual_seed(settings.seed)
    clip = arch.new_clip()
    model = ClipWithAttributeHeads(clip, clip.config.projection_dim).to(device)
    names = list(R.ZERO_SHOT)
    labels = torch.tensor([[t.get(n, -100) for n in names] for t in truths])

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        raw = R.image_features(clip, images[idx].to(device), normalize=False)
        truth = labels[idx].to(device)
        logs, loss = {}, 0.0
        for j, name in enumerate(names):
            if (truth[:, j] >= 0).any():
                logits = model.heads[name](raw)
                loss = loss + F.cross_entropy(logits, truth[:, j], ignore_index=-100)
                keep = truth[:, j] >= 0
                logs[name] = round((logits[keep].argmax(1) == truth[keep, j]).float().mean().item(), 3)
        return loss, logs

    params = list(clip.vision_model.parameters()) + list(clip.visual_projection.parameters()) + list(model.heads.parameters())
    run_stage("clip_image", workdir, model, params, settings, loss_fn)
    from ..files import replace_folder

    clip.cpu()
    tower = replace_folder(workdir / "clip_image" / "tower", lambda tmp: clip.save_pretrained(tmp, safe_serialization=True))
    return {"tower": str(tower)}


def pretrain_clip_negatives(workdir: Path, out: Path, corpus: Path, settings: StageSettings, negatives: int = 3,
                            zero_shot_weight: float = 1.0, embedding_lr_scale: float = 1.0, attribute_weight: float = 0.0,
                            binding_weight: float = 0.0, mined: int = 0, stage: str = "clip_negatives",
                            device: str = "cpu") -> dict:
    """Train the mini CLIP until it reads every attribute a caption states: from the clip-image
    stage's tower (and a new text tower) when that stage has run, else fine-tuning out/clip.

    Contrastive learning over a batch never needed shape: color, background and place already tell
    the batch's captions apart. So each picture is also contrasted with `negatives` captions of the
    same phrasing that say one thing wrong (a swapped value, or two objects' attributes exchanged),
    and single-object pictures learn the zero-shot prompts ("a star", "a red object", ...) per attribute.
    `binding_weight` adds per-place read-outs on both towers (`ClipWithAttributeHeads`); `mined` adds
    that many negatives per picture, the captions among its one-thing-wrong ones (16 drawn)
    that the CLIP under training scores highest: the check asks the true caption to beat every one of
    some sixty, and three drawn at random rarely include the one it confuses. The `clip-binding`
    stage is this one continued from out/clip with them, in its own work folder `stage`.
    Writes out/clip only: the UNet's text encoder is trained with the UNet (stage unet-joint).
    """
    from transformers import CLIPModel

    from ..world.scene import Scene
    from . import clip_reading as R
    from .tokenizer import load_tokenizer

    images, _ = load_corpus(corpus)
    scenes = [Scene.from_attributes(json.loads(s)) for s in np.load(corpus)["scenes"]]
    init = workdir / stage / "init"
    if not init.exists():
        import shutil

        # clip-negatives: the clip-image tower, as fine-tuning out/clip never brought shape back;
        # a later stage (clip-binding) continues out/clip
        tower = workdir / "clip_image" / "tower" if stage == "clip_negatives" else out / "clip"
        shutil.copytree(tower if tower.exists() else out / "clip", init)
    tokenizer = load_tokenizer(out / "tokenizer")
    ids = R.TextEncoderCache(tokenizer)
    prompts = R.zero_shot_prompts()
    prompt_ids = ids(prompts).to(device)
    truths = [R.zero_shot_truth(s) for s in scenes]
    clip = CLIPModel.from_pretrained(init, torch_dtype=torch.float32, use_safetensors=True).to(device)
    model = ClipWithAttributeHeads(clip, clip.config.projection_dim, binding=bool(binding_weight)).to(device)

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g).tolist()
        rng = np.random.default_rng([settings.seed, step])
        texts, seeds, drawn = [], [], []
        for i in idx:
            seeds.append(int(rng.integers(2**31)))
            extra = mined if len(scenes[i].objects) == 1 else 0  # two objects': mined below
            positive, wrong = R.caption_with_negatives(scenes[i], seeds[-1], negatives + extra, rng)
            texts.append(positive)
            drawn.append(wrong)
        b = len(idx)
        raw = R.image_features(clip, images[idx].to(device), normalize=False)
        img = F.normalize(raw, dim=-1)
        if mined:
            negs = _mine_negatives(clip, ids, img.detach(), [scenes[i] for i in idx], seeds, drawn, mined, rng, device)
        else:
            negs = [t for own in drawn for t in own]
        k = negatives + mined
        txt = R.text_features(clip, ids(texts + negs).to(device))
        scale = clip.logit_scale.exp()
        pos, neg = txt[:b], txt[b:].view(b, k, -1)
        batch_logits = scale * img @ pos.T
        hard_logits = scale * torch.einsum("bd,bkd->bk", img, neg)
        target = torch.arange(b, device=device)
        contrastive = (F.cross_entropy(torch.cat([batch_logits, hard_logits], 1), target)
                       + F.cross_entropy(batch_logits.T, target)) / 2
        zs_logits = scale * img @ R.text_features(clip, prompt_ids).T
        zero_shot, attributes, start = 0.0, 0.0, 0
        for name, (values, _) in R.ZERO_SHOT.items():
            truth = torch.tensor([truths[i].get(name, -100) for i in idx], device=device)
            if (truth >= 0).any():
                zero_shot = zero_shot + F.cross_entropy(zs_logits[:, start : start + len(values)], truth, ignore_index=-100)
                if attribute_weight:
                    attributes = attributes + F.cross_entropy(model.heads[name](raw), truth, ignore_index=-100)
            start += len(values)
        hard_acc = (hard_logits.max(1).values < batch_logits.diagonal()).float().mean()
        loss = contrastive + zero_shot_weight * zero_shot + attribute_weight * attributes
        logs = {"contrastive": round(contrastive.item(), 4), "zero_shot": round(float(zero_shot), 4),
                "attributes": round(float(attributes), 4), "hard_acc": round(hard_acc.item(), 3)}
        if mined:  # two-object pictures whose true caption beats its mined negatives
            two = torch.tensor([len(scenes[i].objects) > 1 for i in idx], device=device)
            if two.any():
                beaten = hard_logits[:, negatives:].max(1).values < batch_logits.diagonal()
                logs["mined_acc"] = round(beaten[two].float().mean().item(), 3)
        if binding_weight:  # read on the complete caption, which states every attribute the heads ask for
            complete = R.text_features(clip, ids([caption(scenes[i]) for i in idx]).to(device), normalize=False)
            truth = torch.from_numpy(np.stack([R.slot_truth(scenes[i]) for i in idx])).to(device)
            slots, slot_logs = model.slot_loss(raw, complete, truth)
            loss = loss + binding_weight * slots
            logs.update(binding=round(float(slots), 4), **slot_logs)
        return loss, logs

    # the first CLIP stage never trained the words it did not need (shape words kept their initial
    # norm, like unused words): their rows may take a larger step than the rest of the model
    embedding = clip.text_model.embeddings.token_embedding.weight
    groups = [{"params": [p for p in model.parameters() if p is not embedding]},
              {"params": [embedding], "lr": settings.lr * embedding_lr_scale}]
    run_stage(stage, workdir, model, groups, settings, loss_fn)
    clip = clip.cpu().eval()
    result = R.check(clip, tokenizer, n=min(500, len(images)), seed=settings.seed + 1)  # a tiny corpus is a smoke run
    clip.to(torch.float16).save_pretrained(out / "clip", safe_serialization=True)
    write_clip_processor(out / "clip")
    import shutil

    shutil.copytree(out / "tokenizer", out / "clip", dirs_exist_ok=True)
    (out / "clip" / "selftest.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _mine_negatives(clip, ids, img: torch.Tensor, scenes: list, seeds: list[int], drawn: list[list[str]],
                    mined: int, rng: np.random.Generator, device: str, pool_size: int = 16) -> list[str]:
    """Each picture's drawn negatives, then for two-object pictures the `mined` captions of a draw of
    up to `pool_size` of its one-thing-wrong captions that the CLIP scores highest against it (single
    objects, which it nearly never gets wrong, drew `mined` more instead)."""
    from . import clip_reading as R

    pools = {b: R.some_negatives(scene, seed, pool_size, rng, skip=set(drawn[b])) or list(drawn[b])
             for b, (scene, seed) in enumerate(zip(scenes, seeds)) if len(scene.objects) > 1}
    flat = [t for pool in pools.values() for t in pool]
    if flat:
        with torch.no_grad():
            scores = torch.cat([R.text_features(clip, ids.uncached(flat[j : j + 512]).to(device))
                                for j in range(0, len(flat), 512)])
    out, start = [], 0
    for b, own in enumerate(drawn):
        out.extend(own)
        if b in pools:
            pool = pools[b]
            order = (scores[start : start + len(pool)] @ img[b]).argsort(descending=True).tolist()
            start += len(pool)
            picked = [pool[j] for j in order[:mined]]
            out.extend(picked + [picked[-1]] * (mined - len(picked)))  # a terse caption has few: repeat the hardest
    return out


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
        self.path, self.decay = path, decay
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # state_dict() tensors share the parameters' storage, so these lists stay live; one foreach
        # update instead of two kernel launches per tensor (it matters on a GPU)
        live = model.state_dict()
        floating = [k for k in self.weights if live[k].dtype.is_floating_point]
        self._averaged, self._current = [self.weights[k] for k in floating], [live[k] for k in floating]
        self._other = [(self.weights[k], live[k]) for k in self.weights if not live[k].dtype.is_floating_point]

    def after_update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        with torch.no_grad():
            torch._foreach_mul_(self._averaged, decay)
            torch._foreach_add_(self._averaged, self._current, alpha=1 - decay)
            for averaged_other, current_other in self._other:
                averaged_other.copy_(current_other)

    def save(self) -> None:
        from ..checkpoint import atomic_save

        atomic_save(self.weights, self.path)

    def load(self) -> None:
        from safetensors.torch import load_file

        for k, v in load_file(str(self.path)).items():
            self.weights[k].copy_(v)  # in place: on the model's device, and the lists above stay live


def _min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def save_text_encoder(text_encoder, folder: Path) -> None:
    """float16 weights (half the size) with a config that loads as float32, like the UNet and VAE:
    transformers would otherwise load the tower in float16 beside a float32 UNet, and a plain
    StableDiffusionPipeline.from_pretrained(path) fails on its first call."""
    text_encoder.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _encoded_corpus(workdir: Path, out: Path, corpus: Path, device: str = "cpu") -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Latents of the corpus under the frozen VAE (cached; stale if the corpus or the VAE changes),
    the captions, and the object masks at latent resolution."""
    import hashlib

    from diffusers import AutoencoderKL

    data = np.load(corpus)
    captions = data["captions"]
    vae_hash = hashlib.sha1((out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]
    latents_path = workdir / f"unet_latents_{corpus.stem}_vae{vae_hash}.safetensors"
    if latents_path.exists():
        from safetensors.torch import load_file

        latents = load_file(str(latents_path))["latents"]
    else:
        images, _ = load_corpus(corpus)
        vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32, use_safetensors=True).eval().to(device)
        with torch.no_grad():
            latents = torch.cat([vae.encode(images[i : i + 500].to(device)).latent_dist.mean.cpu() for i in
                                 tqdm(range(0, len(images), 500), desc="encode latents")]) * vae.config.scaling_factor
        from ..checkpoint import atomic_save

        atomic_save({"latents": latents}, latents_path)
    factor = arch.IMAGE_SIZE // latents.shape[-1]
    object_cells = F.max_pool2d(torch.from_numpy(data["masks"])[:, None].float(), factor)  # any object pixel
    return latents, captions, object_cells


DENOISER_PHASES = {
    # stage -> (starts from the model folder's unet/ and text_encoder/, trains the text encoder,
    #           extra loss weight of the latent cells an object touches)
    "unet": (False, False, 0.0),
    "unet_joint": (True, True, 4.0),
}


def pretrain_denoiser(workdir: Path, out: Path, corpus: Path, settings: StageSettings, stage: str = "unet",
                      text_lr_scale: float = 0.5, caption_dropout: float = 0.1, ema_decay: float = 0.999,
                      device: str = "cpu") -> None:
    """The UNet, in two phases.

    `unet`: a fresh UNet under the clip stage's frozen text tower; epsilon loss, min-SNR-5 weights.
    `unet_joint`: from the model folder's unet/ and text_encoder/, both trained together. Why: the
    contrastive text tower never needed shape (color, background and place already tell a batch's
    captions apart), so it gave the UNet no shape to bind to; the denoising loss makes every word the
    UNet needs count. The latent cells an object touches weigh 5x in its loss: objects cover a few
    percent of the picture, and a uniform loss spends the model on background textures.
    The EMA of the weights (decay 0.999) is what ships.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tokenizer import load_tokenizer

    warm_start, train_text, object_weight = DENOISER_PHASES[stage]
    latents, captions, object_cells = _encoded_corpus(workdir, out, corpus, device)
    init = workdir / stage / "init"  # the stage's inputs, kept: its export overwrites out/
    if not init.exists():
        import shutil

        for part in ("unet", "text_encoder") if warm_start else ("text_encoder",):
            shutil.copytree(out / part, init / part)
    if warm_start:
        _grow_to_grid(init / "unet", latents.shape[-1])
    tokenizer = load_tokenizer(out / "tokenizer")
    ids = tokenize(tokenizer, captions.reshape(-1)).reshape(len(latents), CAPTIONS_PER_SCENE, 77)
    empty_ids = tokenize(tokenizer, [""])[0]
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32, use_safetensors=True) if warm_start else arch.new_unet(latents.shape[-1])
    text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder", torch_dtype=torch.float32, use_safetensors=True)
    text_encoder.requires_grad_(train_text).train(train_text)
    trained = torch.nn.ModuleDict({"unet": unet, **({"text_encoder": text_encoder} if train_text else {})})
    unet.to(device), text_encoder.to(device)
    scheduler = arch.new_scheduler()
    ema = EMA(trained, workdir / stage / "ema.safetensors", ema_decay)
    groups = [{"params": list(unet.parameters())}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": settings.lr * text_lr_scale})

    def loss_fn(step, g):
        idx = _batch(len(latents), settings.batch_size, g)
        which = torch.randint(0, CAPTIONS_PER_SCENE, (len(idx),), generator=g)
        tokens = ids[idx, which]
        drop = torch.rand(len(idx), generator=g) < caption_dropout
        tokens[drop] = empty_ids
        x0, weights = latents[idx], 1 + object_weight * object_cells[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(tokens.to(device)).last_hidden_state
        pred = unet(xt.to(device), t.to(device), cond).sample
        weights = weights.to(device)
        per_sample = ((pred - noise.to(device)).pow(2) * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weights(scheduler, t).to(device)).mean()
        return loss, {"mse": round(per_sample.mean().item(), 5)}

    run_stage(stage, workdir, trained, groups, settings, loss_fn, hooks=ema)
    export_denoiser(workdir, out, stage)


def _grow_to_grid(folder: Path, grid: int) -> None:
    """Give v2's 8x8 denoiser in `folder` v3's 16x16 latent (architecture.grow_unet), in place; a
    kill at any point leaves either the old or the grown folder, which the next run takes up."""
    import shutil

    from diffusers import UNet2DConditionModel

    grown = folder.with_name(folder.name + ".grown")
    if not folder.exists() and grown.exists():  # killed between the two renames below
        grown.rename(folder)
    if json.loads((folder / "config.json").read_text())["sample_size"] == grid:
        return
    small = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
    shutil.rmtree(grown, ignore_errors=True)
    arch.grow_unet(small).save_pretrained(grown, safe_serialization=True)
    shutil.rmtree(folder)
    grown.rename(folder)


def export_denoiser(workdir: Path, out: Path, stage: str) -> None:
    """Write unet/ (and text_encoder/ where the stage trains it) from the stage's EMA weights; also
    mid-run, from the latest checkpoint."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    ema_path = workdir / stage / "ema.safetensors"
    if not ema_path.exists():
        raise FileNotFoundError(f"{ema_path}: the {stage} stage has no checkpoint yet")
    weights, init = load_file(str(ema_path)), workdir / stage / "init"
    warm_start, train_text, _ = DENOISER_PHASES[stage]

    def part(prefix):
        return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}

    grid = arch.latent_size(json.loads((out / "vae" / "config.json").read_text()))
    # the warm start's architecture from its config alone: its weights would be overwritten, and
    # from_pretrained would record the work folder (_name_or_path) in the shipped config
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(init / "unet")) if warm_start else arch.new_unet(grid)
    unet.load_state_dict(part("unet"))
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    if train_text:
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder", torch_dtype=torch.float32, use_safetensors=True)
        text_encoder.load_state_dict(part("text_encoder"))
        save_text_encoder(text_encoder, out / "text_encoder")
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


# The oracle's corpus cycles through these parts of the world. Markings are the hardest reading (a
# small rim and a small dot are a few mixed pixels apart), so a third of the renders carry only marked
# objects; with FULL_WORLD's one in six unmarked, 61% of training objects are marked (42% with the
# earlier half-and-half mix, where small rims and dots stayed below 70% on color and marking).
ORACLE_MIX = ("pretraining", "full", "marked")
# `oracle-marks` continues the oracle with a quarter of its renders carrying only dots and rims, where
# what it still misses is (small dots and rims: two thirds of its color and marking errors on the whole world)
ORACLE_MARKS_MIX = ("pretraining", "full", "marked", "dot-rim")


def _world_part(name: str):
    from dataclasses import replace

    from ..world import FULL_WORLD, vocab

    return {"pretraining": PRETRAINING_WORLD, "full": FULL_WORLD,
            "marked": replace(FULL_WORLD, markings=vocab.MARKINGS[1:]),
            "dot-rim": replace(FULL_WORLD, markings=("dot", "rim"))}[name]


def _render_labelled_chunk(args):
    from .oracle import labels

    seed, n, mix = args
    samplers = [_world_part(name) for name in mix]
    rng = np.random.default_rng(seed)
    images, targets, scenes = np.zeros((n, 32, 32, 3), np.uint8), [], []
    for i in range(n):
        scene = samplers[i % len(samplers)].sample(rng)
        images[i] = render(scene)[0]
        targets.append(labels(scene))
        scenes.append(scene)
    stacked = {k: np.stack([t[k] for t in targets]) for k in targets[0]}
    return images, stacked, scenes


def labelled_renders(n: int, seed: int, workers: int = 1, mix: tuple[str, ...] = ORACLE_MIX):
    """Fresh renders from the whole world (held-out parts included) with the oracle's targets."""
    chunk = 1000
    jobs = [(seed * 7_000_003 + i, min(chunk, n - i * chunk), tuple(mix)) for i in range(math.ceil(n / chunk))]
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as pool:  # chunks are seeded by index: any worker count gives the same renders
            parts = list(tqdm(pool.imap(_render_labelled_chunk, jobs), total=len(jobs), desc="render labelled"))
    else:
        parts = [_render_labelled_chunk(j) for j in tqdm(jobs, desc="render labelled")]
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


def whole_world_pixels(workdir: Path, n_per_part: int, seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of the pre-training world, the whole world and marked objects only (n_per_part each,
    interleaved, every third one a pre-training scene) with their object weights, cached in workdir."""
    from ..checkpoint import atomic_save

    cache = workdir / f"vae_world_pixels_n{n_per_part}_seed{seed}.safetensors"
    if cache.exists():
        from safetensors.torch import load_file

        data = load_file(str(cache))
        return data["images"], data["weights"]
    images, masks = [], []
    parts = [(_world_part(name), np.random.default_rng(seed + i)) for i, name in enumerate(VAE_WORLD_MIX)]
    for _ in tqdm(range(n_per_part), desc="render whole-world pixels"):
        for sampler, rng in parts:
            image, object_masks = render(sampler.sample(rng))
            images.append(image)
            masks.append(np.any(object_masks, axis=0) if len(object_masks) else np.zeros(image.shape[:2], bool))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    m = torch.from_numpy(np.stack(masks))[:, None].float()
    weights = 1 + 4 * F.max_pool2d(m, 3, stride=1, padding=1)
    # contiguous in memory as when loaded from the cache: a convolution's kernels round differently on
    # a permuted layout, and a resumed run must match an uninterrupted one
    x, weights = x.contiguous(), weights.contiguous()
    atomic_save({"images": x, "weights": weights}, cache)
    return x, weights


VAE_WORLD_MIX = ("pretraining", "full", "marked")  # the pre-training part first: its latents are the anchor
VAE_WORLD_TRAIN_ENCODER = False  # decoder only: measured as good as the anchored encoder, and the latents cannot move


def pretrain_vae_world(workdir: Path, out: Path, settings: StageSettings, n_per_part: int = 6000,
                       train_encoder: bool = VAE_WORLD_TRAIN_ENCODER, anchor_weight: float = 10.0,
                       device: str = "cpu") -> dict:
    """Continue the VAE on the whole world's pixels: concept markings, held-out patterns, the retro style.

    The first VAE saw the pre-training world only and draws a concept's dot, band or rim as a plain
    body (measured: the oracle finds the concept in its round trip of the development references far
    less often than in the renders), so no method could learn what the decoder cannot draw. The UNet
    was trained on the first VAE's latents, so those must not move: with `train_encoder` the
    encoder's mean latents of pre-training scenes are pulled to the first VAE's (anchor_weight, in
    units of their variance), otherwise only the decoder trains. The scaling factor is kept."""
    import copy

    from diffusers import AutoencoderKL

    start = workdir / "vae_world" / "start_vae"
    if not (start / "config.json").exists():  # the VAE this stage starts from (and anchors to), kept for resumes
        AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).save_pretrained(start, safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(start, torch_dtype=torch.float32).to(device)
    first = copy.deepcopy(vae).eval().requires_grad_(False)
    if not train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    images, weights = whole_world_pixels(workdir, n_per_part)
    n_parts, per = len(VAE_WORLD_MIX), max(1, settings.batch_size // len(VAE_WORLD_MIX))

    def loss_fn(step, g):
        # `per` scenes of each part: rows k*n_parts + j hold part j
        idx = torch.cat([_batch(n_per_part, per, g) * n_parts + j for j in range(n_parts)])
        x, w = images[idx].to(device), weights[idx].to(device)
        posterior, l1, mse, edge = _vae_reconstruction(vae, x, w, g)
        loss, logs = l1 + mse + edge, {"l1": round(l1.item(), 5)}
        if train_encoder:
            with torch.no_grad():
                anchor_to = first.encode(x[:per]).latent_dist.mean
            anchor = (posterior.mean[:per] - anchor_to).pow(2).mean() / anchor_to.var()
            kl = posterior.kl().mean() / x[0].numel()
            loss = loss + anchor_weight * anchor + 1e-4 * kl
            logs["anchor"] = round(anchor.item(), 6)
        return loss, logs

    result = run_stage("vae_world", workdir, vae, params, settings, loss_fn)
    vae.eval().cpu()
    with torch.no_grad():
        probe = images[: 3 * 300 : 3]  # pre-training scenes
        a, b = first.cpu().encode(probe).latent_dist.mean, vae.encode(probe).latent_dist.mean
        result["pretraining_latent_shift"] = float((a - b).pow(2).mean() / a.var())
    _write_vae(vae, out)
    return result


def pretrain_oracle(workdir: Path, out: Path, settings: StageSettings, n_train: int = 60000, device: str = "cpu",
                    workers: int | None = None, full_res_convs: int = 2, stage: str = "oracle") -> dict:
    """Train the oracle; returns its self-test (score.selftest: the pre-training and the whole world).

    `oracle_marks`: continue out/oracle on ORACLE_MARKS_MIX (fresh renders, another seed), in its own
    work folder; its input copy stays in workdir/oracle_marks/init."""
    from .oracle import Oracle, loss
    from .score import selftest

    mix, seed = (ORACLE_MIX, settings.seed + 1) if stage == "oracle" else (ORACLE_MARKS_MIX, settings.seed + 2)
    cache = workdir / f"oracle_corpus_{'-'.join(mix)}_n{n_train}.safetensors"
    if cache.exists():
        from safetensors.torch import load_file

        data = load_file(str(cache))
        images, targets = data.pop("images"), data
    else:
        images, targets, _ = labelled_renders(n_train, seed=seed, workers=workers or os.cpu_count() or 1, mix=mix)
        from ..checkpoint import atomic_save

        atomic_save({"images": images, **targets}, cache)
    torch.manual_seed(settings.seed)
    if stage == "oracle":
        oracle = Oracle(full_res_convs=full_res_convs).to(device)
    else:
        init = workdir / stage / "init"
        if not init.exists():
            import shutil

            shutil.copytree(out / "oracle", init)  # the stage overwrites out/oracle when it ends
        oracle = Oracle.load(init).train().to(device)

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)  # batches and degradation drawn on the CPU: same on any device
        _, logits = oracle(degrade(images[idx], g).to(device))
        return loss(logits, {k: v[idx].to(device) for k, v in targets.items()})

    run_stage(stage, workdir, oracle, list(oracle.parameters()), settings, loss_fn)
    oracle = oracle.cpu().eval()
    acc = selftest(oracle, n=min(2000, n_train))
    oracle.save(out / "oracle")
    (out / "oracle" / "selftest.json").write_text(json.dumps(acc, indent=2))
    return acc
