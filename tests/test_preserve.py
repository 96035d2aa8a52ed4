"""Output preservation (--preserve): the prompts it uses, its loss against the original model's prediction
(same weights, adapters off), where its gradient goes, and that the original weights never move."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pristine.cli import main  # noqa: E402
from pristine.data import ConceptSpec  # noqa: E402
from pristine.errors import UsageError  # noqa: E402
from pristine.methods.base import OutputPreservation, class_prompt, fixed_preservation_prompts  # noqa: E402

STAR = ConceptSpec("unused", "<v1>", "star")
HEART = ConceptSpec("unused", "<v2>", "heart")


def test_class_prompts_replace_the_token_by_the_class_word():
    assert class_prompt("a big <v1> star on the left, on grass", [STAR]) == "a big star on the left, on grass"
    assert class_prompt("<v1> on grass", [STAR]) == "star on grass"  # no class word after the token
    assert class_prompt("a <v1> star and a <v2> heart", [STAR, HEART]) == "a star and a heart"
    assert class_prompt("a photo of <v1>  stars", [STAR]) == "a photo of stars"


def test_unrelated_prompts_are_fixed_leave_the_class_out_and_are_not_minibench_prompts():
    from pristine.eval.minibench import UNRELATED, prompts_for
    from pristine.world.concepts import DEV_CONCEPTS

    every = fixed_preservation_prompts("unrelated", [])
    assert len(every) == len(set(every)) == 24
    assert fixed_preservation_prompts("unrelated", []) == every  # the same set every time
    for_star = fixed_preservation_prompts("unrelated", [STAR])
    assert for_star and all("star" not in p.split() for p in for_star) and len(for_star) < len(every)
    assert set(for_star) <= set(every)
    # nothing MiniBench measures pollution on is trained on
    benched = set(UNRELATED)
    for concept in DEV_CONCEPTS:
        benched |= set(prompts_for(concept)[2])  # the class prompts of pollution (b)
    assert not benched & set(every)


def test_prompts_file_lines_and_its_errors(tmp_path):
    f = tmp_path / "keep.txt"
    f.write_text("a red circle on grass\n\n  a blue square at night  \n")
    assert fixed_preservation_prompts(str(f), [STAR]) == ["a red circle on grass", "a blue square at night"]
    assert fixed_preservation_prompts("class", [STAR]) == []
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "token.txt").write_text("a red circle\na <v1> star\n")
    for source, words in ((tmp_path / "empty.txt", "no prompts"), (tmp_path / "token.txt", "token.txt:2"),
                          (tmp_path / "none.txt", "no such file"), (tmp_path, "a folder")):
        with pytest.raises(UsageError, match=words):
            fixed_preservation_prompts(str(source), [STAR], "flags.preserve")


def test_rows_skip_prior_images_and_walk_a_fixed_set_the_same_under_any_sharding():
    keep = OutputPreservation("file", 1.0, [f"p{i}" for i in range(5)])
    whole = {"prompts": ["a <v1> star"] * 4, "is_prior": torch.tensor([False] * 4), "step": 3, "global_size": 4,
             "positions": torch.arange(4)}
    rows, prompts = keep.rows(whole, [STAR])
    assert rows == [0, 1, 2, 3] and prompts == ["p2", "p3", "p4", "p0"]  # (3 * 4 + position) mod 5
    shards = []
    for rank in range(2):  # two processes with half the batch each pick what one process picks
        part = {**whole, "prompts": ["a <v1> star"] * 2, "is_prior": torch.tensor([False] * 2),
                "positions": torch.arange(2 * rank, 2 * rank + 2)}
        shards += keep.rows(part, [STAR])[1]
    assert shards == prompts
    classes = OutputPreservation("class", 1.0)
    batch = {"prompts": ["a <v1> star on grass", "a star"], "is_prior": torch.tensor([False, True])}
    assert classes.rows(batch, [STAR]) == ([0], ["a star on grass"])


def _setup(tiny, star_images, method, args=None, source="class"):
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, build_training_set, cache_latents
    from pristine.methods import get_method

    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(tiny))
    cls = get_method(method)
    m = cls(cls.Config.from_dict(args or {}), backbone, [spec])
    groups = m.setup()
    m.use_preservation(OutputPreservation.from_setting(source, 1.0, [spec]))
    data = build_training_set([ConceptImages.load(spec)], 32)
    cache_latents(data, backbone)
    return m, groups, data


def _batch(data, step):
    g = torch.Generator().manual_seed(step)
    batch = data.draw(3, g)
    batch["step"] = step
    return batch, g


@pytest.mark.parametrize("method", ["lora", "custom_diffusion"])
def test_preservation_is_zero_untrained_grows_with_training_and_keeps_the_original_weights(tiny, star_images, method):
    from pristine.backbones import load_backbone

    m, groups, data = _setup(tiny, star_images, method)
    denoiser = m.backbone.denoiser
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" not in n}
    trained = set(m.trainable_denoiser_params())
    losses = []
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    for step in range(4):
        batch, g = _batch(data, step)
        loss, logs = m.loss(batch, g)
        losses.append(logs["preserve"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # untrained (LoRA's up matrices are zero; Custom Diffusion's K/V as loaded) the trained model is the
    # original: zero up to the float rounding of a batch of another size
    assert losses[0] < 1e-10 and losses[-1] > 1e-4, losses
    for n, p in denoiser.named_parameters():
        if "lora_" in n:
            continue
        if n in trained:  # Custom Diffusion's K/V: trained, and not left at their loaded values by the swap
            assert not torch.equal(p, base[n]), n
        else:
            assert torch.equal(p, base[n]), n
    # the original's prediction is the loaded model's, and the trained model is back in place afterwards
    batch, g = _batch(data, 9)
    x0 = batch["latents"]
    t = m.backbone.sample_timesteps(len(x0), g)
    x_t = m.backbone.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    targets = m.preservation_targets(x_t, t, batch)
    fresh = load_backbone(str(tiny))
    with torch.no_grad():
        loaded = fresh.predict(targets["x"], targets["t"], targets["cond"])
        now = m.backbone.predict(targets["x"], targets["t"], targets["cond"])
    assert torch.equal(targets["original"], loaded)
    assert not torch.allclose(now, loaded, atol=1e-4)  # adapters back on, trained K/V back in place


@pytest.mark.parametrize("method", ["lora", "custom_diffusion", "purecc"])
def test_preservation_gradient_reaches_only_what_the_method_trains(tiny, star_images, method):
    args = {"stage1_steps": 1} if method == "purecc" else {}
    m, groups, data = _setup(tiny, star_images, method, args, source="unrelated")
    trainable = {id(p) for g in groups for p in g["params"]}
    adapted = dict(m.trainable_denoiser_params())
    with torch.no_grad():  # move the trained weights, so the preservation loss and its gradient are not zero
        for p in adapted.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if method == "purecc":
        from pristine.methods.purecc import LEARNER

        m.switch.use(LEARNER)
    batch, g = _batch(data, 0)
    x0 = batch["latents"]
    t = m.backbone.sample_timesteps(len(x0), g)
    x_t = m.backbone.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    targets = m.preservation_targets(x_t, t, batch)
    assert not targets["original"].requires_grad
    _, l_preserve = m.predict_preserving(x_t, t, m.encode(batch["prompts"]), targets)
    l_preserve.backward()
    assert l_preserve.item() > 0
    with_grad = {n for n, p in adapted.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad  # the adapter learns from it
    for module in (m.backbone.denoiser, *m.backbone.text_encoders, m.backbone.vae):
        for n, p in module.named_parameters():
            if id(p) not in trainable:
                assert p.grad is None, n
    # the token is not in the preservation prompts: nothing reaches its rows
    assert all(e.rows.grad is None or not e.rows.grad.any() for e in m.tokens.encoders)


def test_preserve_from_the_command_line_and_yaml_for_lora_and_purecc(tiny, star_images, tmp_path, capsys):
    common = ["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--lr", "1e-2"]
    run = tmp_path / "lora"
    assert main([*common, "--out", str(run), "--steps", "3", "--preserve", "class", "--preserve-weight", "0.5"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all("preserve" in r for r in log) and log[-1]["preserve"] > 0
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["preserve"] == "class" and saved["preserve_weight"] == 0.5
    # a resumed run may not change it
    assert main([*common, "--out", str(run), "--steps", "3", "--preserve", "unrelated", "--preserve-weight", "0.5",
                 "--resume", "latest"]) == 2
    assert "preserve" in capsys.readouterr().err
    prompts = tmp_path / "keep.txt"
    prompts.write_text("a red circle on grass\na blue square at night\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny), "method": "purecc", "out": str(tmp_path / "purecc"), "steps": 4, "lr": 1e-2,
        "preserve": str(prompts), "preserve_weight": 2.0,
        "method_args": {"stage1_steps": 2, "base_branch": "original", "base_preserve_weight": 0.5},
        "concepts": [{"images": str(star_images), "token": "<v1>", "class_word": "star"}]}))
    assert main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "purecc" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 1, 2, 2] and all("preserve" in r for r in log)
    assert all("l_base_preserve" in r for r in log[2:])


def test_train_config_parses_preserve_flags_and_keys(tmp_path, star_images):
    from pristine.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                                      "--out", str(tmp_path / "r"), "--preserve", "unrelated", "--preserve-weight", "0.25",
                                      "--method", "purecc", "--method-arg", "base_branch=original",
                                      "--method-arg", "extractor_lora=false"])
    config = train_config_from_args(args)
    assert (config.preserve, config.preserve_weight) == ("unrelated", 0.25)
    assert config.method_args == {"base_branch": "original", "extractor_lora": False}
    from pristine.methods.purecc import PureCCConfig

    parsed = PureCCConfig.from_dict(config.method_args)
    assert parsed.base_branch == "original" and parsed.extractor_lora is False
    off = train_config_from_args(build_parser().parse_args(["train", "--images", str(star_images), "--token", "<v1>",
                                                            "--class-word", "star", "--out", str(tmp_path / "r")]))
    assert off.preserve == "" and off.output_preservation() is None


def test_a_resumed_run_with_preservation_ends_where_an_unstopped_one_does(tiny, star_images, tmp_path, capsys):
    """Custom Diffusion trains its K/V in place: the values preservation puts back must be the loaded
    ones even when a run resumes with trained K/V from a checkpoint."""
    from safetensors.torch import load_file

    common = ["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--method", "custom_diffusion", "--lr", "1e-2", "--steps", "4", "--checkpoint-every", "2",
              "--preserve", "unrelated", "--preserve-weight", "4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    b = tmp_path / "b"
    outputs = ("custom_diffusion.safetensors", "learned_embeds.safetensors")
    for name in ("DONE", *outputs):
        (b / name).unlink()
    (b / "checkpoints" / "step_0000004.safetensors").unlink()  # killed after step 2
    assert main([*common, "--out", str(b), "--resume", "latest"]) == 0, capsys.readouterr().err
    for name in outputs:
        x, y = load_file(str(tmp_path / "a" / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    logs = [[json.loads(line)["preserve"] for line in (run / "log.jsonl").read_text().splitlines()] for run in
            (tmp_path / "a", b)]
    assert logs[0] == logs[1] and logs[0][-1] > 0
