"""How much a pristine-mini denoiser listens to each word of a caption.

96 fresh single-object renders are encoded, noised at t = 300, 500 and 700 with one fixed noise, and
denoised with their true caption and with the shape, color or place word swapped. The loss over the
latent cells the object touches is printed per (t, caption): a word the denoiser ignores changes
nothing when swapped. docs/MINI.md records the figures.

    .venv/bin/python tools/word_sensitivity.py MODEL_FOLDER
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from pristine.mini import architecture as arch
from pristine.mini.tokenizer import load_tokenizer
from pristine.world import PRETRAINING_WORLD, render, vocab
from pristine.world.captions import caption

SWAPPABLE = {"shape": vocab.SHAPES, "color": vocab.COLOR_NAMES, "position": vocab.POSITIONS}


def swapped(scene, attribute: str, rng: np.random.Generator):
    obj = scene.objects[0]
    others = [v for v in SWAPPABLE[attribute] if v != getattr(obj, attribute)]
    return dataclasses.replace(scene, objects=[dataclasses.replace(obj, **{attribute: others[rng.integers(len(others))]})])


def main(model: Path, n: int = 96) -> dict:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32).eval()
    scheduler = arch.new_scheduler()
    rng = np.random.default_rng(5)
    scenes = [PRETRAINING_WORLD.sample(rng, n_objects=1) for _ in range(n)]
    renders = [render(s) for s in scenes]
    pixels = torch.from_numpy(np.stack([r[0] for r in renders])).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(np.stack([r[1][0] for r in renders]))[:, None].float()
    cells = F.max_pool2d(masks, arch.IMAGE_SIZE // arch.LATENT_SIZE)
    noise = torch.randn((n, 4, arch.LATENT_SIZE, arch.LATENT_SIZE), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        for t in (300, 500, 700):
            steps = torch.full((n,), t)
            x_t = scheduler.add_noise(x0, noise, steps)
            for kind in ("true", *SWAPPABLE):
                swap_rng = np.random.default_rng(1)
                shown = scenes if kind == "true" else [swapped(s, kind, swap_rng) for s in scenes]
                captions = [caption(s, np.random.default_rng(i)) for i, s in enumerate(shown)]
                ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                err = ((unet(x_t, steps, text(ids)[0]).sample - noise) ** 2).mean(1, keepdim=True)
                out[f"t{t}.{kind}"] = round(float((err * cells).sum() / cells.sum()), 4)
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
