"""`pristine demo`: what pristine-mini draws, judged by its oracle, as one HTML page.

Until the trainer lands this shows the base model itself: prompts from every part of the world it
was pre-trained on, four seeds each, with the oracle's reading of every picture.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

DEMO_PROMPTS = [
    "a big red star on the left, on grass",
    "a small blue circle at the top, at night",
    "a big yellow heart in the center, in the sky",
    "a big purple striped square on the right, on sand",
    "a big green triangle on the left and a big orange diamond on the right, on a white background",
    "a small pink hexagon at the bottom, on a brick wall",
    "a cartoon of a big cyan cross in the center, on wood",
    "a big orange dotted circle at the top and a small blue star at the bottom, on water",
]


def run_demo(out: Path, seed: int = 0, seeds_per_prompt: int = 4) -> Path:
    from . import mini
    from .eval.grids import make_grid
    from .sample import generate

    out.mkdir(parents=True, exist_ok=True)
    pipe, oracle = mini.load_pipeline(), mini.load_oracle()
    prompts = [p for p in DEMO_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [seed * 1000 + i % seeds_per_prompt for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=50, guidance=5.0, batch=len(prompts), desc="demo samples")
    readings = oracle.read(images)
    rows = [images[i : i + seeds_per_prompt] for i in range(0, len(images), seeds_per_prompt)]
    make_grid(rows, DEMO_PROMPTS).save(out / "samples.tmp.png", format="PNG")
    os.replace(out / "samples.tmp.png", out / "samples.png")
    described = [_describe(r) for r in readings]
    items = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{'<br>'.join(html.escape(d) for d in described[i * seeds_per_prompt:(i + 1) * seeds_per_prompt])}</td></tr>"
        for i, p in enumerate(DEMO_PROMPTS)
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pristine demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td{{vertical-align:top;padding:4px 8px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>pristine-mini</h1>
<p>Samples from the embedded model (DDIM 50 steps, guidance 5, seeds {seeds[0]}..{seeds[seeds_per_prompt - 1]} for every prompt).
Each row: the prompt, then {seeds_per_prompt} seeds.</p>
<img src="samples.png" alt="samples" style="image-rendering:pixelated">
<h2>What the oracle reads in each picture</h2><table><tr><th>prompt</th><th>oracle reading, one line per seed</th></tr>{items}</table>
</body></html>"""
    (out / "index.tmp.html").write_text(page)
    os.replace(out / "index.tmp.html", out / "index.html")
    (out / "readings.json").write_text(json.dumps({"prompts": prompts, "seeds": seeds, "readings": readings}, indent=1))
    return out / "index.html"


def _describe(reading: dict) -> str:
    objs = [f"{o['size']} {o['color']} {o['pattern']} {o['shape']} {o['position']}" for o in reading["objects"]]
    return f"{' + '.join(objs) or 'no object'}; {reading['background']}; {reading['style']}"
