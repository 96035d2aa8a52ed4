import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

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
    assert np.mean(own) >= 0.9 and np.mean(other) <= 0.05, (own, other)


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


def test_bench_mini_in_two_processes_draws_what_one_process_draws(tmp_path, capsys):
    """--workers 2: each process trains and draws its slice of the concepts into the shared folder,
    then the parent scores the whole; the pictures and the scores are those of one process."""
    import numpy as np

    from pristine.cli import main

    common = ["bench", "mini", "--methods", "lora", "--concepts", "ember_star,tide_circle", "--seeds", "1",
              "--sample-steps", "2", "--train-steps", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one)]) == 0
    assert main([*common, "--out", str(two), "--workers", "2"]) == 0
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["part-1-of-2.log", "part-2-of-2.log"]
    for concept in ("ember_star", "tide_circle"):
        for kind in ("samples/original", "samples/lora"):
            with np.load(one / kind / f"{concept}.npz") as a, np.load(two / kind / f"{concept}.npz") as b:
                for key in ("concept", "class", "unrelated"):
                    if key in a.files:  # one CPU thread against two: sums in another order, a pixel may move by 1
                        assert np.abs(a[key].astype(int) - b[key].astype(int)).max() <= 1, (concept, kind, key)
    records = [json.loads((d / "results.json").read_text())["records"] for d in (one, two)]
    assert len(records[0]) == len(records[1]) > 0
    assert [(r["concept"], r["kind"]) for r in records[0]] == [(r["concept"], r["kind"]) for r in records[1]]
    assert main([*common, "--out", str(two), "--part", "3/2"]) == 2
    assert "--part" in capsys.readouterr().err


