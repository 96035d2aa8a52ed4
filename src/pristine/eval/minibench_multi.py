"""MiniBench, multi-concept task: two or three development concepts learned together and asked for in
one prompt, each at its own place; the oracle says, per asked concept, whether it came out right or
confused (issue 16, METHODS.md section 4).

Per picture and asked concept c at place p, from the oracle's reading of the object at p (its shape,
color, marking and accent; c's markings are (color, marking, accent), the other asked concepts' are
the prompt's others):
- right:   an object at p with c's markings and c's shape;
- swapped: an object at p with another asked concept's markings (whatever its shape);
- leaked:  an object at p that is neither, but mixes values of c with values of another asked
           concept (among shape, color, marking, accent, counting only the values where the two differ);
- missing: anything else: nothing at p, or an object that carries neither c, another asked concept,
           nor a mix of them (c's markings on a third shape are missing too: the concept was not drawn).
confusion = swapped + leaked + missing. Beside it, each concept alone in a prompt after the joint
training: the single-concept fidelity (MiniBench's exact test: the concept anywhere in the picture) and `right` at its place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


from ..world.captions import caption
from ..world.concepts import Concept, get_concept
from ..world.scene import Scene, positions_compatible

TOKENS = ("<v1>", "<v2>", "<v3>")
OUTCOMES = ("right", "swapped", "leaked", "missing")

# Groups of development concepts, fixed before any run: different shapes and colours, one pair of
# the same class (two stars), two triples. The final concepts are never used here.
GROUPS = (
    ("ember_star", "tide_circle"),
    ("sunset_heart", "mint_square"),
    ("harlequin_diamond", "lime_cross"),
    ("ember_star", "glacier_star"),
    ("tide_circle", "sunset_heart", "royal_hexagon"),
    ("berry_triangle", "plum_square", "meadow_heart"),
)
# Where the concepts of a group go, in turn (big objects for pairs; three small ones fit left, right, top)
LAYOUTS = {2: ((("left", "right"), "big"), (("right", "left"), "big")),
           3: ((("left", "right", "top"), "small"), (("top", "left", "right"), "small"))}
BACKGROUNDS = ("grass", "night")
SINGLE = (("center", "white"), ("left", "grass"))  # each concept alone after the joint training

# One budget per row, fixed before any benchmark was run; the steps are per concept of the group.
# LoRA and Custom Diffusion learn all the group's concepts at once (a multi-concept YAML); CLIF's stage 3
# is that same LoRA budget, after its contrastive stage and its textual inversion.
MULTI_BUDGETS = {
    "lora": dict(method="lora", steps_per_concept=300, batch_size=4, lr=1e-3, method_args={"rank": 4, "alpha": 4}),
    "custom_diffusion": dict(method="custom_diffusion", steps_per_concept=300, batch_size=4, lr=1e-4),
    "clif": dict(method="clif", steps_per_concept=300, batch_size=4, lr=1e-3,
                 method_args={"rank": 4, "alpha": 4, "stage1_steps": 200, "stage2_steps": 300, "stage1_lr": 1e-3,
                              "token_lr": 5e-3, "pairs_batch": 16}),
}


@dataclass
class MultiSettings:
    methods: list[str]
    groups: list[tuple[Concept, ...]]
    seeds: int = 4
    sample_steps: int = 30
    guidance: float = 5.0
    train_steps: int | None = None  # quick runs: the steps of each stage, whatever the group
    part: tuple[int, int] | None = None  # (i, n): train and draw only every n-th group from the i-th, no table


def group_set(name: str) -> list[tuple[Concept, ...]]:
    """dev (every group above), quick (the first pair), or groups of names: 'a+b,c+d+e'."""
    if name == "dev":
        return [tuple(get_concept(n) for n in g) for g in GROUPS]
    if name == "quick":
        return [tuple(get_concept(n) for n in GROUPS[0])]
    groups = []
    for text in name.split(","):
        names = [n.strip() for n in text.split("+") if n.strip()]
        if not 2 <= len(names) <= 3 or len(set(names)) != len(names):
            raise KeyError(f"{text!r} is not a group of two or three different concepts (a+b or a+b+c)")
        groups.append(tuple(get_concept(n) for n in names))
    return groups


def group_name(group) -> str:
    return "+".join(c.name for c in group)


def budget(method: str, group, train_steps: int | None = None) -> tuple[str, dict]:
    """(registered method, TrainConfig settings) of a row for a group."""
    from ..errors import UsageError

    if method not in MULTI_BUDGETS:
        raise UsageError(f"--methods: {method!r} has no multi-concept budget; choose from {', '.join(MULTI_BUDGETS)}")
    settings = dict(MULTI_BUDGETS[method])
    settings["method_args"] = dict(settings.get("method_args", {}))
    name = settings.pop("method")
    steps = train_steps or settings["steps_per_concept"] * len(group)
    del settings["steps_per_concept"]
    if name == "clif":
        args = settings["method_args"]
        if train_steps:
            args["stage1_steps"] = args["stage2_steps"] = train_steps
        else:
            args["stage2_steps"] *= len(group)
        steps += args["stage1_steps"] + args["stage2_steps"]
    settings["steps"] = steps
    if not settings["method_args"]:
        del settings["method_args"]
    return name, settings


# ---- prompts -----------------------------------------------------------------------------------


def group_scenes(group) -> list[tuple[Scene, tuple[str, ...]]]:
    """(scene, the place of each concept in group order) for every layout and background."""
    out = []
    for places, size in LAYOUTS[len(group)]:
        objects = tuple(c.object(p, size) for c, p in zip(group, places))
        assert all(positions_compatible(a, b) for i, a in enumerate(objects) for b in objects[i + 1:])
        for k, background in enumerate(BACKGROUNDS):
            out.append((Scene(objects, background, "plain", len(out)), places))
    return out


def group_prompts(group) -> tuple[list[str], list[tuple[str, ...]]]:
    tokens = {c.name: t for c, t in zip(group, TOKENS)}
    scenes = group_scenes(group)
    return [caption(s, tokens=tokens) for s, _ in scenes], [p for _, p in scenes]


def single_prompts(group) -> list[tuple[int, str, str]]:
    """(concept index, place, prompt) of each concept alone."""
    out = []
    for k, c in enumerate(group):
        for place, background in SINGLE:
            out.append((k, place, caption(Scene((c.object(place, "big"),), background), tokens={c.name: TOKENS[k]})))
    return out


# ---- judging -----------------------------------------------------------------------------------


def markings(x) -> tuple:
    """(color, marking, accent) of a concept or of an oracle reading's object."""
    get = (lambda k: x[k]) if isinstance(x, dict) else (lambda k: getattr(x, k))
    return get("color"), get("marking"), get("accent")


