"""MiniBench's multi-concept task: the oracle's per-place outcomes, and a run end to end at tiny scale."""

import json

import pytest

import pristine.mini as mini
from pristine.eval.minibench_multi import MultiSettings, group_prompts, group_set, judge, run_multi
from pristine.world import render
from pristine.world.concepts import get_concept
from pristine.world.scene import Scene

STAR, CIRCLE = get_concept("ember_star"), get_concept("tide_circle")  # red/yellow dot star; blue/cyan band circle


def _reading(**at):
    return {"objects": [{"position": p, "shape": s, "color": c, "marking": m, "accent": a}
                        for p, (s, c, m, a) in at.items()], "background": "grass", "style": "plain"}


@pytest.mark.parametrize("left, outcome", [
    (("star", "red", "dot", "yellow"), "right"),
    (("circle", "blue", "band", "cyan"), "swapped"),  # the other concept at the star's place
    (("star", "blue", "band", "cyan"), "swapped"),  # the other's markings on a star
    (("star", "blue", "dot", "yellow"), "leaked"),  # the star's dot, the circle's body colour
    (("circle", "red", "dot", "yellow"), "leaked"),  # the star's markings on the other's shape
    (("hexagon", "red", "dot", "yellow"), "missing"),  # the markings on a third shape: the star was not drawn
    (("square", "green", "none", "red"), "missing"),
    (None, "missing"),
])
def test_outcomes_per_asked_concept(left, outcome):
    reading = _reading(**({"left": left} if left else {}), right=("circle", "blue", "band", "cyan"))
    assert judge(reading, STAR, "left", [CIRCLE]) == outcome
    assert judge(reading, CIRCLE, "right", [STAR]) == "right"


def test_the_oracle_reads_rendered_truth_as_right_and_a_swap_as_swapped():
    oracle = mini.load_oracle()
    asked, swapped = [], []
    for seed in range(6):
        background = ("grass", "night", "white")[seed % 3]
        scene = Scene((STAR.object("left"), CIRCLE.object("right")), background, "plain", seed)
        other = Scene((STAR.object("right"), CIRCLE.object("left")), background, "plain", seed)
        r, s = oracle.read([render(scene)[0], render(other)[0]])
        asked += [judge(r, STAR, "left", [CIRCLE]), judge(r, CIRCLE, "right", [STAR])]
        swapped += [judge(s, STAR, "left", [CIRCLE]), judge(s, CIRCLE, "right", [STAR])]
    assert asked.count("right") >= 10, asked
    assert swapped.count("swapped") >= 10, swapped


def test_prompts_name_every_token_at_its_place():
    group = group_set("tide_circle+sunset_heart+royal_hexagon")[0]
    prompts, places = group_prompts(group)
    assert len(prompts) == 4 and all(all(t in p for t in ("<v1>", "<v2>", "<v3>")) for p in prompts)
    assert prompts[0].startswith("a small <v1> circle on the left and a small <v2> heart on the right")
    assert places[0] == ("left", "right", "top")
    with pytest.raises(KeyError):
        group_set("ember_star+ember_star")


def test_multi_bench_runs_end_to_end_at_tiny_scale(tmp_path):
    settings = MultiSettings(["lora", "clif"], group_set("quick"), seeds=1, sample_steps=2, train_steps=2)
    table = run_multi(tmp_path, settings)
    results = json.loads((tmp_path / "results.json").read_text())
    multi = [r for r in results["records"] if r["kind"] == "multi"]
    # 4 joint prompts x 1 seed x 2 asked concepts per row, each with exactly one outcome
    assert len(multi) == 2 * 4 * 2 and all(sum(r[o] for o in ("right", "swapped", "leaked", "missing")) == 1 for r in multi)
    assert {r["concept"] for r in results["records"] if r["kind"] == "single"} == {"ember_star", "tide_circle"}
    assert json.loads((tmp_path / "runs" / "clif" / "ember_star+tide_circle" / "log.jsonl").read_text().splitlines()[0])["stage"] == 1
    assert "confusion" in table.read_text() and (tmp_path / "grids" / "ember_star+tide_circle.png").is_file()


def test_multi_bench_in_two_processes_scores_every_group(tmp_path):
    from pristine.cli import main

    groups = "ember_star+tide_circle,mint_square+sunset_heart"
    assert main(["bench", "multi", "--methods", "lora", "--groups", groups, "--seeds", "1", "--sample-steps", "2",
                 "--train-steps", "2", "--out", str(tmp_path), "--workers", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["group"] for r in results["records"]} == set(groups.split(","))
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["part-1-of-2.log", "part-2-of-2.log"]
