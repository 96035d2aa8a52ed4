"""MiniBench's attribute task (SPF, METHODS.md 2): a pattern word pre-training never saw (`zigzag`,
`gradient`), learnt from a captioned set, judged exactly by the oracle.

Rows: LoRA on the same data, SPF, SPF without each loss term, SPF incremental (the first word, then the
second on top of it). Per (row, word), fixed prompts and seeds on the original and the tuned model:
- attribute response: the prompt asks for the word; does the oracle read that pattern on the object
  at the place the prompt names? (The original model's rate is the floor.)
- preservation, stated: every other attribute the prompt states (shape, color, size, place,
  background, style, a second object) is what the oracle reads; the row reports the error rate;
- preservation, against the original: shape, color, place and background of the tuned model's
  picture are those of the original model's picture for the same seed and the base caption (the
  prompt without the word); error rate;
- pollution (a): prompts without the word (the concept task's unrelated prompts), original vs
  tuned, same seeds: oracle disagreement and pixel distance;
- retention (incremental row): the first word's response after the second is learnt, and its ratio
  to the first word's response right after it was learnt (the spf row's).
Every number carries a 95% bootstrap interval over (word, prompt, seed) units, resampling words.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..world.captions import caption
from ..world.concepts import ATTRIBUTE_WORDS
from ..world.scene import Scene, WorldObject, positions_compatible
from .minibench import (UNRELATED, _load_cached, _object_summary, _save_cached, claim_folder, interval_summary, model_id,
                        train_unless_finished)

# One budget per row, the same steps, rank, learning rate and LoRA layers for all; SPF's stages split
# the steps. The attribute words need no new token, so the concept task's `lora` method (which adds
# one) does not apply: the LoRA row is ordinary fine-tuning, SPF's stage 1 alone. The budget was set
# on v3 from probes of the LoRA row only (docs/BENCHMARKS.md): on the attention projections alone no
# budget taught zigzag, because pristine-mini's UNet never drew that texture; LoRA on the resnet convs
# too, 1,000 steps at rank 8, is the smallest probed that teaches both words at all.
_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
_LORA = {"rank": 8, "alpha": 8, "targets": _TARGETS}
_SPF = {**_LORA, "stage1_steps": 500}
_STEPS = dict(steps=1000, batch_size=4, lr=1e-3)
ATTRIBUTE_BUDGETS = {
    "lora": dict(_STEPS, method_args={**_LORA, "stage": "1"}),
    "spf": dict(_STEPS, method_args=dict(_SPF)),
    "spf_no_text": dict(_STEPS, method_args={**_SPF, "text_weight": 0}),
    "spf_no_query": dict(_STEPS, method_args={**_SPF, "query_weight": 0}),
    "spf_no_enhance": dict(_STEPS, method_args={**_SPF, "enhance_weight": 0}),
    "spf_no_denoise": dict(_STEPS, method_args={**_SPF, "denoise_weight": 0}),
    # the first word as the spf row trains it, then the second on top (its run's init_run)
    "spf_incremental": dict(_STEPS, method_args=dict(_SPF)),
}
INCREMENTAL = "spf_incremental"

# (shape, color, size, position, background, style, second object (shape, color, size, position) or None)
ATTRIBUTE_CONTEXTS = [
    ("star", "red", "big", "left", "grass", "plain", None),
    ("circle", "blue", "big", "right", "night", "plain", None),
    ("heart", "yellow", "big", "center", "sand", "plain", None),
    ("square", "green", "big", "top", "white", "cartoon", None),
    ("hexagon", "pink", "big", "left", "water", "plain", ("triangle", "orange", "small", "right")),
    ("diamond", "purple", "big", "bottom", "wood", "plain", ("cross", "cyan", "small", "top")),
]


@dataclass
class AttributeBenchSettings:
    rows: list[str] = field(default_factory=lambda: list(ATTRIBUTE_BUDGETS))
    words: list[str] = field(default_factory=lambda: list(ATTRIBUTE_WORDS))
    seeds: int = 4
    sample_steps: int = 30
    guidance: float = 5.0
    images: int = 300  # captioned training pictures per word
    train_steps: int | None = None  # overrides the budgets' steps per stage (quick runs)
    contexts: int = len(ATTRIBUTE_CONTEXTS)


def attribute_scenes(word: str, contexts: int = len(ATTRIBUTE_CONTEXTS)) -> list[Scene]:
    """One scene per context with the word's pattern on its first object."""
    scenes = []
    for i, (shape, color, size, position, background, style, second) in enumerate(ATTRIBUTE_CONTEXTS[:contexts]):
        objects = [WorldObject(shape, color, size, position, pattern=word)]
        if second is not None:
            other = WorldObject(*second)
            assert positions_compatible(objects[0], other)
            objects.append(other)
        scenes.append(Scene(tuple(objects), background, style, i))
    return scenes


