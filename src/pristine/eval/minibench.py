"""MiniBench: methods on the Shapes world's held-out concepts, judged exactly by the oracle.

For every (method, concept): train with the method's frozen budget, then draw fixed prompts with
fixed seeds from the original and the customized model and score
- fidelity: is it the concept (the oracle reads its shape, body color, marking and accent on one
  object), CLIP-I (mini CLIP image cosine to the references), DINO-style (oracle embedding cosine);
- prompt adherence: the context the prompt asks for besides the concept (background, place, size,
  a second object, style), and CLIP-T;
- pollution: (a) prompts without the concept, original vs customized, same seeds: pixel distance
  and oracle agreement; (b) plain class prompts: how often the concept leaks into them, against
  the original model's rate; (c) context drift: a concept prompt against the original model's
  picture of the same prompt without the token (background, style, layout as the oracle reads them).
Every number carries a 95% bootstrap interval over (concept, seed) units.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np

from ..world.concepts import DEV_CONCEPTS, FINAL_CONCEPTS, Concept, get_concept
from ..world.scene import Scene, WorldObject, positions_compatible

TOKEN = "<v1>"
# One budget per method, fixed before any benchmark was run: the learning rates are the usual
# ones for each method scaled to a tiny model, the same steps for all.
BUDGETS = {
    "lora": dict(steps=300, batch_size=4, lr=1e-3, method_args={"rank": 4, "alpha": 4}),
    "lora_prior": dict(steps=300, batch_size=4, lr=1e-3, method_args={"rank": 4, "alpha": 4},
                       prior_preservation=True, num_class_images=50, method="lora",
                       class_prompt="a {cls}"),  # Shapes-world captions never say "a photo of"
    # output preservation: the caption with the class word for the token, weight 1 (ai-toolkit's choice)
    "lora_preserve": dict(steps=300, batch_size=4, lr=1e-3, method_args={"rank": 4, "alpha": 4}, method="lora",
                          preserve="class", preserve_weight=1.0),
    "textual_inversion": dict(steps=300, batch_size=4, lr=5e-3),
    "dreambooth": dict(steps=300, batch_size=4, lr=5e-5),
    "custom_diffusion": dict(steps=300, batch_size=4, lr=1e-4),
    # PureCC (METHODS.md 1): stage 1 (token + extractor LoRA) then stage 2 (a fresh learner LoRA), each
    # with LoRA's steps, rank and learning rate; the paper's η = 2 and λ = 1 (or adaptive); the method's
    # defaults otherwise (the anchored form; `purecc@base_branch=learner` is the paper's)
    "purecc": dict(steps=600, batch_size=4, lr=1e-3, method="purecc",
                   method_args={"rank": 4, "alpha": 4, "stage1_steps": 300, "stage1_lr": 1e-3, "token_lr": 5e-3}),
    "purecc_adaptive": dict(steps=600, batch_size=4, lr=1e-3, method="purecc",
                            method_args={"rank": 4, "alpha": 4, "stage1_steps": 300, "stage1_lr": 1e-3, "token_lr": 5e-3,
                                         "lambda_mode": "adaptive"}),
    # SPF's own task is the attribute one (minibench_attribute.py); this budget serves `bench steps`
    "spf": dict(steps=600, batch_size=4, lr=1e-3, method="spf", method_args={"rank": 4, "alpha": 4, "stage1_steps": 300}),
}

# The PureCC authors' settings (METHODS.md 1, read from their code): stage 1 400 steps at batch 4, LoRA
# lr 1e-4, token lr 5e-3; stage 2 800 steps, lr 1e-4, constant, AdamW weight decay 1e-4; rank = alpha = 4.
# LoRA gets them too, so that neither method is judged at the other's learning rate: the LoRA that is
# the result trains as long as PureCC's learner (800 steps), with the learner's lr and the token's lr.
# Our loop has one batch size and one weight decay per run: batch 4 and 1e-4 in both stages (the
# authors' stage 2 runs at batch 1; their stage-1 weight decay is not stated).
AUTHORS = dict(batch_size=4, lr=1e-4, lr_scheduler="constant", weight_decay=1e-4)
BUDGETS.update({
    "lora_authors": dict(steps=800, **AUTHORS, method="lora", method_args={"rank": 4, "alpha": 4, "token_lr": 5e-3}),
    "lora_preserve_authors": dict(steps=800, **AUTHORS, method="lora", method_args={"rank": 4, "alpha": 4, "token_lr": 5e-3},
                                  preserve="class", preserve_weight=1.0),
    # the authors' form: the extractor is the token alone (R with every adapter off), the learner's y_base
    "purecc_authors": dict(steps=1200, **AUTHORS, method="purecc",
                           method_args={"rank": 4, "alpha": 4, "stage1_steps": 400, "stage1_lr": 1e-4, "token_lr": 5e-3,
                                        "extractor_lora": False, "base_branch": "learner"}),
})


def budget_settings(entry: str, steps_per_stage: int | None = None) -> tuple[str, dict]:
    """(registered method name, TrainConfig settings) of a budget; `steps_per_stage` overrides the
    steps, for each stage of a two-stage method (PureCC).

    `BUDGET@KEY=VALUE@...` is the budget with settings changed, a row of its own
    (`purecc_authors@base_branch=original`, `lora@preserve=unrelated`): KEY is one of the method's
    settings, else a training setting. Bad entries are one UsageError naming the entry."""
    import yaml

    from ..errors import UsageError
    from ..methods import get_method
    from ..methods.base import _coerce
    from ..train import TrainConfig

    budget, *changes = entry.split("@")
    if budget not in BUDGETS:
        raise UsageError(f"--methods: {budget!r} has no budget here; choose from {', '.join(BUDGETS)}")
    settings = dict(BUDGETS[budget])
    name = settings.pop("method", budget)
    settings["method_args"] = dict(settings.get("method_args", {}))
    if steps_per_stage:
        two_stage = "stage1_steps" in settings["method_args"]
        settings["steps"] = 2 * steps_per_stage if two_stage else steps_per_stage
        if two_stage:
            settings["method_args"]["stage1_steps"] = steps_per_stage
    method = get_method(name)
    method_keys = {f.name for f in dataclass_fields(method.Config)}
    train_fields = {f.name: f for f in dataclass_fields(TrainConfig)}
    for change in changes:
        key, sep, text = change.partition("=")
        if not sep:
            raise UsageError(f"--methods: {change!r} in {entry!r} is not KEY=VALUE")
        value = yaml.safe_load(text)
        if key in method_keys:
            settings["method_args"][key] = value
        elif key in train_fields and key not in ("out", "model", "method", "method_args", "concepts", "resume"):
            settings[key] = _coerce(value, train_fields[key].type, getattr(TrainConfig, key, None), f"--methods {entry}: {key}")
        else:
            raise UsageError(f"--methods {entry}: {key!r} is neither a {name} setting nor a training setting")
    method.Config.from_dict(settings["method_args"], where=f"--methods {entry}: method_args")
    if settings.get("preserve"):  # the source and the method, before anything is trained
        TrainConfig(method=name, preserve=settings["preserve"], preserve_weight=settings.get("preserve_weight", 1.0),
                    ).output_preservation(f"--methods {entry}: ")
    if not settings["method_args"]:
        del settings["method_args"]
    return name, settings


def shared_stage1(method_name: str, budget: dict) -> tuple[dict, str] | None:
    """For a two-stage budget whose stage 1 can be trained once and shared (a method whose config
    lists its `stage2_only` settings, both stages in one run, a constant learning rate): the stage-1
    budget and a key naming it, equal for every budget that differs only in stage-2 settings (and in
    the stage-2 learning rate and steps). Otherwise None: the run trains both stages itself.

    Why: the PureCC rows of MiniBench (the authors' form, `extractor_lora`, `base_branch`, adaptive λ)
    differ in stage 2 only; sharing stage 1 makes them a paired comparison and saves three stage-1
    trainings per concept."""
    import hashlib

    from ..methods import get_method

    config = get_method(method_name).Config
    stage2_only = getattr(config, "stage2_only", None)
    args = budget.get("method_args", {})
    if (stage2_only is None or args.get("stage", "both") != "both" or budget.get("epochs", 0)
            or budget.get("lr_scheduler", "constant") != "constant" or budget.get("warmup_steps", 0)):
        return None
    stage1_args = {k: v for k, v in args.items() if k not in stage2_only}
    stage1_args["stage"] = "1"
    stage1 = {k: v for k, v in budget.items() if k not in ("steps", "lr", "method_args")}
    stage1.update(steps=stage1_args.get("stage1_steps", config.stage1_steps),
                  method_args=stage1_args)
    key = hashlib.sha1(json.dumps({"method": method_name, **stage1}, sort_keys=True).encode()).hexdigest()[:10]
    return stage1, f"{method_name}-{key}"


def stage2_budget(budget: dict, stage1_run: Path, stage1_steps: int) -> dict:
    """The budget's stage 2 alone, from a finished stage-1 run of `stage1_steps` steps."""
    args = {k: v for k, v in budget["method_args"].items() if k != "stage1_steps"}
    args.update(stage="2", stage1_run=str(stage1_run))
    return {**budget, "steps": budget["steps"] - stage1_steps, "method_args": args}


def train_unless_finished(config) -> bool:
    """Train the run `config` describes unless it is finished; True when it trained now. A finished run
    whose saved settings differ from these (a default changed, a budget was edited since) is not scored
    as if it were this row's: one line names the folder and the first setting that differs."""
    import yaml

    from ..errors import UsageError
    from ..train import train

    run = Path(config.out)
    if not (run / "DONE").exists():
        train(config)
        return True
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    changes = config.changes_from(saved) if isinstance(saved, dict) else [("config.yaml", "unreadable", "")]
    if changes:
        key, old, new = changes[0]
        if isinstance(old, dict) and isinstance(new, dict):  # name the method setting, not the whole mapping
            key, old, new = next((f"{key}.{k}", old.get(k), new.get(k)) for k in {**old, **new}
                                 if old.get(k) != new.get(k))
        raise UsageError(f"{run}: a finished run trained with {key} {old}, but this benchmark now trains {new}; "
                         "delete that folder to train it again (its pictures are redrawn), or give a new --out")
    return False


def train_once(run: Path, do_train) -> float:
    """Train `run` unless it is finished (`do_train()` says whether it trained); the seconds it took,
    kept in run/train_s.txt so that every later user of the run can count them."""
    import time

    from ..files import atomic_write_text

    record = run / "train_s.txt"
    t0 = time.perf_counter()
    if do_train():  # (a run resumed after a kill counts from the resume)
        atomic_write_text(record, f"{time.perf_counter() - t0:.1f}\n")
    return float(record.read_text()) if record.is_file() else 0.0


# (position, background, size, style, second object or None)
CONTEXTS = [
    ("left", "grass", "big", "plain", None),
    ("right", "night", "big", "plain", None),
    ("top", "sand", "small", "plain", None),
    ("center", "water", "big", "cartoon", None),
    ("left", "white", "big", "plain", ("circle", "blue", "small", "right")),
    ("bottom", "brick", "big", "plain", ("square", "yellow", "small", "top")),
]
UNRELATED = [
    "a big green triangle on the left, on a white background",
    "a small blue circle at the top, at night",
    "a big yellow heart in the center, in the sky",
    "a big pink hexagon on the right and a small orange cross on the left, on wood",
]


@dataclass
class BenchSettings:
    methods: list[str]
    concepts: list[Concept]
    seeds: int = 4
    sample_steps: int = 30
    guidance: float = 5.0
    train_steps: int | None = None  # overrides the budget's steps per stage (quick runs)
    part: tuple[int, int] | None = None  # (i, n): train and draw only every n-th concept from the i-th, no report


def concept_set(name: str) -> list[Concept]:
    if name == "dev":
        return list(DEV_CONCEPTS)
    if name == "final":
        return list(FINAL_CONCEPTS)
    if name == "quick":
        return list(DEV_CONCEPTS[:3])
    return [get_concept(n) for n in name.split(",")]


def context_scene(concept: Concept, ctx, seed: int) -> Scene:
    position, background, size, style, second = ctx
    objects = [concept.object(position, size)]
    if second is not None:
        shape, color, osize, opos = second
        other = WorldObject(shape, color, osize, opos)
        assert positions_compatible(objects[0], other)
        objects.append(other)
    return Scene(tuple(objects), background, style, seed)


def prompts_for(concept: Concept) -> tuple[list[Scene], list[str], list[str]]:
    scenes = [context_scene(concept, ctx, i) for i, ctx in enumerate(CONTEXTS)]
    concept_prompts = [concept.prompt(TOKEN, s) for s in scenes]
    class_prompts = [p.replace(f"{TOKEN} ", "") for p in concept_prompts]
    return scenes, concept_prompts, class_prompts


# ---- scoring ---------------------------------------------------------------------------------


class Judges:
    """The oracle and the mini CLIP (scored with the same code as real models' CLIP)."""

    def __init__(self):
        from .. import mini
        from .real_metrics import RealMetrics

        self.oracle = mini.load_oracle()
        clip = RealMetrics(clip=str(Path(mini.path()) / "clip"))
        self.clip_images, self.clip_texts = clip.clip_images, clip.clip_texts


def context_right(reading: dict, scene: Scene) -> dict[str, float]:
    """Per context attribute the prompt asks for besides the concept: did the oracle find it?"""
    found = {o["position"]: o for o in reading["objects"]}
    main = scene.objects[0]
    out = {"background": float(reading["background"] == scene.background),
           "position": float(main.position in found),
           "style": float(reading["style"] == scene.style)}
    if main.position in found:
        out["size"] = float(found[main.position]["size"] == main.size)
    else:
        out["size"] = 0.0
    if len(scene.objects) > 1:
        other = scene.objects[1]
        hit = found.get(other.position)
        out["second_object"] = float(hit is not None and hit["shape"] == other.shape and hit["color"] == other.color)
    return out


def _layout(reading: dict) -> tuple:
    return (reading["background"], reading["style"], tuple(sorted(o["position"] for o in reading["objects"])))


def score_concept(judges: Judges, concept: Concept, scenes, concept_prompts, class_prompts, seeds,
                  original: dict, custom: dict) -> list[dict]:
    """One record per (prompt kind, prompt, seed) unit with every metric that applies to it."""
    from ..world import render
    from .oracle_metrics import concept_hits

    refs = [render(s)[0] for s in concept.references(5)]
    ref_oracle = judges.oracle.embedding(refs).mean(0)
    ref_oracle = ref_oracle / ref_oracle.norm()
    ref_clip = judges.clip_images(refs).mean(0)
    ref_clip = ref_clip / ref_clip.norm()
    records = []
    n = len(seeds)
    # concept prompts: fidelity, adherence, context drift
    imgs = custom["concept"]
    hits = concept_hits(judges.oracle, imgs, concept)
    dino = (judges.oracle.embedding(imgs) @ ref_oracle).numpy()
    clip_i = (judges.clip_images(imgs) @ ref_clip).numpy()
    texts = [p.replace(TOKEN, concept.class_word) for p in concept_prompts for _ in seeds]
    clip_t = (judges.clip_images(imgs) * judges.clip_texts(texts)).sum(-1).numpy()
    readings = judges.oracle.read(imgs)
    base_readings = judges.oracle.read(original["class"])
    for k, (r, br) in enumerate(zip(readings, base_readings)):
        scene = scenes[k // n]
        ctx = context_right(r, scene)
        records.append({
            "kind": "concept", "prompt": concept_prompts[k // n], "seed": seeds[k % n],
            "fidelity": float(hits[k]), "clip_i": float(clip_i[k]), "dino": float(dino[k]), "clip_t": float(clip_t[k]),
            "adherence": float(np.mean(list(ctx.values()))), **{f"adherence_{a}": v for a, v in ctx.items()},
            "drift": float(_layout(r) != _layout(br)),
            "drift_pixels": float(np.abs(imgs[k].astype(np.float32) - original["class"][k].astype(np.float32)).mean() / 255),
        })
    # class prompts: does the concept leak into them?
    leak_custom = concept_hits(judges.oracle, custom["class"], concept)
    leak_orig = concept_hits(judges.oracle, original["class"], concept)
    for k in range(len(leak_custom)):
        records.append({"kind": "class", "prompt": class_prompts[k // n], "seed": seeds[k % n],
                        "leak": float(leak_custom[k]), "leak_original": float(leak_orig[k])})
    # unrelated prompts: did they change?
    ra, rb = judges.oracle.read(original["unrelated"]), judges.oracle.read(custom["unrelated"])
    for k, (a, b) in enumerate(zip(original["unrelated"], custom["unrelated"])):
        same = _object_summary(ra[k]) == _object_summary(rb[k])
        records.append({"kind": "unrelated", "prompt": UNRELATED[k // n], "seed": seeds[k % n],
                        "pollution_distance": float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255),
                        "pollution_agreement": float(same)})
    return records


def _object_summary(r: dict) -> tuple:
    return (r["background"], r["style"], tuple(sorted((o["position"], o["shape"], o["color"]) for o in r["objects"])))


def bootstrap(values: list[float], groups: list[str], n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval, resampling concepts and then units within them."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    names = np.unique(groups)
    by = [values[groups == g] for g in names]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(by), len(by))
        means.append(np.mean(np.concatenate([rng.choice(by[i], len(by[i])) for i in picks])))
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


METRICS = [  # (name in the table, record kind, record key)
    ("fidelity (oracle)", "concept", "fidelity"),
    ("CLIP-I", "concept", "clip_i"),
    ("DINO (oracle emb.)", "concept", "dino"),
    ("adherence (oracle)", "concept", "adherence"),
    ("CLIP-T", "concept", "clip_t"),
    ("pollution a: pixel distance", "unrelated", "pollution_distance"),
    ("pollution a: oracle agreement", "unrelated", "pollution_agreement"),
    ("pollution b: leak into class prompts", "class", "leak"),
    ("pollution b: original model's rate", "class", "leak_original"),
    ("pollution c: context drift", "concept", "drift"),
    ("pollution c: pixel drift", "concept", "drift_pixels"),
]


def interval_summary(records: list[dict], metrics, group: str, qualified: bool = False) -> dict:
    """Per metric (key, record kind or None for any, label): the mean with a 95% bootstrap interval over
    the records that hold it, resampling whole `group`s (concepts, words, ...); keyed by the metric's
    key, or by "kind.key" with `qualified` (when one key is read from records of two kinds)."""
    out = {}
    for key, kind, label in metrics:
        rows = [r for r in records if (kind is None or r["kind"] == kind) and key in r]
        if rows:
            mean, lo, hi = bootstrap([r[key] for r in rows], [r[group] for r in rows])
            out[f"{kind}.{key}" if qualified else key] = {"label": label, "mean": mean, "lo": lo, "hi": hi, "n": len(rows)}
    return out


def summarize(records: list[dict]) -> dict:
    return interval_summary(records, [(key, kind, name) for name, kind, key in METRICS], "concept")


# ---- the run -----------------------------------------------------------------------------------


def model_id() -> str:
    """The content of pristine-mini's generating weights (denoiser, VAE, text encoder): cached pictures
    of another model (a re-trained part) must not be reused."""
    import hashlib

    from .. import mini

    digest = hashlib.sha1()
    for part in ("unet", "vae", "text_encoder"):
        for f in sorted((Path(mini.path()) / part).glob("*.safetensors")):
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def claim_folder(out: Path) -> None:
    """Make the bench folder and tie it to the pristine-mini it was made with: its trainings are kept
    and resumed, and a run trained on another base model must not be scored as if it were trained on
    this one."""
    from ..errors import UsageError

    out.mkdir(parents=True, exist_ok=True)
    marker, current = out / "model_id.txt", model_id()
    if marker.is_file():
        made_with = marker.read_text().strip()
        if made_with != current:
            raise UsageError(f"{out}: its runs were trained on another pristine-mini (weights {made_with}, now {current}); "
                             "give a new --out folder")
    else:
        from ..files import atomic_write_text

        atomic_write_text(marker, current + "\n")


def bench_fingerprint(settings: BenchSettings) -> str:
    """What a cached sample set depends on besides the method and the concept."""
    return json.dumps({"seeds": settings.seeds, "sample_steps": settings.sample_steps, "guidance": settings.guidance,
                       "train_steps": settings.train_steps, "model": model_id()}, sort_keys=True)


def _load_cached(path: Path, fingerprint: str, run: Path | None = None) -> dict | None:
    """The pictures cached at `path` if they were drawn with these settings and, given the `run` that
    drew them, after it finished: pictures of an earlier model of the run do not count (even when the
    process that retrained it was stopped before drawing again)."""
    if not path.is_file() or (run is not None and path.stat().st_mtime < (run / "DONE").stat().st_mtime):
        return None
    with np.load(path) as f:
        if str(f["fingerprint"]) != fingerprint:
            return None
        return {k: list(f[k]) for k in f.files if k != "fingerprint"}


def _save_cached(path: Path, fingerprint: str, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, fingerprint=np.array(fingerprint), **{k: np.stack(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def run_bench(out: Path, settings: BenchSettings) -> Path:
    """Train, draw and score every (method, concept); finished pieces are kept on disk, so a run that
    stops resumes where it was and a later run with more methods only does the new ones."""
    import time

    from ..data import ConceptSpec
    from ..sample import generate, load_pipeline
    from ..train import TrainConfig
    from ..world.export import write_concept_folder
    from .parts import my_slice

    claim_folder(out)
    judges = Judges()
    seeds = list(range(settings.seeds))
    fingerprint = bench_fingerprint(settings)
    base = load_pipeline("mini")
    records: list[dict] = []
    timings: dict[str, dict[str, dict]] = {}
    grids: dict[str, dict[str, list]] = {}

    def draw(pipe, prompts, desc):
        all_prompts = [p for p in prompts for _ in seeds]
        return generate(pipe, all_prompts, seeds * len(prompts), steps=settings.sample_steps,
                        guidance=settings.guidance, desc=desc, batch=len(all_prompts))

    for concept in my_slice(settings.concepts, settings.part):
        scenes, concept_prompts, class_prompts = prompts_for(concept)
        images_dir = write_concept_folder(concept, TOKEN, out / "data" / concept.name)
        original_file = out / "samples" / "original" / f"{concept.name}.npz"
        original = _load_cached(original_file, fingerprint)
        if original is None:
            original = {"class": draw(base, class_prompts, "original"), "unrelated": draw(base, UNRELATED, "original")}
            _save_cached(original_file, fingerprint, original)
        grids[concept.name] = {"original": original["class"]}
        for method in settings.methods:
            method_name, budget = budget_settings(method, settings.train_steps)
            run = out / "runs" / method / concept.name
            samples_file = out / "samples" / method / f"{concept.name}.npz"
            timing_file = samples_file.with_suffix(".json")
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

            def train_run(folder: Path, run_budget: dict) -> bool:
                return train_unless_finished(TrainConfig(
                    out=str(folder), model="mini", method=method_name, seed=0, resume="latest",
                    concepts=[ConceptSpec(str(images_dir), TOKEN, concept.class_word)], **run_budget))

            stage1_s = 0.0
            shared = shared_stage1(method_name, budget)
            if shared is not None:  # stage 1 once per concept for the rows that differ in stage 2 only
                stage1_budget, key = shared
                stage1_run = out / "runs" / f"_stage1-{key}" / concept.name
                stage1_s = train_once(stage1_run, lambda: train_run(stage1_run, stage1_budget))
                budget = stage2_budget(budget, stage1_run, stage1_budget["steps"])
            t0 = time.perf_counter()
            if train_run(run, budget):
                # a shared stage 1 counts in full for every row that uses it: what one run costs
                timing["train_s"] = round(time.perf_counter() - t0 + stage1_s, 1)
            custom = _load_cached(samples_file, fingerprint, run)
            if custom is None:
                t0 = time.perf_counter()
                pipe = load_pipeline("mini", str(run))
                custom = {"concept": draw(pipe, concept_prompts, method), "class": draw(pipe, class_prompts, method),
                          "unrelated": draw(pipe, UNRELATED, method)}
                _save_cached(samples_file, fingerprint, custom)
                timing["sample_s"] = round(time.perf_counter() - t0, 1)
                timing_file.write_text(json.dumps(timing))
            timings.setdefault(method, {})[concept.name] = timing
            grids[concept.name][method] = custom["concept"]
            for r in score_concept(judges, concept, scenes, concept_prompts, class_prompts, seeds, original, custom):
                records.append({"method": method, "concept": concept.name, **r})
    if settings.part is not None:  # the parent process scores the whole
        return out
    results = {
        "settings": {"methods": settings.methods, "concepts": [c.name for c in settings.concepts], "seeds": seeds,
                     "sample_steps": settings.sample_steps, "guidance": settings.guidance,
                     "budgets": {m: budget_settings(m, settings.train_steps)[1] for m in settings.methods},
                     "train_steps": settings.train_steps},
        "summary": {m: summarize([r for r in records if r["method"] == m]) for m in settings.methods},
        "timings": timings,
        "records": records,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    from .report import write_report

    write_report(out, results, grids, concept_prompts_by={c.name: prompts_for(c)[1] for c in settings.concepts},
                 seeds=len(seeds))
    return out / "index.html"
