import json
import re

import numpy as np
import pytest
import torch

import pristine.mini as mini
from pristine.eval.minibench import bootstrap
from pristine.eval.oracle_metrics import change, concept_hits
from pristine.world import render
from pristine.world.concepts import DEV_CONCEPTS


@pytest.fixture(scope="module")
def oracle():
    return mini.load_oracle()


def test_fidelity_is_high_on_the_concepts_own_renders_and_low_on_others(oracle):
    rng = np.random.default_rng(0)
    own, other = [], []
    for i, concept in enumerate(DEV_CONCEPTS[:6]):
        own.append(concept_hits(oracle, [render(concept.scene(rng))[0] for _ in range(6)], concept).mean())
        impostor = DEV_CONCEPTS[(i + 1) % len(DEV_CONCEPTS)]
        other.append(concept_hits(oracle, [render(impostor.scene(rng))[0] for _ in range(6)], concept).mean())
    assert np.mean(own) >= 0.8 and np.mean(other) <= 0.35, (own, other)


def test_pollution_is_zero_against_itself_and_grows_with_damage(oracle):
    from pristine.sample import generate

    pipe = mini.load_pipeline()
    prompts = ["a big red star on the left, on grass", "a small blue circle at the top, at night"] * 2
    seeds = [0, 0, 1, 1]
    before = generate(pipe, prompts, seeds, steps=10)
    same = change(oracle, before, generate(pipe, prompts, seeds, steps=10))
    assert same == {"pixel_distance": 0.0, "oracle_agreement": 1.0}
    changes = []
    for scale in (0.02, 0.2):
        damaged = mini.load_pipeline()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in damaged.unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(0))
        changes.append(change(oracle, before, generate(damaged, prompts, seeds, steps=10))["pixel_distance"])
    assert 0 < changes[0] < changes[1]


def test_bootstrap_interval_contains_the_mean_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small = rng.normal(0.5, 0.1, 20)
    big = rng.normal(0.5, 0.1, 2000)
    m, lo, hi = bootstrap(list(small), ["a", "b"] * 10)
    M, LO, HI = bootstrap(list(big), ["a", "b"] * 1000)
    assert lo <= m <= hi and LO <= M <= HI and (HI - LO) < (hi - lo)


def test_bench_report_references_files_that_exist(tmp_path, capsys):
    from pristine.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "mini", "--methods", "textual_inversion", "--concepts", "ember_star", "--out", str(out),
                 "--seeds", "1", "--sample-steps", "2", "--train-steps", "2"]) == 0
    page = (out / "index.html").read_text()
    sources = re.findall(r"src=['\"]([^'\"]+)['\"]", page)
    assert len(sources) >= 3 and all((out / s).is_file() for s in sources)
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]["textual_inversion"]
    # textual inversion leaves prompts without its token exactly as they were
    assert s["pollution_distance"]["mean"] == 0.0 and s["pollution_agreement"]["mean"] == 1.0
    assert main(["bench", "mini", "--methods", "magic", "--out", str(out)]) == 2


def test_bench_steps_variants_are_checked_before_anything_is_written(tmp_path, capsys):
    from pristine.cli import main

    out = tmp_path / "steps"
    for methods, says in [("lora,purecc@nope=1", "nope"), ("lora,purecc@eta", "KEY=VALUE"),
                          ("lora,purecc@eta=x", "eta"), ("lora,magic@eta=1", "magic")]:
        assert main(["bench", "steps", "--methods", methods, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
