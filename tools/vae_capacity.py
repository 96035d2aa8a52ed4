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

import pristine.mini as mini
from pristine.eval.oracle_metrics import concept_hits
from pristine.mini import architecture as arch
from pristine.mini.pretrain import StageSettings, _world_part, fit_fresh_vae, whole_world_pixels
from pristine.world.concepts import DEV_CONCEPTS
from pristine.world.render import render
from vae_io import round_trip, to_tensor, to_uint8

VARIANTS = {
    "base": arch.VAE_CONFIG,
    "ch8": {**arch.VAE_CONFIG, "latent_channels": 8},
    "ch16": {**arch.VAE_CONFIG, "latent_channels": 16},
    "wide": {**arch.VAE_CONFIG, "block_out_channels": (64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32},
    "f2": arch.VAE16_CONFIG,
}


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
    settings = StageSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    vae, trained = fit_fresh_vae("vae", work, images, weights, VARIANTS[args.variant], settings)
    t0 = time.time()
    oracle = mini.load_oracle()
    result = {"variant": args.variant, "steps": trained["step"], "train_wall_s": trained["wall"],
              "params": sum(p.numel() for p in vae.parameters()),
              "latent": list(vae.encode(images[:1]).latent_dist.mean.shape[1:])}
    for i, part in enumerate(("pretraining", "full", "marked")):
        rng = np.random.default_rng(999 + i)
        sampler = _world_part(part)
        x = to_tensor([render(sampler.sample(rng))[0] for _ in range(300)])
        result[f"l1_{part}"] = round((round_trip(vae, x) - x).abs().mean().item() / 2, 4)  # 0-1 scale
    hits = {}
    for concept in DEV_CONCEPTS:
        x = to_tensor([render(s)[0] for s in concept.references(12)])
        hits[concept.name] = round(float(concept_hits(oracle, to_uint8(round_trip(vae, x)), concept).mean()), 2)
    result["fidelity_per_concept"] = hits
    result["fidelity_dev"] = round(float(np.mean(list(hits.values()))), 3)
    result["eval_wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    (work / "result.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