def prompts_for_word(word: str, contexts: int = len(ATTRIBUTE_CONTEXTS)) -> tuple[list[Scene], list[str], list[str]]:
    """(scenes, prompts naming the word, base prompts: the same without it)."""
    scenes = attribute_scenes(word, contexts)
    prompts = [caption(s) for s in scenes]
    bases = [caption(replace(s, objects=(replace(s.objects[0], pattern="solid"), *s.objects[1:]))) for s in scenes]
    return scenes, prompts, bases


def budget(row: str, steps_per_stage: int | None = None) -> dict:
    """TrainConfig settings of a row (the registered method is spf for every row)."""
    settings = {**ATTRIBUTE_BUDGETS[row], "method_args": dict(ATTRIBUTE_BUDGETS[row]["method_args"])}
    if steps_per_stage:
        two_stage = settings["method_args"].get("stage") != "1"
        settings["steps"] = 2 * steps_per_stage if two_stage else steps_per_stage
        if two_stage:
            settings["method_args"]["stage1_steps"] = steps_per_stage
    return settings


# ---- scoring ---------------------------------------------------------------------------------


def _found(reading: dict) -> dict:
    return {o["position"]: o for o in reading["objects"]}


def score_attribute(oracle, word: str, scenes, seeds, images, base_images) -> list[dict]:
    """Response and preservation per (prompt, seed); images in prompt-major order."""
    readings, base_readings = oracle.read(images), oracle.read(base_images)
    n = len(seeds)
    records = []
    for k, (r, br) in enumerate(zip(readings, base_readings)):
        scene = scenes[k // n]
        main = scene.objects[0]
        found = _found(r)
        hit = found.get(main.position)
        stated = {"background": r["background"] == scene.background, "style": r["style"] == scene.style,
                  "place": hit is not None,
                  **{a: hit is not None and hit[a] == getattr(main, a) for a in ("shape", "color", "size")}}
        if len(scene.objects) > 1:
            other = scene.objects[1]
            o = found.get(other.position)
            stated["second_object"] = o is not None and o["shape"] == other.shape and o["color"] == other.color
        records.append({"kind": "attribute", "word": word, "prompt": k // n, "seed": seeds[k % n],
                        "response": float(hit is not None and hit["pattern"] == word),
                        "preservation_stated_error": float(not all(stated.values())),
                        **{f"stated_{a}": float(v) for a, v in stated.items()},
                        "preservation_original_error": float(_object_summary(r) != _object_summary(br))})
    return records


def score_unrelated(oracle, word: str, seeds, original, tuned) -> list[dict]:
    ra, rb = oracle.read(original), oracle.read(tuned)
    n = len(seeds)
    return [{"kind": "unrelated", "word": word, "prompt": k // n, "seed": seeds[k % n],
             "pollution_disagreement": float(_object_summary(ra[k]) != _object_summary(rb[k])),
             "pollution_distance": float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255)}
            for k, (a, b) in enumerate(zip(original, tuned))]


ATTRIBUTE_METRICS = [  # (key, record kind, label)
    ("response", "attribute", "attribute response"),
    ("preservation_stated_error", "attribute", "preservation error: stated attributes"),
    ("preservation_original_error", "attribute", "preservation error: vs original picture"),
    ("pollution_disagreement", "unrelated", "pollution (a): oracle disagreement"),
    ("pollution_distance", "unrelated", "pollution (a): pixel distance"),
    ("retention", "retention", "first word's response after the second"),
]


def summarize_attribute(records: list[dict]) -> dict:
    return interval_summary(records, ATTRIBUTE_METRICS, "word")


# ---- the run -----------------------------------------------------------------------------------


def _fingerprint(settings: AttributeBenchSettings) -> str:
    return json.dumps({"seeds": settings.seeds, "sample_steps": settings.sample_steps, "guidance": settings.guidance,
                       "train_steps": settings.train_steps, "images": settings.images, "contexts": settings.contexts,
                       "model": model_id()}, sort_keys=True)


