"""Do two VAEs keep a 32-px pattern? Single big objects with each pattern word (48 renders a word,
shapes, colors and backgrounds in turn), encoded and decoded with no denoiser; how often the shipped
oracle reads the word in the renders, then in each VAE's round trip. Prints JSON: word ->
[renders, first, second].

    .venv/bin/python tools/vae_patterns.py FIRST_VAE_FOLDER SECOND_VAE_FOLDER
"""
import sys, json, itertools
import numpy as np, torch
from diffusers import AutoencoderKL
import pristine.mini as m
from pristine.world.scene import Scene, WorldObject
from pristine.world.render import render
oracle = m.load_oracle()
vaes = [AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32).eval() for p in sys.argv[1:3]]
rng = np.random.default_rng(7)
shapes = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")
colors = ("red", "blue", "green", "yellow", "purple", "orange")
bgs = ("white", "night", "grass", "sky", "sand", "water", "wood", "brick")
res = {}
for word in ("zigzag", "gradient", "striped", "dotted", "checkered"):
    scenes = [Scene((WorldObject(shapes[i % 8], colors[i % 6], "big", "center", pattern=word),), bgs[(i // 8) % 8], "plain", i) for i in range(48)]
    ims = [render(s)[0] for s in scenes]
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
    row = [float(np.mean([any(o["pattern"] == word for o in r["objects"]) for r in oracle.read(ims)]))]
    for v in vaes:
        with torch.no_grad():
            y = v.decode(v.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out = list(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        row.append(float(np.mean([any(o["pattern"] == word for o in r["objects"]) for r in oracle.read(out)])))
    res[word] = [round(r, 3) for r in row]
print(json.dumps(res))
