"""MiniBench's context task (ICO + DCI, METHODS.md 5): one concept, prompts that change its context.

Rows: LoRA and Custom Diffusion, each plain, with ICO (training), with DCI (sampling) and with both.
A row with ICO trains its own run (the method's MiniBench budget plus `ico`); a row with DCI samples the
same run as the row without it, so DCI's effect is the sampler's alone. Every row samples through the
engine (ordinary CFG with the run's own ∅, guidance 5; DCI with agg_time 0.3, λ 0 unless asked), the
same seeds for all, and is scored by the oracle:
- fidelity: is it the concept (the oracle reads its shape, body color, marking and accent on one object);
- adherence per attribute the prompt asks for besides the concept: background, place, size, the cartoon
  style, a second object; and their mean;
- CLIP-T: mini-CLIP image-text cosine, the token replaced by the class word;
- time per picture: the sampling's wall time over its pictures.
Every number carries a 95% bootstrap interval over (concept, prompt, seed) units, resampling concepts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sampling import SampleSettings
from .minibench import (TOKEN, Judges, _load_cached, _save_cached, budget_settings, claim_folder, context_right,
                        interval_summary, prompts_for, train_unless_finished)

# row: (the method's MiniBench budget, ICO in training, DCI in sampling)
CONTEXT_ROWS = {
    "lora": ("lora", False, False),
    "lora_ico": ("lora", True, False),
    "lora_dci": ("lora", False, True),
    "lora_ico_dci": ("lora", True, True),
    "custom_diffusion": ("custom_diffusion", False, False),
    "custom_diffusion_ico": ("custom_diffusion", True, False),
    "custom_diffusion_dci": ("custom_diffusion", False, True),
    "custom_diffusion_ico_dci": ("custom_diffusion", True, True),
}
ATTRIBUTES = ("background", "position", "size", "style", "second_object")
METRICS = [("fidelity (oracle)", "fidelity"), ("adherence (oracle)", "adherence"),
           *[(f"adherence: {a.replace('_', ' ')}", f"adherence_{a}") for a in ATTRIBUTES], ("CLIP-T", "clip_t")]


@dataclass
class ContextBenchSettings:
    rows: list[str]
    concepts: list  # of world Concepts
    seeds: int = 4
    sample_steps: int = 30
    guidance: float = 5.0
    agg_time: float = SampleSettings.agg_time  # DCI's defaults are the sampler's
    dci_lambda: float = SampleSettings.dci_lambda
    dci_scale: float = SampleSettings.dci_scale
    train_steps: int | None = None  # overrides the budgets' steps (quick runs)
    part: tuple[int, int] | None = None  # (i, n): train and draw only every n-th concept from the i-th, no table


def context_fingerprint(settings: ContextBenchSettings) -> str:
    """What a row's cached pictures depend on besides its run and the concept."""
    return json.dumps({"seeds": settings.seeds, "steps": settings.sample_steps, "guidance": settings.guidance,
                       "agg_time": settings.agg_time, "dci_lambda": settings.dci_lambda,
                       "train_steps": settings.train_steps,
                       # only when not the default: pictures cached before the setting existed stay valid
                       **({"dci_scale": settings.dci_scale} if settings.dci_scale != ContextBenchSettings.dci_scale else {})}, sort_keys=True)


def row_training(row: str, train_steps: int | None) -> tuple[str, str, dict]:
    """(run folder name, method, TrainConfig settings) of a row: rows differing only by DCI share a run."""
    budget, ico, _ = CONTEXT_ROWS[row]
    method, settings = budget_settings(budget, train_steps)
    if ico:
        settings["ico"] = True
    return budget + ("_ico" if ico else ""), method, settings


def _draw(run: Path, prompts: list[str], settings: ContextBenchSettings, dci: bool) -> tuple[list[np.ndarray], float]:
    """Pictures (prompt-major, seed-minor) and seconds per picture."""
    from ..sampling import Guide, Models, SampleSettings, sample

    sampling = SampleSettings(guides=[Guide(prompt="{prompt}", weight=settings.guidance, adapter=str(run))],
                              prompts=prompts, n=settings.seeds, seed=0, steps=settings.sample_steps,
                              unconditional=str(run), sampler="dci" if dci else "", agg_time=settings.agg_time,
                              dci_lambda=settings.dci_lambda, dci_scale=settings.dci_scale)
    sampling.validate("bench context")
    models = Models("mini")
    models.run(str(run))  # loaded before the clock starts: time per picture is sampling alone
    t0 = time.perf_counter()
    rows = sample(sampling, models, desc="dci" if dci else "plain")
    seconds = time.perf_counter() - t0
    images = [im for row in rows for im in row]
    return images, seconds / len(images)


