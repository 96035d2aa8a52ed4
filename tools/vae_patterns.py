"""Do two VAEs keep a 32-px pattern? Single big objects with each pattern word (48 renders a word,
shapes, colors and backgrounds in turn), encoded and decoded with no denoiser; how often the shipped
oracle reads the word in the renders, then in each VAE's round trip. Prints JSON: word ->
[renders, first, second].

    .venv/bin/python tools/vae_patterns.py FIRST_VAE_FOLDER SECOND_VAE_FOLDER
"""
import sys, json
import numpy as np, torch
from diffusers import AutoencoderKL
import pristine.mini as m
from pristine.world.scene import Scene, WorldObject
from pristine.world.render import render
from pristine.world.vocab import BACKGROUNDS, SHAPES
from vae_io import round_trip, to_tensor, to_uint8
oracle = m.load_oracle()
vaes = [AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32).eval() for p in sys.argv[1:3]]
colors = ("red", "blue", "green", "yellow", "purple", "orange")
def read_as(word, pictures): return float(np.mean([any(o["pattern"] == word for o in r["objects"]) for r in oracle.read(pictures)]))
res = {}
for word in ("zigzag", "gradient", "striped", "dotted", "checkered"):
    scenes = [Scene((WorldObject(SHAPES[i % 8], colors[i % 6], "big", "center", pattern=word),), BACKGROUNDS[(i // 8) % 8], "plain", i) for i in range(48)]
    ims = [render(s)[0] for s in scenes]
    x = to_tensor(ims)
    row = [read_as(word, ims)] + [read_as(word, to_uint8(round_trip(v, x))) for v in vaes]
    res[word] = [round(r, 3) for r in row]
print(json.dumps(res))