def test_bench_context_in_two_processes_scores_every_concept(tmp_path):
    from pristine.cli import main

    out = tmp_path / "context"
    assert main(["bench", "context", "--rows", "lora,lora_dci", "--concepts", "ember_star,tide_circle", "--seeds", "1",
                 "--sample-steps", "2", "--train-steps", "2", "--out", str(out), "--workers", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    for row in ("lora", "lora_dci"):
        assert {r["concept"] for r in results["records"][row]} == {"ember_star", "tide_circle"}
    assert (out / "table.md").is_file() and len(list((out / "logs").iterdir())) == 2


def test_bench_steps_variants_are_checked_before_anything_is_written(tmp_path, capsys):
    from pristine.cli import main

    out = tmp_path / "steps"
    for methods, says in [("lora,purecc@nope=1", "nope"), ("lora,purecc@eta", "KEY=VALUE"),
                          ("lora,purecc@eta=x", "eta"), ("lora,magic@eta=1", "magic")]:
        assert main(["bench", "steps", "--methods", methods, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_authors_budgets_resolve_to_their_stated_settings(tmp_path):
    from pristine.eval.minibench import budget_settings
    from pristine.methods.lora import LoraConfig
    from pristine.methods.purecc import PureCCConfig
    from pristine.train import TrainConfig

    concepts = [{"images": str(tmp_path), "token": "<v1>", "class_word": "star"}]

    def resolved(entry):
        name, settings = budget_settings(entry)
        return TrainConfig.from_dict({**settings, "method": name, "out": str(tmp_path / "r"), "concepts": concepts})

    lora = resolved("lora_authors")
    assert (lora.method, lora.steps, lora.batch_size, lora.lr, lora.lr_scheduler, lora.weight_decay) == (
        "lora", 800, 4, 1e-4, "constant", 1e-4)
    args = LoraConfig.from_dict(lora.method_args)
    assert (args.rank, args.alpha, args.token_lr, args.train_token) == (4, 4, 5e-3, True)
    purecc = resolved("purecc_authors")
    args = PureCCConfig.from_dict(purecc.method_args)
    # stage 1: 400 steps, LoRA lr 1e-4, token lr 5e-3; stage 2: 800 steps at lr 1e-4, constant, weight decay 1e-4
    assert (args.stage1_steps, purecc.steps - args.stage1_steps, args.stage1_lr, args.token_lr) == (400, 800, 1e-4, 5e-3)
    assert (purecc.lr, purecc.lr_scheduler, purecc.weight_decay, purecc.batch_size) == (1e-4, "constant", 1e-4, 4)
    assert (args.rank, args.alpha, args.extractor_lora, args.base_branch) == (4, 4, False, "learner")
    # the lr 1e-3 budgets are still there beside them
    assert resolved("lora").lr == 1e-3 and resolved("purecc").lr == 1e-3
    preserve = resolved("lora_preserve")
    assert (preserve.preserve, preserve.preserve_weight, preserve.lr) == ("class", 1.0, 1e-3)
    assert resolved("lora_preserve_authors").preserve == "class"
    # BUDGET@KEY=VALUE: method settings and training settings, a row of its own
    anchored = resolved("purecc_authors@base_branch=original@lambda_mode=adaptive")
    assert anchored.method_args["base_branch"] == "original" and anchored.method_args["lambda_mode"] == "adaptive"
    assert resolved("purecc@extractor_lora=false").method_args["extractor_lora"] is False
    assert resolved("lora@preserve=unrelated@preserve_weight=0.5").preserve_weight == 0.5
    assert budget_settings("purecc_authors", 80)[1]["method_args"]["stage1_steps"] == 80


def test_a_list_valued_setting_keeps_its_commas_in_methods():
    """`--methods lora@targets=[to_q,conv1],dreambooth` is two rows, the first with both targets."""
    from pristine.cli import _bench_methods
    from pristine.eval.minibench import budget_settings

    entries = _bench_methods("lora@targets=[to_q,conv1]@rank=8, dreambooth")
    assert entries == ["lora@targets=[to_q,conv1]@rank=8", "dreambooth"]
    assert budget_settings(entries[0])[1]["method_args"] == {"rank": 8, "alpha": 4, "targets": ["to_q", "conv1"]}


def test_bench_mini_runs_budgets_with_changed_settings_as_their_own_rows(tmp_path, capsys):
    from pristine.cli import main

    out = tmp_path / "bench"
    methods = "lora_preserve,purecc_authors@base_branch=original,purecc_authors"
    assert main(["bench", "mini", "--methods", methods, "--concepts", "ember_star", "--out", str(out),
                 "--seeds", "1", "--sample-steps", "2", "--train-steps", "2"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == methods.split(",")
    assert results["settings"]["budgets"]["purecc_authors@base_branch=original"]["method_args"]["base_branch"] == "original"
    # the two PureCC rows differ in stage 2 only: one stage-1 run serves both, and each row trains stage 2
    stage1 = [p for p in (out / "runs").iterdir() if p.name.startswith("_stage1-")]
    assert len(stage1) == 1 and (stage1[0] / "ember_star" / "DONE").exists()
    for row, branch in (("purecc_authors@base_branch=original", "original"), ("purecc_authors", "learner")):
        saved = yaml.safe_load((out / "runs" / row / "ember_star" / "config.yaml").read_text())
        assert saved["method_args"]["stage"] == "2" and saved["steps"] == 2
        assert Path(saved["method_args"]["stage1_run"]) == stage1[0] / "ember_star"
        assert saved["method_args"].get("base_branch", "learner") == branch
        assert results["timings"][row]["ember_star"]["train_s"] >= float((stage1[0] / "ember_star" / "train_s.txt").read_text())
    log = [json.loads(line) for line in (out / "runs" / "lora_preserve" / "ember_star" / "log.jsonl").read_text().splitlines()]
    assert all("preserve" in r for r in log)
    for bad, says in (("lora@preserve=nofile.txt", "nofile.txt"), ("textual_inversion@preserve=class", "textual_inversion"),
                      ("purecc@base_branch=frozen", "base_branch")):
        assert main(["bench", "mini", "--methods", bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cached_pictures_are_keyed_by_the_model_weights(tmp_path, monkeypatch):
    """A re-trained part of pristine-mini (here one byte of the VAE) must not reuse pictures drawn by the old one."""
    import shutil
    from pathlib import Path

    from pristine import mini
    from pristine.eval import minibench

    for part in ("unet", "vae", "text_encoder"):
        shutil.copytree(Path(mini.path()) / part, tmp_path / part)
    monkeypatch.setattr(mini, "path", lambda: str(tmp_path))
    settings = minibench.BenchSettings(methods=["lora"], concepts=["ember_star"])
    before = minibench.bench_fingerprint(settings)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert minibench.bench_fingerprint(settings) != before


def test_a_bench_folder_refuses_runs_trained_on_another_base_model(tmp_path, monkeypatch):
    """Kept trainings are resumed; ones trained on a re-trained pristine-mini must not be scored as this one's."""
    import shutil
    from pathlib import Path

    from pristine import mini
    from pristine.errors import UsageError
    from pristine.eval import minibench

    for part in ("unet", "vae", "text_encoder"):
        shutil.copytree(Path(mini.path()) / part, tmp_path / "model" / part)
    monkeypatch.setattr(mini, "path", lambda: str(tmp_path / "model"))
    bench = tmp_path / "bench"
    minibench.claim_folder(bench)
    minibench.claim_folder(bench)  # the same model: resumes
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="another pristine-mini"):
        minibench.claim_folder(bench)


def test_a_finished_run_trained_with_other_settings_is_not_reused(tiny, star_images, tmp_path):
    """config.yaml holds the method's settings with defaults filled in, so a bench that finds a finished
    run knows when the row now means something else (a budget edited, a default changed since)."""
    from pristine.data import ConceptSpec
    from pristine.errors import UsageError
    from pristine.eval.minibench import train_unless_finished
    from pristine.methods import lora
    from pristine.train import TrainConfig

    def config(**method_args):
        return TrainConfig(out=str(tmp_path / "run"), model=str(tiny), method="lora", seed=0, resume="latest", steps=2,
                           batch_size=1, lr=1e-3, checkpoint_every=0, method_args={"rank": 4, **method_args},
                           concepts=[ConceptSpec(str(star_images), "<v1>", "star")])

    assert train_unless_finished(config()) is True
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method_args"]
    assert saved["rank"] == 4 and saved["alpha"] == lora.LoraConfig.alpha  # a default, written out
    assert train_unless_finished(config()) is False  # finished with these settings: kept
    with pytest.raises(UsageError, match=r"run: a finished run trained with method_args.rank 4, but this benchmark now trains 8; delete that folder"):
        train_unless_finished(config(rank=8))
    # a run trained when alpha's default was another: the file says so, and the row is not reused
    path = tmp_path / "run" / "config.yaml"
    text = yaml.safe_load(path.read_text())
    text["method_args"]["alpha"] = lora.LoraConfig.alpha + 1
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(UsageError, match="a finished run trained with method_args.alpha 5.0, but this benchmark now trains 4.0"):
        train_unless_finished(config())


def test_progress_of_a_bench_in_parts_counts_only_pictures_drawn_with_its_settings(tmp_path):
    """A bench re-run with other settings draws every piece again: its progress must not start at 100%."""
    from pristine.eval.minibench import _save_cached
    from pristine.eval.parts import pieces_drawn

    _save_cached(tmp_path / "samples" / "lora" / "a.npz", "old", {"images": [np.zeros((2, 2, 3), np.uint8)]})
    _save_cached(tmp_path / "samples" / "lora" / "b.npz", "new", {"images": [np.zeros((2, 2, 3), np.uint8)]})
    (tmp_path / "samples" / "lora" / "c.npz").write_bytes(b"PK\x03\x04 damaged")  # not a readable set
    assert pieces_drawn(tmp_path, ["lora"], ["a", "b", "c"], "(row, concept)") == "3 of 3 (row, concept) pieces drawn"
    assert pieces_drawn(tmp_path, ["lora"], ["a", "b", "c"], "(row, concept)", "new") == "1 of 3 (row, concept) pieces drawn"


def test_cached_pictures_older_than_their_run_are_drawn_again(tmp_path):
    """A run retrained by a process stopped before it drew again: the pictures on disk are an earlier model's."""
    import os

    from pristine.eval.minibench import _load_cached, _save_cached

    run, cached = tmp_path / "run", tmp_path / "samples" / "lora" / "a.npz"
    run.mkdir()
    (run / "DONE").write_text("")
    _save_cached(cached, "fp", {"images": [np.zeros((2, 2, 3), np.uint8)]})
    done_at = cached.stat().st_mtime
    os.utime(run / "DONE", (done_at - 10, done_at - 10))
    assert _load_cached(cached, "fp", run) is not None  # drawn after the run finished
    os.utime(run / "DONE", (done_at + 10, done_at + 10))
    assert _load_cached(cached, "fp", run) is None  # the run finished again after they were drawn
    assert _load_cached(cached, "fp") is not None  # pictures of no run (the original model's) are kept
