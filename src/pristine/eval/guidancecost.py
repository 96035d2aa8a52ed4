"""What one step of the sampling engine costs against the forwards it needs (issue: GCFG).

A GCFG step with N terms runs one forward per group of terms that share weights and adapters (∅ and
the original's terms in one batch, each run's adapter in its own), then combines and steps the
scheduler. Its overhead is everything else: adapter switching, concatenating and splitting batches,
the weighted sum, the scheduler. For each configuration, per timestep, the step is timed through the
engine and, right after it, the same groups' forwards alone (adapters set beforehand, inputs built
beforehand); the ratio is the median over timesteps of step / sum of forwards, paired so the
machine's drift cancels.

Batching: terms that share weights run as one forward. For `shared` (N prompts on the original) the
same step is also timed with every term as a forward of its own, the ratio saying what batching saves.

The adapters are LoRA runs of the MiniBench budget's shape (rank 4), trained for two steps: the cost
of a forward does not depend on what an adapter learned.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch


def _adapter_runs(out: Path, n: int, model: str) -> list[Path]:
    from ..data import ConceptSpec
    from ..train import TrainConfig, train
    from ..world.concepts import get_concept
    from ..world.export import write_concept_folder

    concept = get_concept("ember_star")
    runs = []
    for k in range(n):
        run, token = out / "runs" / f"lora{k}", f"<g{k}>"  # a token each: two runs on one copy may not share one
        images = write_concept_folder(concept, token, out / "data" / f"{concept.name}{k}")
        if not (run / "DONE").is_file():
            train(TrainConfig(out=str(run), model=model, method="lora", steps=2, batch_size=1, seed=k,
                              checkpoint_every=0, method_args={"rank": 4, "alpha": 4},
                              concepts=[ConceptSpec(str(images), token, concept.class_word)]))
        runs.append(run)
    return runs


def configurations(runs: list[Path], prompt: str) -> dict[str, list[tuple[str, str, float]]]:
    """name -> terms as (run folder or "" for the original, prompt, weight)."""
    a, b = (str(r) for r in runs[:2])
    return {
        "cfg (1 term)": [("", prompt, 5.0)],
        "gcfg, 2 terms (original + 1 adapter)": [("", prompt, 2.5), (a, "", 2.5)],
        "gcfg, 3 terms (original + 2 adapters)": [("", prompt, 2.5), (a, "", 2.5), (b, prompt, 1.0)],
        "gcfg, 3 terms on the original (shared weights)": [("", prompt, 2.5), ("", "a red circle", 1.5),
                                                          ("", "a blue square", -1.0)],
    }


def measure(terms_spec, models, n: int, steps: int, warmup: int, seed: int = 0) -> dict:
    from ..sampling import Term, sampler_for

    denoisers = [models.run(r) if r else models.original for r, _, _ in terms_spec]
    terms = [Term(d, [p] * n, w) for d, (_, p, w) in zip(denoisers, terms_spec)]
    engine = sampler_for(models, denoisers, "ddim")
    generators = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    scheduler, latents, extra = engine.start(generators, steps + warmup)

    groups = engine.groups(n, terms)  # the engine's own forwards, their inputs built once

    def forwards(x, t, batched: bool = True) -> None:
        for members in groups:
            denoiser, conds = members[0][1], [c for _, _, c in members]
            with denoiser.active():  # switching is the step's overhead; only the forward is timed
                if batched:
                    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
                    inner = [(torch.cat([x] * len(conds)), cond)]
                else:
                    inner = [(x, c) for c in conds]
                for xs, cond in inner:
                    t0 = time.perf_counter()
                    denoiser.predict(xs, t, cond)
                    forwards.elapsed += time.perf_counter() - t0

    ratios, unbatched, step_s, fwd_s = [], [], [], []
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)

            def alone():
                forwards.elapsed = 0.0
                forwards(x, t)
                return forwards.elapsed

            def through_engine():
                t0 = time.perf_counter()
                result = engine.step(scheduler, t, latents, terms, extra)
                return time.perf_counter() - t0, result

            if k % 2:  # alternate the order, so neither side always runs on warm caches
                f = alone()
                s, new = through_engine()
            else:
                s, new = through_engine()
                f = alone()
            separate = None
            if len(terms) + 1 > len(groups):
                forwards.elapsed = 0.0
                forwards(x, t, batched=False)
                separate = forwards.elapsed
            latents = new
            if k < warmup:
                continue
            ratios.append(s / f)
            step_s.append(s)
            fwd_s.append(f)
            if separate is not None:
                unbatched.append(separate / f)
    out = {"terms": len(terms), "forwards_per_step": len(groups), "s_per_step": statistics.median(step_s),
           "s_forwards": statistics.median(fwd_s), "step_vs_forwards": statistics.median(ratios),
           "step_vs_forwards_p90": sorted(ratios)[int(0.9 * (len(ratios) - 1))]}
    if unbatched:
        out["unbatched_forwards_vs_batched"] = statistics.median(unbatched)
    return out


def run(out: Path, model: str = "mini", n: int = 4, steps: int = 30, warmup: int = 5, repeats: int = 3) -> dict:
    """Every configuration, `repeats` rounds in alternation; results.json with per-round figures and medians."""
    from ..sampling import Models

    out.mkdir(parents=True, exist_ok=True)
    runs = _adapter_runs(out, 2, model)
    models = Models(model)
    configs = configurations(runs, "a big red star on the left, on grass")
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(repeats):
        for name, spec in configs.items():
            rounds[name].append(measure(spec, models, n, steps, warmup, seed=r))
    results = {"settings": {"model": model, "batch": n, "steps": steps, "warmup": warmup, "repeats": repeats,
                            "threads": torch.get_num_threads()}, "configurations": {}}
    for name, per_round in rounds.items():
        summary = {k: statistics.median(r[k] for r in per_round) for k in per_round[0] if k not in ("terms", "forwards_per_step")}
        summary.update(terms=per_round[0]["terms"], forwards_per_step=per_round[0]["forwards_per_step"],
                       step_vs_forwards_range=[min(r["step_vs_forwards"] for r in per_round),
                                               max(r["step_vs_forwards"] for r in per_round)])
        results["configurations"][name] = summary
    tmp = out / "guidance_cost.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "guidance_cost.json")
    return results


def table(results: dict) -> str:
    lines = ["| configuration | terms | forwards | s / step | s in forwards | step / forwards [rounds] | separate forwards / batched |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["configurations"].items():
        lo, hi = r["step_vs_forwards_range"]
        batching = f"{r['unbatched_forwards_vs_batched']:.2f}" if "unbatched_forwards_vs_batched" in r else "-"
        lines.append(f"| {name} | {r['terms']} | {r['forwards_per_step']} | {r['s_per_step']:.4f} | {r['s_forwards']:.4f} | "
                     f"{r['step_vs_forwards']:.3f} [{lo:.3f}, {hi:.3f}] | {batching} |")
    return "\n".join(lines)