def run_attribute_bench(out: Path, settings: AttributeBenchSettings) -> Path:
    """Train, draw and score every (row, word); finished runs and drawn pictures are kept on disk, so a
    stopped run resumes and a later one with more rows does only the new ones. Writes results.json
    and report.md in `out`."""
    from .. import mini
    from ..data import ConceptSpec
    from ..sample import generate, load_pipeline
    from ..train import TrainConfig
    from ..world.export import write_renders

    claim_folder(out)
    oracle = mini.load_oracle()
    seeds = list(range(settings.seeds))
    fingerprint = _fingerprint(settings)
    first_word = settings.words[0]

    def draw(pipe, prompts, desc):
        all_prompts = [p for p in prompts for _ in seeds]
        return generate(pipe, all_prompts, seeds * len(prompts), steps=settings.sample_steps,
                        guidance=settings.guidance, desc=desc, batch=len(all_prompts))

    def cached(name: str, make, run: Path | None = None):
        path = out / "samples" / f"{name}.npz"
        found = _load_cached(path, fingerprint, run)
        if found is None:
            found = make()
            _save_cached(path, fingerprint, found)
        return found

    def data(word: str) -> Path:
        folder = out / "data" / f"{word}_{settings.images}"
        if not (folder / "metadata.jsonl").is_file():
            write_renders(folder, n=settings.images, part=f"attribute:{word}")
        return folder

    def run_for(row: str, word: str) -> Path:
        """The run folder of a row on a word, trained when missing (an incremental row's first word is
        the spf row's run)."""
        if row == INCREMENTAL and word == first_word:
            row = "spf"
        run = out / "runs" / row / word
        settings_ = budget(row, settings.train_steps)
        if row == INCREMENTAL:
            settings_["method_args"]["init_run"] = str(run_for("spf", first_word))
        train_unless_finished(TrainConfig(out=str(run), model="mini", method="spf", seed=0, resume="latest",
                                          concepts=[ConceptSpec(str(data(word)), word, "pattern")], **settings_))
        return run

    base = load_pipeline("mini")
    original = {}
    for word in settings.words:
        _, prompts, bases = prompts_for_word(word, settings.contexts)
        original[word] = cached(f"original/{word}", lambda: {"attribute": draw(base, prompts, "original"),
                                                            "base": draw(base, bases, "original"),
                                                            "unrelated": draw(base, UNRELATED, "original")})
    def tuned(row: str, word: str) -> dict:
        run = run_for(row, word)

        def make():
            pipe = load_pipeline("mini", str(run))
            drawn = {"attribute": draw(pipe, prompts_for_word(word, settings.contexts)[1], row),
                     "unrelated": draw(pipe, UNRELATED, row)}
            if row == INCREMENTAL:  # the first word, asked of the model that learnt the second after it
                drawn["first"] = draw(pipe, prompts_for_word(first_word, settings.contexts)[1], row)
            return drawn

        return cached(f"{row}/{word}", make, run)

    records: list[dict] = []
    for row in settings.rows:
        if row not in ATTRIBUTE_BUDGETS:
            raise KeyError(f"unknown row {row!r}; rows: {', '.join(ATTRIBUTE_BUDGETS)}")
        for word in (settings.words[1:] if row == INCREMENTAL else settings.words):
            scenes = prompts_for_word(word, settings.contexts)[0]
            drawn = tuned(row, word)
            found = score_attribute(oracle, word, scenes, seeds, drawn["attribute"], original[word]["base"])
            found += score_unrelated(oracle, word, seeds, original[word]["unrelated"], drawn["unrelated"])
            if row == INCREMENTAL:
                first_scenes = prompts_for_word(first_word, settings.contexts)[0]
                kept = score_attribute(oracle, first_word, first_scenes, seeds, drawn["first"], original[first_word]["base"])
                found += [{"kind": "retention", "word": first_word, "prompt": r["prompt"], "seed": r["seed"],
                           "retention": r["response"]} for r in kept]
            records += [{"row": row, **r} for r in found]
    floor = [r for word in settings.words
             for r in score_attribute(oracle, word, prompts_for_word(word, settings.contexts)[0], seeds,
                                      original[word]["attribute"], original[word]["base"])]
    summary = {row: summarize_attribute([r for r in records if r["row"] == row]) for row in settings.rows}
    summary["original"] = summarize_attribute(floor)
    if INCREMENTAL in settings.rows and len(settings.words) > 1:
        # the share of the first word's response (right after it was learnt) left after the second
        first_scenes = prompts_for_word(first_word, settings.contexts)[0]
        learnt = score_attribute(oracle, first_word, first_scenes, seeds, tuned("spf", first_word)["attribute"],
                                 original[first_word]["base"])
        learnt_rate = float(np.mean([r["response"] for r in learnt]))
        summary[INCREMENTAL]["first_word_response_before"] = learnt_rate
        if "retention" in summary[INCREMENTAL]:
            summary[INCREMENTAL]["retention_ratio"] = summary[INCREMENTAL]["retention"]["mean"] / max(1e-9, learnt_rate)
    results = {"settings": {**settings.__dict__, "budgets": {r: ATTRIBUTE_BUDGETS[r] for r in settings.rows}},
               "summary": summary, "records": records}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    report = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text(attribute_table(summary))
    os.replace(tmp, report)
    return report


def attribute_table(summary: dict) -> str:
    """A markdown table: one row per bench row, mean [95% interval] per metric."""
    keys = [k for k, _, _ in ATTRIBUTE_METRICS]
    labels = {k: label for k, _, label in ATTRIBUTE_METRICS}
    lines = ["| row | " + " | ".join(labels[k] for k in keys) + " | retention ratio |",
             "| --- |" + " --- |" * (len(keys) + 1)]
    for row, metrics in summary.items():
        cells = [f"{metrics[k]['mean']:.3f} [{metrics[k]['lo']:.3f}, {metrics[k]['hi']:.3f}]" if k in metrics else ""
                 for k in keys]
        ratio = f"{metrics['retention_ratio']:.2f}" if "retention_ratio" in metrics else ""
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"
