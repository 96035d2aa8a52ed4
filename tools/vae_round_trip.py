"""Two VAEs' round trips (encode, decode; no denoiser): mean absolute error per part of the world,
how far the second moves pre-training latents, and how often the oracle finds each development
concept in the round trip of its references (12 each). Prints JSON, pairs are [first, second].

    .venv/bin/python tools/vae_round_trip.py FIRST_VAE_FOLDER SECOND_VAE_FOLDER
"""
import sys, json
import numpy as np, torch
from diffusers import AutoencoderKL
import pristine.mini as m
from pristine.mini.pretrain import _world_part
from pristine.world.render import render
from pristine.world.concepts import DEV_CONCEPTS
from pristine.eval.oracle_metrics import concept_hits
from vae_io import round_trip as rt, to_tensor as tens, to_uint8 as u8

old = AutoencoderKL.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
new = AutoencoderKL.from_pretrained(sys.argv[2], torch_dtype=torch.float32).eval()
oracle = m.load_oracle()
res = {}
for i, p in enumerate(("pretraining", "full", "marked")):
    rng = np.random.default_rng(999 + i); s = _world_part(p)
    x = tens([render(s.sample(rng))[0] for _ in range(300)])
    res[f"l1_{p}"] = [round((rt(old, x) - x).abs().mean().item() / 2, 4), round((rt(new, x) - x).abs().mean().item() / 2, 4)]  # on a 0-1 scale
    if p == "pretraining":
        with torch.no_grad():
            a, b = old.encode(x).latent_dist.mean, new.encode(x).latent_dist.mean
        if a.shape[2:] == b.shape[2:]:  # the first channels, when the second is wider; another grid is another latent space
            res["pretraining_latent_shift"] = float((a - b[:, : a.shape[1]]).pow(2).mean() / a.var())
    if p == "full":  # the retro style alone
        from dataclasses import replace
        retro = replace(s, styles=("retro",), style_probs=None) if hasattr(s, "styles") else None
        if retro is not None:
            xr = tens([render(retro.sample(rng))[0] for _ in range(100)])
            res["l1_retro"] = [round((rt(old, xr) - xr).abs().mean().item() / 2, 4), round((rt(new, xr) - xr).abs().mean().item() / 2, 4)]
ho, hn = [], []
for c in DEV_CONCEPTS:
    x = tens([render(s)[0] for s in c.references(12)])
    ho.append(concept_hits(oracle, u8(rt(old, x)), c).mean()); hn.append(concept_hits(oracle, u8(rt(new, x)), c).mean())
    res[f"fidelity_{c.name}"] = [round(float(ho[-1]), 2), round(float(hn[-1]), 2)]
renders_hits = np.mean([concept_hits(oracle, [render(s)[0] for s in c.references(12)], c).mean() for c in DEV_CONCEPTS])
res["fidelity_dev_renders"] = float(renders_hits)
res["fidelity_dev"] = [round(float(np.mean(ho)), 3), round(float(np.mean(hn)), 3)]
print(json.dumps(res, indent=1))