ATTRIBUTES = ("shape", "color", "marking", "accent")


def judge(reading: dict, asked: Concept, place: str, others: list[Concept]) -> str:
    """right | swapped | leaked | missing for one asked concept at its place (the module's definitions)."""
    found = {o["position"]: o for o in reading["objects"]}
    obj = found.get(place)
    if obj is None:
        return "missing"
    if markings(obj) == markings(asked) and obj["shape"] == asked.shape:
        return "right"
    if any(markings(obj) == markings(o) for o in others):
        return "swapped"
    for o in others:
        differ = [a for a in ATTRIBUTES if getattr(asked, a) != getattr(o, a)]
        mine = any(obj[a] == getattr(asked, a) for a in differ)
        theirs = any(obj[a] == getattr(o, a) for a in differ)
        if mine and theirs:
            return "leaked"
    return "missing"


def score_group(oracle, group, seeds: list[int], images: dict) -> list[dict]:
    """One record per (prompt, seed, asked concept) of the joint prompts, and per (prompt, seed) alone."""
    from .oracle_metrics import concept_hits

    records = []
    prompts, places = group_prompts(group)
    n = len(seeds)
    readings = oracle.read(images["multi"])
    for i, r in enumerate(readings):
        for k, c in enumerate(group):
            outcome = judge(r, c, places[i // n][k], [o for o in group if o is not c])
            records.append({"kind": "multi", "prompt": prompts[i // n], "seed": seeds[i % n], "concept": c.name,
                            "n_concepts": len(group), "outcome": outcome,
                            **{o: float(outcome == o) for o in OUTCOMES},
                            "confusion": float(outcome != "right")})
    singles = single_prompts(group)
    readings = oracle.read(images["single"])
    for k, c in enumerate(group):
        rows = [i for i in range(len(readings)) if singles[i // n][0] == k]
        hits = concept_hits(oracle, [images["single"][i] for i in rows], c)
        for i, hit in zip(rows, hits):
            records.append({"kind": "single", "prompt": singles[i // n][2], "seed": seeds[i % n], "concept": c.name,
                            "fidelity": float(hit),
                            "right": float(judge(readings[i], c, singles[i // n][1], []) == "right")})
    return records


SUMMARY = (  # (key, record kind, label)
    ("right", "multi", "right (asked concept at its place)"),
    ("swapped", "multi", "swapped"),
    ("leaked", "multi", "leaked"),
    ("missing", "multi", "missing"),
    ("confusion", "multi", "confusion = swapped + leaked + missing"),
    ("fidelity", "single", "single-concept fidelity (oracle, exact)"),
    ("right", "single", "single-concept right at its place"),
)


def summarize(records: list[dict]) -> dict:
    from .minibench import interval_summary

    return interval_summary(records, SUMMARY, "group", qualified=True)  # "right" is read for two kinds


# ---- the run -----------------------------------------------------------------------------------


def multi_fingerprint(settings: MultiSettings) -> str:
    """What a row's cached pictures depend on besides its run and the group."""
    return json.dumps({"seeds": settings.seeds, "sample_steps": settings.sample_steps,
                       "guidance": settings.guidance, "train_steps": settings.train_steps}, sort_keys=True)


def run_multi(out: Path, settings: MultiSettings) -> Path:
    """Train every (row, group), draw the joint and the single prompts with fixed seeds, judge them;
    finished runs and drawn pictures are kept, so a stopped benchmark resumes where it was."""
    from .. import mini
    from ..data import ConceptSpec
    from ..sample import generate, load_pipeline
    from ..train import TrainConfig
    from ..world.export import write_concept_folder
    from .grids import make_grid
    from .minibench import _load_cached, _save_cached, claim_folder, train_unless_finished
    from .parts import my_slice

    for method in settings.methods:  # every row's budget, before any work
        budget(method, settings.groups[0], settings.train_steps)
    claim_folder(out)
    oracle = mini.load_oracle()
    seeds = list(range(settings.seeds))
    fingerprint = multi_fingerprint(settings)
    records: list[dict] = []
    for group in my_slice(settings.groups, settings.part):
        gname = group_name(group)
        specs = [ConceptSpec(str(write_concept_folder(c, TOKENS[k], out / "data" / gname / c.name, masks=True)),
                             TOKENS[k], c.class_word) for k, c in enumerate(group)]
        prompts, _ = group_prompts(group)
        singles = [p for _, _, p in single_prompts(group)]
        grid_rows, labels = [], []
        for method in settings.methods:
            name, settings_ = budget(method, group, settings.train_steps)
            run = out / "runs" / method / gname
            samples = out / "samples" / method / f"{gname}.npz"
            train_unless_finished(TrainConfig(out=str(run), model="mini", method=name, seed=0, resume="latest",
                                              concepts=specs, **settings_))
            images = _load_cached(samples, fingerprint, run)
            if images is None:
                pipe = load_pipeline("mini", str(run))

                def draw(ps, desc):
                    return generate(pipe, [p for p in ps for _ in seeds], seeds * len(ps), steps=settings.sample_steps,
                                    guidance=settings.guidance, desc=desc, batch=len(ps) * len(seeds))

                images = {"multi": draw(prompts, method), "single": draw(singles, method)}
                _save_cached(samples, fingerprint, images)
            for r in score_group(oracle, group, seeds, images):
                records.append({"method": method, "group": gname, **r})
            grid_rows.append(images["multi"][::max(1, len(seeds))])
            labels.append(method)
        (out / "grids").mkdir(exist_ok=True)
        make_grid(grid_rows, labels, label_width=120).save(out / "grids" / f"{gname}.png")
    if settings.part is not None:  # the parent process scores the whole
        return out
    results = {
        "settings": {"methods": settings.methods, "groups": [group_name(g) for g in settings.groups], "seeds": seeds,
                     "sample_steps": settings.sample_steps, "guidance": settings.guidance,
                     "train_steps": settings.train_steps,
                     "budgets": {m: {group_name(g): budget(m, g, settings.train_steps)[1] for g in settings.groups}
                                 for m in settings.methods}},
        "summary": {m: summarize([r for r in records if r["method"] == m]) for m in settings.methods},
        "records": records,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    return write_table(out, results)


def write_table(out: Path, results: dict) -> Path:
    """results.md: one row per number, one column per method, means with 95% intervals."""
    methods = list(results["summary"])
    keys = list(next(iter(results["summary"].values())))
    lines = ["| | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for key in keys:
        label = results["summary"][methods[0]][key]["label"]
        cells = [f"{s[key]['mean']:.3f} [{s[key]['lo']:.3f}, {s[key]['hi']:.3f}]" if key in s else "" for s in
                 (results["summary"][m] for m in methods)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    path = out / "results.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
