"""MiniBench's domain task: the held-out rendering style `retro`, learned from its uncaptioned set.

Rows: LoRA and DreamBooth trained on the set with a trigger (every caption "<v1> style", sampled with
"<control prompt>, <v1> style" under ordinary CFG), and the concept-centric model sampled with GCFG:
the frozen original for ∅, the concept model (weight s_c) and the original with the control prompt
(weight s_ctrl). Columns, all read by the oracle on fixed control prompts and seeds:
- domain fidelity: the oracle's style head reads "retro";
- prompt adherence: every attribute the control prompt asks for (each object's shape, color and size
  at its place, the background), beside the original model's adherence on the same prompts without
  the domain (ratio = method / original);
- unconditional drift: the method's pictures for the empty prompt with the domain left out (the
  baselines: their run without the trigger; GCFG: s_c = 0, so the frozen original by construction)
  against the original's, same seeds: pixel distance and oracle layout disagreement;
- time per picture (sampling only).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DOMAIN = "retro"
TRIGGER = "<v1>"
TRIGGER_CAPTION = f"{TRIGGER} style"
# Budgets, fixed before any measurement and kept since (BENCHMARKS.md has the figures): the trigger
# baselines as MiniBench's concept budgets, the concept model a full fine-tune with EMA.
BUDGETS = {
    "lora_trigger": dict(method="lora", steps=300, batch_size=4, lr=1e-3, method_args={"rank": 4, "alpha": 4}),
    "dreambooth_trigger": dict(method="dreambooth", steps=300, batch_size=4, lr=5e-5),
    "concept_centric": dict(method="concept_centric", steps=300, batch_size=4, lr=5e-5, ema_decay=0.999),
}


@dataclass
class DomainSettings:
    methods: list = field(default_factory=lambda: list(BUDGETS))
    images: int = 200  # uncaptioned training pictures of the domain
    prompts: int = 12  # control prompts
    seeds: int = 4
    sample_steps: int = 30
    guidance: float = 5.0  # ordinary CFG of the original and the trigger baselines
    s_c: float = 2.5
    s_ctrl: float = 2.5
    train_steps: int | None = None  # overrides the budgets' steps (quick runs)


def control_scenes(n: int, seed: int = 0):
    """Plain-style scenes of the pre-training world, the control prompts' ground truth."""
    from ..world.scene import SceneSampler

    rng = np.random.default_rng(seed + 7919)
    sampler = SceneSampler(styles=("plain",), style_probs=None, pattern_probs=None, patterns=("solid",))
    return [sampler.sample(rng) for _ in range(n)]


def adherence(reading: dict, scene) -> dict[str, float]:
    """Per attribute the control prompt asks for: did the oracle find it?"""
    found = {o["position"]: o for o in reading["objects"]}
    out = {"background": float(reading["background"] == scene.background)}
    for k, obj in enumerate(scene.objects):
        hit = found.get(obj.position)
        for name in ("shape", "color", "size"):
            out[f"object{k}_{name}"] = float(hit is not None and hit[name] == getattr(obj, name))
    return out


def _layout(reading: dict) -> tuple:
    return (reading["background"], tuple(sorted((o["position"], o["shape"], o["color"]) for o in reading["objects"])))


def write_training_sets(root: Path, n: int) -> tuple[Path, Path]:
    """The domain's uncaptioned set, and the same pictures captioned with the trigger for the baselines."""
    from ..world.export import write_renders

    plain, trigger = root / DOMAIN, root / f"{DOMAIN}_trigger"
    if not (plain / "metadata.jsonl").is_file() or len(list(plain.glob("[0-9]*[0-9].png"))) != n:
        shutil.rmtree(plain, ignore_errors=True)
        write_renders(plain, n=n, seed=0, part=f"domain:{DOMAIN}")
    trigger.mkdir(parents=True, exist_ok=True)
    for png in sorted(plain.glob("*.png")):
        if "_mask" not in png.stem and not (trigger / png.name).is_file():
            shutil.copy(png, trigger / png.name)
            (trigger / f"{png.stem}.txt").write_text(TRIGGER_CAPTION)
    return plain, trigger


def _guides(method: str, run: Path, prompt: str, settings: DomainSettings, domain_on: bool = True) -> list:
    from ..sampling import Guide

    if method == "original":
        return [Guide(prompt=prompt, weight=settings.guidance)]
    if BUDGETS[method]["method"] == "concept_centric":
        return [Guide(adapter=str(run), prompt="", weight=settings.s_c if domain_on else 0.0),
                Guide(prompt=prompt, weight=settings.s_ctrl)]
    text = f"{prompt}, {TRIGGER_CAPTION}" if domain_on and prompt else prompt
    return [Guide(adapter=str(run), prompt=text, weight=settings.guidance)]


