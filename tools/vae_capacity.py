"""Which autoencoder keeps a concept's marking? Train one VAE variant from scratch on the whole
world's pixels (pre-training scenes, held-out patterns and concept markings, the retro style; the
`vae-world` stage's cached renders) with the `vae` stage's loss, then measure its round trip (encode,
decode, no denoiser): how often the shipped oracle finds each development concept in the round trip
of its 12 references, and the mean absolute error per part of the world. Resumable (run_stage).
Prints JSON.

    .venv/bin/python tools/vae_capacity.py VARIANT WORKDIR [--steps 3000] [--batch-size 33] [--threads 1]

Variants: base (the shipped architecture, 4x8x8), ch8 (8x8x8: twice the channels, same grid, so
the UNet keeps its cost), ch16 (16x8x8), wide (4x8x8, blocks 64/128/128, two layers per block),
f2 (4x16x16: one downsampling fewer, four times the UNet's positions).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

import pristine.mini as mini
from pristine.eval.oracle_metrics import concept_hits
from pristine.mini import architecture as arch
from pristine.mini.pretrain import (StageSettings, _batch, _vae_reconstruction, _world_part, run_stage,
                                    whole_world_pixels)
from pristine.world.concepts import DEV_CONCEPTS
from pristine.world.render import render

VARIANTS = {
    "base": {},
    "ch8": {"latent_channels": 8},
    "ch16": {"latent_channels": 16},
    "wide": {"block_out_channels": (64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32},
    "f2": {"block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
           "up_block_types": ("UpDecoderBlock2D",) * 2},
}


def tensors(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def round_trip(vae, x):
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def uint8(x):
    return list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=33)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pixels", type=Path, default=Path("/work/scratch/vw/work"),
                    help="folder holding the vae-world stage's cached renders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir / args.variant
    work.mkdir(parents=True, exist_ok=True)
    images, weights = whole_world_pixels(args.pixels, 6000)
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**arch.VAE_CONFIG, **VARIANTS[args.variant]})
    with torch.no_grad():  # a small posterior std at the start, as the vae stage does
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    settings = StageSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr)

    def loss_fn(step, g):
        idx = _batch(len(images), settings.batch_size, g)
        x, w = images[idx], weights[idx]
        posterior, l1, mse, edge = _vae_reconstruction(vae, x, w, g)
        kl = posterior.kl().mean() / x[0].numel()
        return l1 + mse + edge + 1e-4 * kl, {"l1": round(l1.item(), 5)}

    trained = run_stage("vae", work, vae, list(vae.parameters()), settings, loss_fn)
    vae.eval()
    t0 = time.time()
    oracle = mini.load_oracle()
    result = {"variant": args.variant, "steps": trained["step"], "train_wall_s": trained["wall"],
              "params": sum(p.numel() for p in vae.parameters()),
              "latent": list(vae.encode(images[:1]).latent_dist.mean.shape[1:])}
    for i, part in enumerate(("pretraining", "full", "marked")):
        rng = np.random.default_rng(999 + i)
        sampler = _world_part(part)
        x = tensors([render(sampler.sample(rng))[0] for _ in range(300)])
        result[f"l1_{part}"] = round((round_trip(vae, x) - x).abs().mean().item() / 2, 4)  # 0-1 scale
    hits = {}
    for concept in DEV_CONCEPTS:
        x = tensors([render(s)[0] for s in concept.references(12)])
        hits[concept.name] = round(float(concept_hits(oracle, uint8(round_trip(vae, x)), concept).mean()), 2)
    result["fidelity_per_concept"] = hits
    result["fidelity_dev"] = round(float(np.mean(list(hits.values()))), 3)
    result["eval_wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    (work / "result.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
