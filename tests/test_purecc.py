import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pristine.cli import main  # noqa: E402
from pristine.methods.purecc import adaptive_lambda, derive_prompts, purecc_losses  # noqa: E402


def test_loss_pieces_match_hand_computed_values():
    pred_c = torch.tensor([[1.0, 2.0]])
    pred_b = torch.tensor([[0.0, 1.0]])
    r = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[1.0, 1.0]])
    loss, logs = purecc_losses(pred_c, pred_b, target, r, eta=2.0, lam=1.0)
    # L_CC = mean(0², 1²) = 0.5 ; L_PureCC = mean((1-1)², (2-1)²) = 0.5 ; L = 0.5 + 2 * 0.5
    assert logs["l_cc"] == pytest.approx(0.5) and logs["l_pure"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(1.5)
    loss_half, _ = purecc_losses(pred_c, pred_b, target, r, eta=2.0, lam=0.5)
    # with λ = 0.5: L_PureCC = mean(0.5², 1²) = 0.625
    assert loss_half.item() == pytest.approx(0.5 + 2 * 0.625)


def test_adaptive_lambda_is_the_clamped_projection():
    r = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    delta = torch.tensor([[0.5, 9.0], [0.0, 8.0], [-1.0, -1.0], [1.0, 1.0]])
    lam = adaptive_lambda(delta, r, lambda_max=2.0)
    # <Δ,R>/||R||²: 0.5 ; 16/4 = 4 -> clamped to 2 ; -2/2 -> clamped to 0 ; R = 0 -> 0
    assert torch.allclose(lam, torch.tensor([0.5, 2.0, 0.0, 0.0]))
    loss, logs = purecc_losses(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), r, 1.0, lam)
    assert logs["lambda"] == pytest.approx(0.625)


def test_prompts_are_derived_from_captions():
    assert derive_prompts("a big <v1> star on the left, on grass", "<v1>", "star") == (
        "a big <v1> star on the left, on grass", "a big star on the left, on grass", "<v1> star")


def test_two_stages_in_one_run_then_stage_two_alone(tiny, star_images, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    base_unet = {k: v.clone() for k, v in StableDiffusionPipeline.from_pretrained(str(tiny)).unet.state_dict().items()}
    common = ["--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--method", "purecc", "--lr", "1e-2"]
    run = tmp_path / "both"
    assert main(["train", *common, "--out", str(run), "--steps", "4", "--method-arg", "stage1_steps=2",
                 "--method-arg", "lambda_mode=adaptive"]) == 0
    import json

    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 1, 2, 2] and all("lambda" in r for r in log[2:])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    pipe.load_lora_weights(str(run))
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"), token="<v1>")
    pipe("a photo of <v1> star", num_inference_steps=2, output_type="np")
    # the base weights in the saved LoRA-free model are untouched by adapter switching
    unet = StableDiffusionPipeline.from_pretrained(str(tiny)).unet.state_dict()
    assert all(torch.equal(unet[k], base_unet[k]) for k in base_unet)

    stage1 = tmp_path / "s1"
    assert main(["train", *common, "--out", str(stage1), "--steps", "2", "--stage", "1"]) == 0
    stage2 = tmp_path / "s2"
    assert main(["train", *common, "--out", str(stage2), "--steps", "2", "--stage", "2", "--stage1-run", str(stage1)]) == 0
    # stage 2 keeps the stage-1 token and extractor exactly
    assert torch.equal(load_file(str(stage1 / "learned_embeds.safetensors"))["<v1>"],
                       load_file(str(stage2 / "learned_embeds.safetensors"))["<v1>"])
    e1, e2 = load_file(str(stage1 / "extractor_lora.safetensors")), load_file(str(stage2 / "extractor_lora.safetensors"))
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    out, err = capsys.readouterr()
    assert main(["train", *common, "--out", str(tmp_path / "s3"), "--method-arg", "stage=2"]) == 2
    assert "stage1_run" in capsys.readouterr().err
    lora = [a if a != "purecc" else "lora" for a in common]
    assert main(["train", *lora, "--out", str(tmp_path / "s4"), "--stage", "1"]) == 2  # not a LoRA setting
    assert "stage" in capsys.readouterr().err and not (tmp_path / "s4").exists()


def test_step_cost_measures_each_method_in_its_own_process(tiny, star_images, tmp_path):
    from pristine.eval.stepcost import run

    methods = {"lora": {"method": "lora"}, "purecc": {"method": "purecc"},
               "lora_preserve": {"method": "lora", "preserve": "class", "preserve_weight": 0.5}}
    results = run(methods, str(star_images), "<v1>", "star", tmp_path, model=str(tiny), steps=3, batch_size=2, repeats=1)
    assert (tmp_path / "stepcost.json").is_file() and (tmp_path / "purecc_stage1" / "DONE").is_file()
    for r in results.values():
        assert r["s_per_step"] > 0 and r["peak_bytes_process"] > 0 and r["peak_bytes_above_loaded"] >= 0
    assert results["lora"]["time_vs_first"] == 1.0 and len(results["purecc"]["rounds"]) == 1
    assert len(results["purecc"]["rounds"][0]["paired_s"]) == 3
    assert results["purecc"]["method_args"]["stage"] == "2"  # stage 2 is what was timed
    assert results["lora_preserve"]["preserve"] == "class" and results["lora"]["preserve"] == ""