def _unconditional(method: str, run: Path | None) -> str:
    """The trigger baselines sample as their pipelines do (their own ∅); GCFG takes ∅ from the frozen original."""
    return str(run) if method != "original" and BUDGETS[method]["method"] != "concept_centric" else ""


def run_domain_bench(out: Path, settings: DomainSettings) -> Path:
    """Train (resumable: finished runs are kept), draw and score every method; results.json and a table."""
    from .. import mini
    from ..data import ConceptSpec
    from ..sampling import Models, SampleSettings, sample
    from ..train import TrainConfig
    from ..world.captions import caption
    from .minibench import claim_folder, train_unless_finished

    claim_folder(out)
    plain, trigger = write_training_sets(out / "data", settings.images)
    scenes = control_scenes(settings.prompts)
    prompts = [caption(s) for s in scenes]
    oracle = mini.load_oracle()
    models = Models("mini")

    def draw(method: str, run: Path | None, domain_on: bool = True, for_prompts=None):
        images, t0 = [], time.perf_counter()
        for p in for_prompts if for_prompts is not None else prompts:
            rows = sample(SampleSettings(guides=_guides(method, run, p, settings, domain_on), prompts=[p],
                                         n=settings.seeds, steps=settings.sample_steps,
                                         unconditional=_unconditional(method, run)), models, desc=method)
            images.extend(rows[0])
        return images, (time.perf_counter() - t0) / max(1, len(images))

    original, original_s = draw("original", None)
    original_empty, _ = draw("original", None, for_prompts=[""])
    base_readings = oracle.read(original)
    base_adherence = [np.mean(list(adherence(r, scenes[i // settings.seeds]).values())) for i, r in enumerate(base_readings)]
    results = {"settings": {**settings.__dict__, "budgets": {m: BUDGETS[m] for m in settings.methods}},
               "prompts": prompts, "original": {"adherence": float(np.mean(base_adherence)),
                                                "style_retro": float(np.mean([r["style"] == DOMAIN for r in base_readings])),
                                                "seconds_per_picture": original_s}, "methods": {}}
    for method in settings.methods:
        budget = dict(BUDGETS[method])
        name = budget.pop("method")
        if settings.train_steps:
            budget["steps"] = settings.train_steps
        run = out / "runs" / method
        concept = ConceptSpec(str(plain)) if name == "concept_centric" else ConceptSpec(str(trigger), TRIGGER, "style")
        t0 = time.perf_counter()
        if train_unless_finished(TrainConfig(out=str(run), model="mini", method=name, seed=0, resume="latest",
                                             concepts=[concept], checkpoint_every=max(1, budget["steps"] // 3),
                                             **budget)):
            (run / "train_seconds.json").write_text(json.dumps({"train_s": round(time.perf_counter() - t0, 1)}))
        images, per_picture = draw(method, run)
        readings = oracle.read(images)
        scores = [np.mean(list(adherence(r, scenes[i // settings.seeds]).values())) for i, r in enumerate(readings)]
        empty, _ = draw(method, run, domain_on=False, for_prompts=[""])
        ra, rb = oracle.read(original_empty), oracle.read(empty)
        results["methods"][method] = {
            "domain_fidelity": float(np.mean([r["style"] == DOMAIN for r in readings])),
            "adherence": float(np.mean(scores)),
            "adherence_vs_original": float(np.mean(scores) / max(1e-9, np.mean(base_adherence))),
            "drift_pixels": float(np.mean([np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255
                                           for a, b in zip(original_empty, empty)])),
            "drift_layout": float(np.mean([_layout(a) != _layout(b) for a, b in zip(ra, rb)])),
            "seconds_per_picture": per_picture,
        }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    return out / "results.json"


def table(results: dict) -> str:
    """The results as a markdown table."""
    lines = ["| method | domain fidelity | adherence | vs original | drift (pixels) | drift (layout) | s / picture |",
             "|---|---|---|---|---|---|---|"]
    o = results["original"]
    lines.append(f"| original (no domain) | {o['style_retro']:.2f} | {o['adherence']:.3f} | 1.00 | 0 | 0 | "
                 f"{o['seconds_per_picture']:.3f} |")
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r['domain_fidelity']:.2f} | {r['adherence']:.3f} | {r['adherence_vs_original']:.2f} | "
                     f"{r['drift_pixels']:.4f} | {r['drift_layout']:.2f} | {r['seconds_per_picture']:.3f} |")
    return "\n".join(lines)
