"""SPF (METHODS.md 2): the control map on known maps, gradients through the capture, phrase positions,
zero losses on identical paths, incremental runs, stages that chain and resume."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from pristine.cli import main  # noqa: E402
from pristine.methods.spf import (enhancement_loss, fine_control_map, phrase_maps, query_loss, selection,  # noqa: E402
                                  text_consistency_loss)
from pristine.phrases import phrase_positions, prompt_words, remove_phrase  # noqa: E402


@pytest.fixture(scope="module")
def zigzag(tmp_path_factory):
    from pristine.world.export import write_renders

    return write_renders(tmp_path_factory.mktemp("zigzag"), n=6, part="attribute:zigzag")


@pytest.fixture(scope="module")
def gradient(tmp_path_factory):
    from pristine.world.export import write_renders

    return write_renders(tmp_path_factory.mktemp("gradient"), n=6, part="attribute:gradient")


@pytest.fixture(scope="module")
def mini_tokenizer():
    from transformers import CLIPTokenizer

    import pristine.mini as mini

    return CLIPTokenizer.from_pretrained(str(Path(mini.MODEL_DIR) / "tokenizer"), local_files_only=True)


def _spf(model, images, token, **settings):
    """An SPF method set up on a model (no training loop)."""
    from pristine.backbones import load_backbone
    from pristine.data import ConceptSpec
    from pristine.methods import get_method

    cls = get_method("spf")
    method = cls(cls.Config.from_dict(settings), load_backbone(str(model)), [ConceptSpec(str(images), token, "pattern")])
    method.setup()
    return method


# ---- the control map and the losses on tensors whose values are known ----------------------------


def test_control_map_on_known_maps():
    # the predictions differ by 2 on the left half and by 1 on the right half of a 4x4 latent
    f_ref = torch.zeros(1, 4, 4, 4)
    f_res = f_ref.clone()
    f_res[..., :2] = 2.0
    f_res[..., 2:] = 1.0
    # phrase 0 attends to the top-left quadrant, phrase 1 to the bottom row; phrase 2 is padding
    attention = torch.zeros(1, 3, 4, 4)
    attention[0, 0, :2, :2] = 1.0
    attention[0, 1, 3, :] = 0.5
    distances = torch.tensor([[0.25, 0.8, 0.0]])
    m = fine_control_map(f_res, f_ref, attention, distances)
    expected = torch.tensor([[1.0, 1.0, 0.5, 0.5]] * 4)  # the difference, scaled to its maximum
    expected[:2, :2] -= 0.25  # minus D · A of phrase 0
    expected[3, :] -= 0.4  # minus D · A of phrase 1
    assert torch.allclose(m[0], expected.clamp(0, 1))
    assert not m.requires_grad


def test_phrase_maps_sum_a_phrase_over_its_tokens_and_keep_the_probabilities():
    # one layer at the latent's 4x4 resolution, 2 heads, 6 tokens; a two-token phrase at positions 2 and 3
    maps = torch.zeros(1, 2, 16, 6)
    maps[..., 0] = 1.0  # everything on the start token ...
    maps[0, :, 5, 0], maps[0, :, 5, 2], maps[0, :, 5, 3] = 0.2, 0.5, 0.3  # ... but pixel (1, 1) on the phrase
    maps[0, 0, 6, 0], maps[0, 0, 6, 2] = 0.8, 0.2  # pixel (1, 2): one head puts 0.2 on the phrase
    sel, valid = selection([[[2, 3]]], 6)
    a = phrase_maps({"layer": maps}, sel, (4, 4))
    expected = torch.zeros(4, 4)
    expected[1, 1], expected[1, 2] = 0.8, 0.1  # summed over the phrase's tokens, mean over heads, not rescaled
    assert torch.allclose(a[0, 0], expected, atol=1e-6) and valid.tolist() == [[1.0]]


def test_losses_weigh_by_one_minus_the_control_map():
    maps_ref = {"l": torch.full((1, 1, 4, 3), 1 / 3)}
    maps_res = {"l": maps_ref["l"].clone()}
    maps_res["l"][0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # pixel 0 moved its attention to token 1
    sel, valid = selection([[[1], [2]]], 3)
    control = torch.zeros(1, 2, 2)
    # slot 0 (token 1) changes by 2/3 at pixel 0, slot 1 by 1/3: mean over 4 pixels x 2 slots
    full = ((2 / 3) ** 2 + (1 / 3) ** 2) / 8
    assert text_consistency_loss(maps_res, maps_ref, sel, sel, valid, control).item() == pytest.approx(full)
    control[0, 0, 0] = 1.0  # M = 1 where the attribute acts: that pixel is free to change
    assert text_consistency_loss(maps_res, maps_ref, sel, sel, valid, control).item() == pytest.approx(0.0)
    q_ref = {"l": torch.zeros(1, 4, 2)}
    q_res = {"l": torch.ones(1, 4, 2)}
    assert query_loss(q_res, q_ref, torch.zeros(1, 2, 2)).item() == pytest.approx(1.0)
    assert query_loss(q_res, q_ref, control).item() == pytest.approx(0.75)
    # the image change along the text change: 0; against it: 2; no text change: nothing to follow
    t0, t1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert enhancement_loss(t1 * 3, t0, t1, t0).item() == pytest.approx(0.0)
    assert enhancement_loss(-t1, t0, t1, t0).item() == pytest.approx(2.0)
    assert enhancement_loss(-t1, t0, t1, t1).item() == 0.0


# ---- phrases and token positions ------------------------------------------------------------------


@pytest.mark.parametrize("prompt,count", [
    ("a big red zigzag star on the left, on grass", 1),
    ("on grass, a zigzag star", 1),
    ("there is a small Zigzag heart near the top at night", 1),
    ("a cartoon of a zigzag circle and a striped square, on wood", 1),
    ("a zigzag star on the left and a small zigzag heart on the right", 2),
    ("a star, zigzag style", 1),
])
def test_phrase_positions_hold_the_phrase_s_tokens(mini_tokenizer, prompt, count):
    ids = mini_tokenizer(prompt).input_ids  # start token first, as the text encoder reads it
    positions = phrase_positions(mini_tokenizer, prompt, "zigzag")
    pieces = mini_tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
    assert len(positions) == 2 * count  # BPE splits the word in two: "zig", "zag</w>"
    assert "".join(pieces).replace("</w>", " ").split() == ["zigzag"] * count
    for word in prompt_words(mini_tokenizer, prompt):  # every word's tokens spell it
        spelled = "".join(mini_tokenizer.convert_ids_to_tokens([ids[p] for p in word.positions])).replace("</w>", "")
        assert spelled == word.text
    assert phrase_positions(mini_tokenizer, prompt, "gradient") == []


def test_multi_word_phrases_and_removal(mini_tokenizer):
    prompt = "a big blue polka dot square on the right"
    ids = mini_tokenizer(prompt).input_ids
    positions = phrase_positions(mini_tokenizer, prompt, "polka dot")
    assert mini_tokenizer.convert_ids_to_tokens([ids[p] for p in positions]) == ["polka</w>", "dot</w>"]
    assert remove_phrase(prompt, "polka dot") == "a big blue square on the right"
    assert remove_phrase("a zigzag orange star, on grass", "zigzag") == "an orange star, on grass"
    assert remove_phrase("on sand, an egg-shell zigzag heart", "egg-shell") == "on sand, a zigzag heart"
    assert remove_phrase("a star, zigzag style", "zigzag") == "a star, style"
    assert remove_phrase("zigzagged lines", "zigzag") == "zigzagged lines"  # whole words only


# ---- the method on real models --------------------------------------------------------------------


def test_capture_gradients_reach_only_the_trainable_parameters(tiny, zigzag):
    method = _spf(tiny, zigzag, "zigzag")
    bb = method.backbone
    trainable = {id(p) for p in method.trainable_denoiser_params().values()}
    with torch.no_grad():  # a learner that is not zero, so every factor gets a gradient
        for p in method.trainable_denoiser_params().values():
            p.normal_(0, 0.1)
    cond = bb.encode_prompts(["a big red zigzag star on the left", "a big red star on the left"])
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    with torch.no_grad(), method.original_weights():
        _, maps_ref, q_ref = method._captured_forward(x, t, {k: v[1:].expand(2, -1, -1) for k, v in cond.items()})
    pred, maps, queries = method._captured_forward(x, t, cond)
    assert set(maps) == set(bb.cross_attention_layers()) == set(queries)
    assert all(m.grad_fn is None for m in maps_ref.values()) and all(q.grad_fn is None for q in q_ref.values())
    positions = bb.phrase_positions("a big red zigzag star on the left", "zigzag")
    loss = sum(m[0, :, :, positions].sum() for m in maps.values()) + sum(q.pow(2).mean() for q in queries.values())
    loss.backward()
    with_grad = [n for n, p in bb.denoiser.named_parameters() if p.grad is not None]
    assert with_grad and all(id(dict(bb.denoiser.named_parameters())[n]) in trainable for n in with_grad)
    assert all(".attn2." in n and ".learner." in n for n in with_grad)
    assert any(p.grad.abs().sum() > 0 for p in method.trainable_denoiser_params().values())
    assert not any(p.grad is not None for enc in bb.text_encoders for p in enc.parameters())


def test_every_alignment_loss_is_zero_when_both_paths_are_identical(zigzag):
    method = _spf("mini", zigzag, "zigzag")  # the learner starts at zero: both paths have the same weights
    assert method.clip is not None  # pristine-mini ships its CLIP
    bb = method.backbone
    caption = "a big red zigzag star on the left, on grass"
    torch.manual_seed(0)  # the noise and the moved weights below: the same in any test order
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 400])

    def terms(captions, bases):
        with torch.no_grad():
            cond_res, cond_ref = bb.encode_prompts(captions), bb.encode_prompts(bases)
            with method.original_weights():
                f_ref, maps_ref, q_ref = method._captured_forward(x, t, cond_ref)
            f_res, maps_res, q_res = method._captured_forward(x, t, cond_res)
            out = method.alignment_terms(x, t, f_res, f_ref, maps_res, maps_ref, q_res, q_ref, captions, bases,
                                         ["zigzag"] * 2, bb.text_token_states(cond_res), bb.text_token_states(cond_ref))
        return {k: v.item() for k, v in out.items()}, method.last_control

    same, control = terms([caption] * 2, [caption] * 2)
    assert same == {"text": 0.0, "query": 0.0, "enhance": 0.0} and control.abs().max() == 0
    # the same weights with the base caption on the reference path: the text differs, so do the maps
    base = remove_phrase(caption, "zigzag")
    assert terms([caption] * 2, [base] * 2)[0]["text"] > 0
    with torch.no_grad():  # and other weights on the response path
        for p in method.trainable_denoiser_params().values():
            p.normal_(0, 0.2)
    moved, control = terms([caption] * 2, [caption] * 2)
    # (the control map itself may stay zero: per METHODS.md it subtracts D * A of every base phrase,
    # which on pristine-mini v2's text encoder can cover the whole difference; its formula is tested above)
    assert moved["text"] > 0 and moved["query"] > 0, moved


def test_stages_chain_and_resume(tiny, zigzag, tmp_path, capsys):
    common = ["--model", str(tiny), "--images", str(zigzag), "--token", "zigzag", "--class-word", "pattern",
              "--method", "spf", "--lr", "1e-2"]
    both = tmp_path / "both"
    assert main(["train", *common, "--out", str(both), "--steps", "4", "--method-arg", "stage1_steps=2",
                 "--checkpoint-every", "1"]) == 0
    log = [json.loads(line) for line in (both / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 1, 2, 2]
    assert all(k in log[-1] for k in ("l_text", "l_query", "l_enhance", "l_denoise"))
    # killed after step 3 (a stage-2 step): resumed, it ends with the weights of the run never stopped
    cut = tmp_path / "cut"
    shutil.copytree(both, cut)
    for name in ("DONE", "pytorch_lora_weights.safetensors", "spf_learner.safetensors",
                 "checkpoints/step_0000004.safetensors"):
        (cut / name).unlink()
    assert main(["train", *common, "--out", str(cut), "--steps", "4", "--method-arg", "stage1_steps=2",
                 "--checkpoint-every", "1", "--resume", "latest"]) == 0
    a, b = load_file(str(both / "spf_learner.safetensors")), load_file(str(cut / "spf_learner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stage1 = tmp_path / "s1"
    assert main(["train", *common, "--out", str(stage1), "--steps", "2", "--stage", "1"]) == 0
    method = _spf(tiny, zigzag, "zigzag", stage="2", stage1_run=str(stage1))  # stage 2 starts from stage 1's weights
    saved = load_file(str(stage1 / "spf_learner.safetensors"))
    assert all(torch.equal(p, saved[k]) for k, p in method.trainable_denoiser_params().items())
    stage2 = tmp_path / "s2"
    assert main(["train", *common, "--out", str(stage2), "--steps", "2", "--stage", "2", "--stage1-run", str(stage1)]) == 0
    assert [json.loads(line)["stage"] for line in (stage2 / "log.jsonl").read_text().splitlines()] == [2, 2]
    capsys.readouterr()
    assert main(["train", *common, "--out", str(tmp_path / "s3"), "--steps", "1", "--stage", "2", "--stage1-run",
                 str(stage1), "--method-arg", "train=full"]) == 2
    assert "train" in capsys.readouterr().err and not (tmp_path / "s3").exists()


def _effective(unet_state, base_state):
    return {k: unet_state[k] - base_state[k] for k in base_state if not torch.equal(unet_state[k], base_state[k])}


def _fused_unet(model, run=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    if run is not None:
        pipe.load_lora_weights(str(run))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("targets", [None, ["to_k", "to_v", "conv1"]])
def test_incremental_run_keeps_the_first_adapter_and_writes_one_lora(tiny, zigzag, gradient, tmp_path, targets):
    """Also with LoRA on resnet convolutions beside cross-attention (their factors are 4-d)."""
    from pristine.lora_factors import adapter_factors
    from pristine.sample import load_pipeline

    first, second = tmp_path / "zigzag", tmp_path / "gradient"
    args = ["--model", str(tiny), "--method", "spf", "--class-word", "pattern", "--lr", "1e-2", "--steps", "3",
            "--method-arg", "stage1_steps=1"]
    if targets:
        args += ["--method-arg", f"targets=[{','.join(targets)}]"]
    assert main(["train", *args, "--images", str(zigzag), "--token", "zigzag", "--out", str(first)]) == 0
    assert main(["train", *args, "--images", str(gradient), "--token", "gradient", "--out", str(second),
                 "--init-run", str(first)]) == 0
    base = _fused_unet(tiny)
    d_first, d_both = _effective(_fused_unet(tiny, first), base), _effective(_fused_unet(tiny, second), base)
    # the second run's own change, from its saved learner
    method = _spf(tiny, gradient, "gradient", stage="2", stage1_run=str(second), init_run=str(first),
                  **({"targets": targets} if targets else {}))
    own = adapter_factors(method.backbone.denoiser, "learner")
    assert own and set(d_both) == {f"{n}.weight" for n in own}  # only the targeted layers moved
    assert any(n.endswith("conv1") for n in own) == bool(targets)
    for name, f in own.items():
        key = f"{name}.weight"
        expected = d_first.get(key, 0) + f.delta()
        assert torch.allclose(d_both[key], expected, atol=1e-5), key
        assert f.delta().abs().max() > 0  # the second attribute did train
    # the setup merged the first run into the base weights: the reference path is the first run's model
    merged = {k: v for k, v in method.backbone.denoiser.state_dict().items() if ".base_layer." in k}
    for key, delta in d_first.items():
        module = key[: -len(".weight")]
        assert torch.allclose(merged[f"{module}.base_layer.weight"], base[key] + delta, atol=1e-5)
    from pristine.sample import generate

    # what `pristine sample --adapter` loads, and what a diffusers user loads
    assert generate(load_pipeline(str(tiny), str(second)), ["a gradient star"], [0], steps=2)[0].std() > 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(second), weight_name="pytorch_lora_weights.safetensors")
    pipe("a gradient star", num_inference_steps=2, output_type="np")


def test_full_cross_attention_run_writes_its_exact_change_as_a_lora(tiny, zigzag, tmp_path):
    run = tmp_path / "full"
    assert main(["train", "--model", str(tiny), "--images", str(zigzag), "--token", "zigzag", "--class-word", "pattern",
                 "--method", "spf", "--lr", "1e-3", "--steps", "2", "--method-arg", "stage1_steps=1",
                 "--method-arg", "train=full", "--out", str(run)]) == 0
    base = _fused_unet(tiny)
    trained = load_file(str(run / "spf_learner.safetensors"))
    assert trained and all(".attn2." in k for k in trained)
    loaded = _fused_unet(tiny, run)
    for key, weight in trained.items():
        assert not torch.equal(weight, base[key])
        assert torch.allclose(loaded[key], weight, atol=1e-5), key
    assert not _effective(loaded, {k: v for k, v in base.items() if k not in trained})
    # a full run on top of it: the first run's change is merged in first and kept in the written LoRA
    second = tmp_path / "full_on_top"
    assert main(["train", "--model", str(tiny), "--images", str(zigzag), "--token", "zigzag", "--class-word", "pattern",
                 "--method", "spf", "--lr", "1e-3", "--steps", "2", "--method-arg", "stage1_steps=1",
                 "--method-arg", "train=full", "--init-run", str(run), "--out", str(second)]) == 0
    trained_on_top = load_file(str(second / "spf_learner.safetensors"))
    assert trained_on_top and all(k.endswith(".base_layer.weight") for k in trained_on_top)  # under the read adapter's wrapper
    loaded = _fused_unet(tiny, second)
    for key, weight in trained_on_top.items():
        plain = key.replace(".base_layer", "")
        assert not torch.allclose(weight, trained[plain])  # it moved on from the first run
        assert torch.allclose(loaded[plain], weight, atol=1e-5), plain


def test_a_family_without_capture_says_so(tmp_path, zigzag):
    from tiny_families import build_tiny_sd3

    from pristine.errors import UsageError

    model = build_tiny_sd3(tmp_path / "sd3")
    with pytest.raises(UsageError, match="no cross-attention capture"):
        _spf(model, zigzag, "zigzag")
    _spf(model, zigzag, "zigzag", stage="1")  # ordinary fine-tuning needs no capture


# ---- MiniBench's attribute task ---------------------------------------------------------------------


def test_attribute_scoring_on_the_world_s_own_renders():
    import pristine.mini as mini
    from pristine.eval.minibench_attribute import prompts_for_word, score_attribute
    from pristine.world import render

    oracle = mini.load_oracle()
    scenes, prompts, bases = prompts_for_word("zigzag")
    assert all("zigzag" in p for p in prompts) and not any("zigzag" in b for b in bases)
    assert [remove_phrase(p, "zigzag") for p in prompts] == bases
    from dataclasses import replace

    solid = [replace(s, objects=(replace(s.objects[0], pattern="solid"), *s.objects[1:])) for s in scenes]
    drawn, plain = [render(s)[0] for s in scenes], [render(s)[0] for s in solid]
    asked = score_attribute(oracle, "zigzag", scenes, [0], drawn, plain)
    assert sum(r["response"] for r in asked) >= len(scenes) - 1  # the oracle reads the pattern drawn
    assert sum(r["preservation_stated_error"] for r in asked) <= 1
    assert sum(r["preservation_original_error"] for r in asked) <= 1  # only the pattern differs from the base
    unasked = score_attribute(oracle, "zigzag", scenes, [0], plain, plain)
    assert sum(r["response"] for r in unasked) == 0
    assert all(r["preservation_original_error"] == 0 for r in unasked)  # a picture against itself


def test_attribute_bench_runs_end_to_end_at_tiny_scale(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "attribute", "--rows", "lora,spf_no_query,spf_incremental", "--out", str(out), "--seeds", "1",
                 "--sample-steps", "2", "--images", "4", "--train-steps", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"lora", "spf_no_query", "spf_incremental", "original"}
    assert "retention" in summary["spf_incremental"] and "retention_ratio" in summary["spf_incremental"]
    assert summary["lora"]["response"]["n"] == 2 * 6  # two words x six prompts x one seed
    assert summary["spf_incremental"]["response"]["n"] == 6  # the second word only
    import yaml

    config = yaml.safe_load((out / "runs" / "spf_incremental" / "gradient" / "config.yaml").read_text())
    assert Path(config["method_args"]["init_run"]) == out / "runs" / "spf" / "zigzag"
    assert "spf_incremental" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["bench", "attribute", "--rows", "magic", "--out", str(tmp_path / "x")]) == 2
    assert "--rows" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_clip_that_does_not_see_the_phrase_is_named_before_training(tmp_path, capsys):
    """pristine-mini's CLIP never learnt its held-out pattern words: on their pictures it prefers the
    caption without the word, so the enhancement loss would pull away from it. A word it knows passes."""
    from pristine import mini
    from pristine.data import ConceptImages, build_training_set
    from pristine.world.export import write_renders

    def prepared(images, token, **settings):  # what training does before its first step
        method = _spf(mini.MODEL_DIR, images, token, **settings)
        method.prepare(build_training_set([ConceptImages.load(method.concepts[0])], 32))

    held_out = write_renders(tmp_path / "zigzag", n=24, part="attribute:zigzag")
    known = write_renders(tmp_path / "known", n=80, part="pretraining")
    lines = (known / "metadata.jsonl").read_text().splitlines()
    red = [line for line in lines if " red " in json.loads(line)["text"]]
    (known / "metadata.jsonl").write_text("\n".join(red) + "\n")  # training takes captions naming the word
    for line in set(lines) - set(red):
        (known / json.loads(line)["file_name"]).unlink()
    prepared(held_out, "zigzag")
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "prefers the captions without" in line]
    assert len(warned) == 1 and "'zigzag'" in warned[0] and "enhance_weight=0" in warned[0]
    prepared(known, "red")
    assert "prefers" not in capsys.readouterr().err
    prepared(held_out, "zigzag", enhance_weight=0)  # the term off: nothing to warn of
    assert "prefers" not in capsys.readouterr().err