def test_adapter_switching_leaves_base_weights_bit_identical(tiny, star_images):
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods.purecc import EXTRACTOR, LEARNER, PureCC, PureCCConfig
    from pristine.methods.lora import lora_params

    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(tiny))
    m = PureCC(PureCCConfig(stage1_steps=2), backbone, [spec])
    groups = m.setup()
    base = {n: p.detach().clone() for n, p in backbone.unet.named_parameters() if "lora_" not in n}
    text = {n: p.detach().clone() for n, p in backbone.text_encoder.named_parameters()}
    data = build_training_set([ConceptImages.load(spec)], 32)
    cache_latents(data, backbone)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    snapshots = {}
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        batch = data.draw(2, g)
        batch["step"] = step
        loss, logs = m.loss(batch, g)
        assert logs["stage"] == (1 if step < 2 else 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (1, 3):
            snapshots[step] = {a: {k: v.detach().clone() for k, v in lora_params(backbone.unet, a).items()}
                               for a in (EXTRACTOR, LEARNER)}
    for n, p in backbone.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert all(torch.equal(p, text[n]) for n, p in backbone.text_encoder.named_parameters())
    s1, s2 = snapshots[1], snapshots[3]
    # stage 2 trains the learner only; the extractor stays as stage 1 left it
    assert all(torch.equal(s1[EXTRACTOR][k], s2[EXTRACTOR][k]) for k in s1[EXTRACTOR])
    assert any(not torch.equal(s1[LEARNER][k], s2[LEARNER][k]) for k in s1[LEARNER])


def test_per_image_prompts_override_the_derived_ones(tmp_path, star_images):
    import json
    import shutil

    from pristine.data import ConceptImages, ConceptSpec
    from pristine.errors import UsageError
    from pristine.methods.purecc import prompts_for_example

    folder = tmp_path / "imgs"
    shutil.copytree(star_images, folder)
    names = sorted(p.name for p in folder.glob("*.png"))
    lines = [{"file_name": names[0], "text": "a <v1> star on grass", "y_base": "a red star on grass", "y_tar": "the <v1> star"},
             {"file_name": names[1], "text": "a <v1> star at night"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    spec = ConceptSpec(str(folder), "<v1>", "star")
    c = ConceptImages.load(spec)
    assert prompts_for_example(c.captions[0], spec, c.extras[0]) == ("a <v1> star on grass", "a red star on grass", "the <v1> star")
    assert prompts_for_example(c.captions[1], spec, c.extras[1]) == ("a <v1> star at night", "a star at night", "<v1> star")
    lines[0]["y_tar"] = "a star"
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    with pytest.raises(UsageError, match="y_tar"):
        ConceptImages.load(spec)


def test_learner_checkpointing_changes_memory_not_gradients(tiny, star_images):
    """Recomputing the learner's activations in the backward pass must give the same gradients."""
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods.lora import lora_params
    from pristine.methods.purecc import LEARNER, PureCC, PureCCConfig

    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(tiny))
    m = PureCC(PureCCConfig(stage1_steps=0, learner_checkpointing=False, base_branch="learner"), backbone, [spec])
    m.setup()
    data = build_training_set([ConceptImages.load(spec)], 32)
    cache_latents(data, backbone)
    learner = lora_params(backbone.unet, LEARNER)
    with torch.no_grad():  # a trained-looking learner, so its gradients are not zero by construction
        for p in learner.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    grads = []
    for checkpointing in (False, True):
        m.config.learner_checkpointing = checkpointing
        g = torch.Generator().manual_seed(7)
        batch = data.draw(2, g)
        batch["step"] = 0
        loss, logs = m.loss(batch, g)
        assert logs["stage"] == 2
        loss.backward()
        assert backbone.unet.is_gradient_checkpointing == checkpointing
        grads.append({k: p.grad.clone() for k, p in learner.items()})
        for p in learner.values():
            p.grad = None
    assert any(v.abs().sum() > 0 for v in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def _stage2(tiny, star_images, **settings):
    """A PureCC in stage 2 on the tiny model, with trained-looking adapters (LoRA's up matrices start at
    zero, which would make every adapter state predict alike), and a recorder of its predictions."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods.lora import lora_params
    from pristine.methods.purecc import EXTRACTOR, LEARNER, PureCC, PureCCConfig

    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(tiny))
    torch.manual_seed(0)  # the adapters' random initialisation: the same for every setting
    m = PureCC(PureCCConfig(stage1_steps=1, learner_checkpointing=False, **settings), backbone, [spec])
    m.setup()
    with torch.no_grad():
        for name in (EXTRACTOR, LEARNER):
            for p in lora_params(backbone.unet, name).values():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    data = build_training_set([ConceptImages.load(spec)], 32)
    cache_latents(data, backbone)
    layers = [mod for mod in backbone.unet.modules() if isinstance(mod, BaseTunerLayer)]
    calls = []
    predict = backbone.predict

    def recording(x_t, t, cond):
        out = predict(x_t, t, cond)
        calls.append({"rows": len(x_t), "grad": torch.is_grad_enabled(), "x": x_t, "t": t, "cond": cond, "out": out,
                      "adapters_off": all(layer.disable_adapters for layer in layers),
                      "active": {a for layer in layers if not layer.disable_adapters for a in layer.active_adapters}})
        return out

    backbone.predict = recording
    g = torch.Generator().manual_seed(3)
    batch = data.draw(2, g)
    batch["step"] = 1
    batch["noise"] = torch.randn(batch["latents"].shape, generator=g)  # fixed: runs of two settings compare
    batch["timesteps"] = backbone.sample_timesteps(2, g)
    return m, batch, g, calls


def test_anchored_base_branch_is_the_original_model_in_the_frozen_forward(tiny, star_images):
    from pristine.backbones import load_backbone
    from pristine.methods.lora import lora_params
    from pristine.methods.purecc import LEARNER

    m, batch, g, calls = _stage2(tiny, star_images, base_branch="original", extractor_lora=False)
    loss, logs = m.loss(batch, g)
    assert logs["stage"] == 2
    frozen = [c for c in calls if not c["grad"]]
    learner = [c for c in calls if c["grad"]]
    # one frozen forward (y_tar, ∅, y_base with every adapter off), one learner forward per sample
    assert [c["rows"] for c in frozen] == [6] and frozen[0]["adapters_off"]
    assert [c["rows"] for c in learner] == [2] and learner[0]["active"] == {LEARNER}
    f_base = frozen[0]["out"][4:]
    assert not f_base.requires_grad and f_base.grad_fn is None  # no gradient reaches the learner through it
    # bit for bit the original model's prediction: the same inputs through a freshly loaded model
    fresh = load_backbone(str(tiny))
    with torch.no_grad():
        original = fresh.predict(frozen[0]["x"], frozen[0]["t"], frozen[0]["cond"])
    assert torch.equal(frozen[0]["out"], original)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(m.backbone.unet, LEARNER).values())

    # the authors' form for comparison: the learner predicts y_base too, in a batched pair
    m, batch, g, calls = _stage2(tiny, star_images, base_branch="learner", extractor_lora=False)
    m.loss(batch, g)
    assert [c["rows"] for c in calls if c["grad"]] == [4] and [c["rows"] for c in calls if not c["grad"]] == [4]


def test_extractor_lora_false_runs_r_with_every_adapter_off(tiny, star_images):
    from pristine.methods.purecc import EXTRACTOR

    m, batch, g, calls = _stage2(tiny, star_images, extractor_lora=False, base_branch="learner")
    m.loss(batch, g)
    frozen = [c for c in calls if not c["grad"]]
    assert len(frozen) == 1 and frozen[0]["adapters_off"] and not frozen[0]["active"]
    m, batch, g, calls = _stage2(tiny, star_images, extractor_lora=True, base_branch="learner")
    m.loss(batch, g)
    frozen = [c for c in calls if not c["grad"]]
    assert len(frozen) == 1 and frozen[0]["active"] == {EXTRACTOR}
    # anchored with the extractor's LoRA on: R and the original's y_base need two frozen forwards
    m, batch, g, calls = _stage2(tiny, star_images, extractor_lora=True, base_branch="original")
    m.loss(batch, g)
    frozen = [c for c in calls if not c["grad"]]
    assert [(c["rows"], c["active"]) for c in frozen] == [(4, {EXTRACTOR}), (2, set())]


def test_base_preserve_weight_adds_the_learners_y_base_against_the_original(tiny, star_images):
    m, batch, g, calls = _stage2(tiny, star_images, base_branch="original", base_preserve_weight=0.5)
    loss, logs = m.loss(batch, g)
    learner = [c for c in calls if c["grad"]]
    assert [c["rows"] for c in learner] == [4]  # y_complete and y_base
    frozen = [c for c in calls if not c["grad"]]
    f_base = frozen[-1]["out"][-2:]
    expected = (learner[0]["out"][2:].detach().float() - f_base.float()).pow(2).mean().item()
    assert logs["l_base_preserve"] == pytest.approx(expected) and expected > 0
    without, _ = _stage2(tiny, star_images, base_branch="original")[0].loss(batch, g)
    assert loss.item() == pytest.approx(without.item() + 0.5 * expected, rel=1e-5)
