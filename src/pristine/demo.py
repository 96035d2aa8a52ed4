"""`pristine demo`: teach pristine-mini one held-out concept with LoRA and with PureCC, then show and score both.

Same seeds before and after, for concept prompts and for unrelated prompts, judged by the oracle:
fidelity (is it the concept?), prompt adherence (background and place as asked) and how much
prompts without the concept changed. Writes one HTML page with the grids and the scores.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

DEMO_CONCEPT = "ember_star"
TOKEN = "<v1>"
CONCEPT_CONTEXTS = [("left", "grass"), ("right", "night"), ("top", "sand"), ("center", "water")]
UNRELATED_PROMPTS = [
    "a big red star on the left, on grass",
    "a small blue circle at the top, at night",
    "a big yellow heart in the center, in the sky",
    "a big green triangle on the left and a big orange diamond on the right, on a white background",
]
# kept for the model card's sample grid
DEMO_PROMPTS = UNRELATED_PROMPTS + [
    "a big purple striped square on the right, on sand",
    "a small pink hexagon at the bottom, on a brick wall",
    "a cartoon of a big cyan cross in the center, on wood",
    "a big orange dotted circle at the top and a small blue star at the bottom, on water",
]
DEMO_METHODS = ("lora", "purecc")  # trained with their MiniBench budgets


def run_demo(out: Path, seed: int = 0, seeds_per_prompt: int = 4, train_steps: int | None = None,
             sample_steps: int = 50) -> Path:
    from PIL import Image

    from . import mini
    from .data import ConceptSpec
    from .eval.grids import make_grid
    from .eval.minibench import budget_settings
    from .eval.oracle_metrics import change, concept_hits, context_adherence
    from .sample import generate, load_pipeline
    from .train import TrainConfig, train
    from .world.export import write_concept_folder
    from .world.concepts import get_concept

    out.mkdir(parents=True, exist_ok=True)
    concept = get_concept(DEMO_CONCEPT)
    images_dir = write_concept_folder(concept, TOKEN, out / "concept_images")

    oracle = mini.load_oracle()
    rng = np.random.default_rng(seed)
    scenes = [concept.scene(rng, position=p, background=b) for p, b in CONCEPT_CONTEXTS]
    concept_prompts = [concept.prompt(TOKEN, s) for s in scenes]
    class_prompts = [p.replace(f"{TOKEN} ", "") for p in concept_prompts]  # the class word alone
    seeds = [seed * 1000 + k for k in range(seeds_per_prompt)]

    def generate_(pipe, prompts_and_seeds, desc):
        return generate(pipe, *prompts_and_seeds, steps=sample_steps, desc=desc)

    def many(prompts):
        return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]

    base = load_pipeline("mini")
    before_concept = generate_(base, many(class_prompts), "before")
    before_unrelated = generate_(base, many(UNRELATED_PROMPTS), "before")
    rows = []
    for method in DEMO_METHODS:
        _, settings = budget_settings(method, train_steps)
        run = out / f"run_{method}"
        if not (run / "DONE").exists():
            config = TrainConfig(out=str(run), model="mini", method=method, seed=seed,
                                 concepts=[ConceptSpec(str(images_dir), TOKEN, concept.class_word)],
                                 resume="latest", checkpoint_every=100, **settings)
            train(config)
        tuned = load_pipeline("mini", str(run))
        after_concept = generate_(tuned, many(concept_prompts), f"after {method}")
        after_unrelated = generate_(tuned, many(UNRELATED_PROMPTS), f"after {method}")
        scores = {
            "fidelity": float(concept_hits(oracle, after_concept, concept).mean()),
            "fidelity_before": float(concept_hits(oracle, before_concept, concept).mean()),
            **{f"adherence_{k}": v for k, v in context_adherence(oracle, after_concept, [s for s in scenes for _ in seeds]).items()},
            **{f"unrelated_{k}": v for k, v in change(oracle, before_unrelated, after_unrelated).items()},
        }
        n = seeds_per_prompt
        for name, prompts, before, after in (("concept", concept_prompts, before_concept, after_concept),
                                             ("unrelated", UNRELATED_PROMPTS, before_unrelated, after_unrelated)):
            grid = make_grid([before[i * n:(i + 1) * n] + after[i * n:(i + 1) * n] for i in range(len(prompts))], prompts)
            grid.save(out / f"{method}_{name}.png")
        rows.append((method, settings, scores))
    strip = np.concatenate([np.asarray(Image.open(p)) for p in sorted(images_dir.glob("*.png"))], axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(out / "references.png")
    page = _page(concept, rows, seeds, sample_steps)
    (out / "index.tmp.html").write_text(page)
    os.replace(out / "index.tmp.html", out / "index.html")
    (out / "scores.json").write_text(json.dumps({m: s for m, _, s in rows}, indent=2))
    return out / "index.html"


def _page(concept, rows, seeds, sample_steps) -> str:
    head = ("<tr><th>method</th><th>fidelity (before)</th><th>background as asked</th><th>place as asked</th>"
            "<th>unrelated prompts: pixel change</th><th>unrelated prompts: oracle agreement</th></tr>")
    body = "".join(
        f"<tr><td>{m}</td><td>{s['fidelity']:.0%} ({s['fidelity_before']:.0%})</td><td>{s['adherence_background']:.0%}</td>"
        f"<td>{s['adherence_position']:.0%}</td><td>{s['unrelated_pixel_distance']:.3f}</td>"
        f"<td>{s['unrelated_oracle_agreement']:.0%}</td></tr>" for m, _, s in rows)
    grids = "".join(
        f"<h2>{m}</h2><p>{html.escape(json.dumps(st))}</p>"
        f"<h3>concept prompts: left 4 before (class word only), right 4 after</h3><img src='{m}_concept.png'>"
        f"<h3>unrelated prompts: left 4 before, right 4 after</h3><img src='{m}_unrelated.png'>" for m, st, _ in rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pristine demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>pristine demo: teaching pristine-mini <code>{TOKEN} {concept.class_word}</code></h1>
<p>The concept <b>{concept.name}</b>, held out of pre-training: five references.</p><img src="references.png">
<p>Seeds {seeds[0]}..{seeds[-1]}, DDIM {sample_steps} steps, guidance 5. LoRA and PureCC (stage 1: token and extractor
LoRA; stage 2: a fresh LoRA that learns the concept while keeping the base model's answer for the rest of the prompt)
train with the same steps per stage, rank and learning rate. Scores by the Shapes-world oracle:
fidelity = share of concept pictures in which the oracle reads the concept: a {concept.color} {concept.class_word}
with a {concept.accent} {concept.marking} (before: the base model drawing the class prompt); adherence = background and place found as the prompt asks;
unrelated prompts = the same prompts and seeds before and after training: mean absolute pixel change (0..1) and the share
of pictures the oracle reads the same.</p>
<table>{head}{body}</table>{grids}</body></html>"""