def score(judges: Judges, concept, scenes, prompts: list[str], seeds: list[int], images: list[np.ndarray]) -> list[dict]:
    from .oracle_metrics import concept_hits

    hits = concept_hits(judges.oracle, images, concept)
    texts = [p.replace(TOKEN, concept.class_word) for p in prompts for _ in seeds]
    clip_t = (judges.clip_images(images) * judges.clip_texts(texts)).sum(-1).numpy()
    records = []
    for k, reading in enumerate(judges.oracle.read(images)):
        asked = context_right(reading, scenes[k // len(seeds)])
        records.append({"prompt": prompts[k // len(seeds)], "seed": seeds[k % len(seeds)], "fidelity": float(hits[k]),
                        "adherence": float(np.mean(list(asked.values()))), "clip_t": float(clip_t[k]),
                        **{f"adherence_{a}": v for a, v in asked.items()}})
    return records


def summarize(records: list[dict], seconds: list[float]) -> dict:
    out = interval_summary(records, [(key, None, label) for label, key in METRICS], "concept")
    if seconds:
        out["seconds_per_picture"] = {"label": "time per picture (s)", "mean": float(np.mean(seconds)), "n": len(seconds)}
    return out


def table(results: dict) -> str:
    rows = results["settings"]["rows"]
    keys = [k for _, k in METRICS] + ["seconds_per_picture"]
    labels = {k: l for l, k in METRICS} | {"seconds_per_picture": "time per picture (s)"}
    lines = ["| row | " + " | ".join(labels[k] for k in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for row in rows:
        summary = results["summary"][row]
        cells = []
        for k in keys:
            m = summary.get(k)
            if m is None:
                cells.append("-")
            elif "lo" in m:
                cells.append(f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]")
            else:
                cells.append(f"{m['mean']:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_context_bench(out: Path, settings: ContextBenchSettings) -> Path:
    """Train each needed run once, draw every row's pictures, score; finished runs and pictures are kept,
    so a stopped benchmark continues where it was."""
    from ..data import ConceptSpec
    from ..files import atomic_write_text
    from ..train import TrainConfig
    from ..world.export import write_concept_folder
    from .parts import my_slice

    claim_folder(out)
    judges = Judges()
    seeds = list(range(settings.seeds))
    fingerprint = context_fingerprint(settings)
    records, seconds = {r: [] for r in settings.rows}, {r: [] for r in settings.rows}
    for concept in my_slice(settings.concepts, settings.part):
        scenes, prompts, _ = prompts_for(concept)
        images_dir = write_concept_folder(concept, TOKEN, out / "data" / concept.name)
        for row in settings.rows:
            run_name, method, budget = row_training(row, settings.train_steps)
            run = out / "runs" / run_name / concept.name
            train_unless_finished(TrainConfig(out=str(run), model="mini", method=method, seed=0, resume="latest",
                                              concepts=[ConceptSpec(str(images_dir), TOKEN, concept.class_word)],
                                              **budget))
            cached = out / "samples" / row / f"{concept.name}.npz"
            found = _load_cached(cached, fingerprint, run)
            if found is None:
                images, per_picture = _draw(run, prompts, settings, CONTEXT_ROWS[row][2])
                found = {"images": images, "seconds_per_picture": [np.float64(per_picture)]}
                _save_cached(cached, fingerprint, found)
            seconds[row].append(float(found["seconds_per_picture"][0]))
            for r in score(judges, concept, scenes, prompts, seeds, list(found["images"])):
                records[row].append({"concept": concept.name, **r})
    if settings.part is not None:  # the parent process scores the whole
        return out
    results = {"settings": {"rows": settings.rows, "concepts": [c.name for c in settings.concepts], "seeds": seeds,
                            "sample_steps": settings.sample_steps, "guidance": settings.guidance,
                            "agg_time": settings.agg_time, "dci_lambda": settings.dci_lambda,
                            "dci_scale": settings.dci_scale, "train_steps": settings.train_steps},
               "summary": {r: summarize(records[r], seconds[r]) for r in settings.rows},
               "records": {r: records[r] for r in settings.rows}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "table.md", table(results))
    return out / "table.md"

