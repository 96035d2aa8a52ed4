"""Scoring pristine-mini with its oracle: does a generated picture show what its prompt asked for?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sample import generate
from ..world.captions import caption
from ..world.scene import Scene, SceneSampler

# Fresh prompts state every attribute they score; patterns and styles stay out of the bar.
PROMPT_WORLD = SceneSampler(patterns=("solid",), pattern_probs=None, styles=("plain",), style_probs=None)
BAR = {"single.shape": 0.90, "single.color": 0.95, "single.background": 0.95, "single.size": 0.90,
       "single.position": 0.90, "two.all_right": 0.60}


@dataclass
class ScorePrompt:
    scene: Scene
    text: str
    seed: int


def fresh_prompts(n: int, seed: int, n_objects: int) -> list[ScorePrompt]:
    rng = np.random.default_rng([seed, n_objects])
    out = []
    for i in range(n):
        scene = PROMPT_WORLD.sample(rng, n_objects=n_objects)
        out.append(ScorePrompt(scene, caption(scene), seed * 100_003 + n_objects * 10_007 + i))
    return out


def _object_match(read: dict | None, obj) -> dict[str, bool]:
    if read is None:
        return {k: False for k in ("shape", "color", "size", "position")}
    return {k: read[k] == getattr(obj, k) for k in ("shape", "color", "size", "position")}


def judge(oracle, prompts: list[ScorePrompt], images: list[np.ndarray]) -> list[dict]:
    """Per prompt: which asked-for attributes the oracle finds in the picture."""
    readings = []
    for i in range(0, len(images), 256):
        readings.extend(oracle.read(images[i : i + 256]))
    results = []
    for p, r in zip(prompts, readings):
        found = {o["position"]: o for o in r["objects"]}
        res = {"background": r["background"] == p.scene.background, "n_objects": len(r["objects"]) == len(p.scene.objects)}
        if len(p.scene.objects) == 1:
            obj = p.scene.objects[0]
            top = r["objects"][0] if r["objects"] else None  # the most confident object
            res.update(_object_match(top, obj))
        else:
            per_obj = [_object_match(found.get(o.position), o) for o in p.scene.objects]
            for k in ("shape", "color", "size", "position"):
                res[k] = float(np.mean([m[k] for m in per_obj]))
            res["all_right"] = all(all(m.values()) for m in per_obj)
        results.append(res)
    return results


def summarize(results: list[dict], prefix: str) -> dict[str, float]:
    keys = results[0].keys() if results else []
    return {f"{prefix}.{k}": float(np.mean([r[k] for r in results])) for k in keys}


def score(pipe, oracle, n: int = 200, seed: int = 0, steps: int = 50, guidance: float = 5.0) -> dict:
    """n single-object and n two-object fresh prompts; the oracle's per-attribute accuracy."""
    summary: dict[str, float] = {"n_prompts": 2 * n, "seed": seed, "steps": steps, "guidance": guidance}
    for n_objects, prefix in ((1, "single"), (2, "two")):
        prompts = fresh_prompts(n, seed, n_objects)
        images = generate(pipe, [p.text for p in prompts], [p.seed for p in prompts], steps, guidance,
                          desc=f"generate {prefix}-object")
        summary.update(summarize(judge(oracle, prompts, images), prefix))
    summary["meets_bar"] = all(summary[k] >= v for k, v in BAR.items())
    return summary


def selftest(oracle, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """The oracle's own accuracy on fresh renders: the pre-training world (what `score` judges)
    and the whole world (held-out patterns, concept markings and the retro style included)."""
    from ..world import FULL_WORLD, PRETRAINING_WORLD, render
    from .oracle import accuracy, to_tensor

    result = {}
    for part, sampler in (("base", PRETRAINING_WORLD), ("full", FULL_WORLD)):
        rng = np.random.default_rng([seed, len(part)])
        scenes = [sampler.sample(rng) for _ in range(n)]
        images = to_tensor([render(s)[0] for s in scenes])
        result.update({f"{part}.{k}": v for k, v in accuracy(oracle, images, scenes).items()})
    return result
