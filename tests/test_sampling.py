"""The sampling engine (generalized CFG), the concept-centric (null-text) model, EMA, the domain task."""

import json

import numpy as np
import pytest
import torch

from pristine.cli import main

PROMPT = "a big red star on the left, on grass"


def _diffusers(model, run=None):
    """The family's own diffusers pipeline with a run's files loaded, as a diffusers user loads them: the
    reference the engine is held to."""
    from pristine.backbones import backbone_class
    from pristine.backbones.base import load_embeddings

    from pathlib import Path

    family = backbone_class(Path(model))
    pipe = family.pipeline_class().from_pretrained(str(model), torch_dtype=torch.float32, local_files_only=True,
                                                   use_safetensors=True, **family.PIPELINE_KWARGS)
    if run is not None:
        pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors")
        load_embeddings(pipe, run, family.TEXT_PAIRS)
    return pipe


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_run(tiny, star_images, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    assert main(["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--out", str(run), "--steps", "2", "--lr", "1e-2"]) == 0
    return run


@pytest.fixture(scope="module")
def retro_images(tmp_path_factory):
    from pristine.world.export import write_renders

    return write_renders(tmp_path_factory.mktemp("retro") / "retro", n=6, seed=0, part="domain:retro")


# ---- GCFG ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_one_term_gcfg_gives_the_diffusers_pipeline_pictures(scheduler):
    import pristine.mini
    from pristine.sample import generate
    from pristine.sampling import Guide, sample

    seeds = [3, 4]
    reference = np.stack(generate(_diffusers(pristine.mini.path()), [PROMPT] * 2, seeds, steps=8, guidance=5.0, scheduler=scheduler))
    ours = np.stack(sample(guides=[Guide(prompt=PROMPT, weight=5.0)], n=2, seed=3, steps=8, scheduler=scheduler)[0])
    assert reference.std() > 10  # real pictures, not a constant
    assert np.array_equal(reference, ours)
    other = np.stack(sample(guides=[Guide(prompt=PROMPT, weight=2.0)], n=2, seed=3, steps=8, scheduler=scheduler)[0])
    assert not np.array_equal(reference, other)  # the comparison can fail


def test_one_term_gcfg_with_a_lora_run_gives_the_pipeline_pictures(tiny, lora_run):
    from pristine.sample import generate
    from pristine.sampling import Guide, sample

    prompt = "a photo of <v1> star"
    reference = np.stack(generate(_diffusers(tiny, lora_run), [prompt] * 2, [0, 1], steps=5, guidance=4.0))
    term = [Guide(adapter=str(lora_run), prompt=prompt, weight=4.0)]
    # the pipeline's CFG with the run loaded takes ∅ from the run too
    ours = np.stack(sample(model=str(tiny), guides=term, unconditional=str(lora_run), n=2, steps=5)[0])
    assert np.array_equal(reference, ours)
    # GCFG's default ∅ is the frozen original's: other pictures; and the adapter is off for the original's terms
    gcfg = np.stack(sample(model=str(tiny), guides=term, n=2, steps=5)[0])
    original = np.stack(sample(model=str(tiny), guides=[Guide(prompt=prompt, weight=4.0)], n=2, steps=5)[0])
    assert not np.array_equal(ours, gcfg) and not np.array_equal(gcfg, original)


def test_a_lora_folder_from_another_trainer_samples_like_its_pipeline(tiny, lora_run, tmp_path, capsys):
    """A folder with only pytorch_lora_weights.safetensors (what diffusers' LoRA scripts write) has no
    saved settings: it is read as a LoRA, and draws what the pipeline draws with that file loaded."""
    import shutil

    from pristine.sample import generate, load_pipeline

    foreign = tmp_path / "from_script"
    foreign.mkdir()
    shutil.copy(lora_run / "pytorch_lora_weights.safetensors", foreign)
    prompt = "a big red star on the left, on grass"
    code, err = _cli(capsys, "sample", "--model", str(tiny), "--adapter", str(foreign), "--prompt", prompt, "--n", "2",
                     "--steps", "5", "--guidance", "4", "--out", str(tmp_path / "grid.png"))
    assert code == 0, err
    reference = generate(_diffusers(tiny, foreign), [prompt] * 2, [0, 1], steps=5, guidance=4.0)
    plain = generate(load_pipeline(str(tiny)), [prompt] * 2, [0, 1], steps=5, guidance=4.0)
    assert (tmp_path / "grid.png").is_file()
    from pristine.sampling import Guide, sample

    ours = sample(model=str(tiny), guides=[Guide(adapter=str(foreign), prompt=prompt, weight=4.0)],
                  unconditional=str(foreign), n=2, steps=5)[0]  # what `--adapter` means
    assert np.array_equal(np.stack(reference), np.stack(ours))
    assert not np.array_equal(reference[0], plain[0])  # and the LoRA changes the picture


def test_sample_flags_draw_what_the_pipeline_draws_with_the_same_arguments(tiny, lora_run, tmp_path, capsys):
    """--negative-prompt, --lora-scale, --height/--width mean what the diffusers pipeline's negative_prompt,
    cross_attention_kwargs scale, height and width mean; each picture is also a PNG of its own."""
    from PIL import Image

    from pristine.sample import generate

    prompt, negative = "a photo of <v1> star", "a blue heart"
    code, err = _cli(capsys, "sample", "--model", str(tiny), "--adapter", str(lora_run), "--prompt", prompt, "--n", "2",
                     "--steps", "4", "--guidance", "4", "--negative-prompt", negative, "--lora-scale", "0.5",
                     "--height", "24", "--width", "16", "--seed", "3", "--out", str(tmp_path / "grid.png"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-00-seed3.png", "grid-00-seed4.png", "grid.png"]
    ours = np.stack([np.asarray(Image.open(tmp_path / f"grid-00-seed{s}.png")) for s in (3, 4)])
    assert ours.shape == (2, 24, 16, 3)
    pipe = _diffusers(tiny, lora_run)
    reference = np.stack(generate(pipe, [prompt] * 2, [3, 4], steps=4, guidance=4.0, negative_prompt=negative,
                                  height=24, width=16, cross_attention_kwargs={"scale": 0.5}))
    assert np.array_equal(reference, ours)
    plain = np.stack(generate(pipe, [prompt] * 2, [3, 4], steps=4, guidance=4.0, height=24, width=16))
    assert not np.array_equal(plain, ours)  # the negative prompt and the scale did change the pictures


def test_one_term_gcfg_on_sdxl_gives_its_pipeline_pictures_and_flow_families_keep_the_pipeline(tmp_path, capsys):
    from PIL import Image
    from tiny_families import build_tiny_flux, build_tiny_sdxl

    from pristine.sample import generate
    from pristine.sampling import Guide, sample

    sdxl = build_tiny_sdxl(tmp_path / "sdxl")  # its ∅ is zeros (force_zeros_for_empty_prompt), not "" encoded
    reference = np.stack(generate(_diffusers(sdxl), ["a star"] * 2, [0, 1], steps=3, guidance=5.0))
    assert np.array_equal(reference, np.stack(sample(model=str(sdxl), guides=[Guide(prompt="a star", weight=5.0)],
                                                     n=2, steps=3)[0]))
    flux = build_tiny_flux(tmp_path / "flux")
    out = tmp_path / "f.png"
    assert _cli(capsys, "sample", "--model", str(flux), "--prompt", "a star", "--n", "1", "--steps", "2", "--out", str(out),
                "--height", "32", "--width", "16")[0] == 0
    assert Image.open(tmp_path / "f-00-seed0.png").size == (16, 32)  # the pipeline's own path takes the flags too
    code, err = _cli(capsys, "sample", "--model", str(flux), "--prompt", "a star", "--negative-prompt", "blue",
                     "--out", str(tmp_path / "n.png"))
    assert code == 2 and "--negative-prompt" in err and "flux" in err  # FLUX.1 has no negative branch to give it
    code, err = _cli(capsys, "sample", "--model", str(flux), "--guide", "prompt=a star,w=2", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--guide" in err


def _engine(models, guides):
    from pristine.sampling import GuidedSampler, Term

    denoisers = [models.run(g.adapter) if g.adapter else models.original for g in guides]
    terms = [Term(d, [g.prompt] * 2, g.weight) for d, g in zip(denoisers, guides)]
    return GuidedSampler(models.original), terms


def test_zero_weights_reduce_to_the_unconditional_prediction_and_weights_compose(tiny, lora_run):
    from pristine.sampling import Guide, Models

    models = Models(str(tiny))
    guides = [Guide(adapter=str(lora_run), prompt="a photo of <v1> star", weight=0.0), Guide(prompt="a star", weight=0.0)]
    engine, terms = _engine(models, guides)
    bb = models.original.backbone
    x, t = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad():
        f0, fs = engine.predictions(x, t, terms)
        guided = engine.combine(f0, fs, terms)
        from pristine.sampling import use_adapter

        use_adapter(bb, None)
        uncond = bb.predict(x, t, bb.unconditional(2))  # the original's ∅, computed apart from the engine
    assert torch.allclose(guided, uncond, atol=1e-6)
    assert not torch.allclose(fs[0], uncond, atol=1e-4) and not torch.allclose(fs[1], uncond, atol=1e-4)
    terms[0].weight, terms[1].weight = 2.0, -1.5  # a negative weight pushes away from its prompt
    expected = uncond + 2.0 * (fs[0] - uncond) - 1.5 * (fs[1] - uncond)
    assert torch.allclose(engine.combine(f0, fs, terms), expected, atol=1e-5)


def test_terms_sharing_weights_run_as_one_forward(tiny, lora_run):
    from pristine.sampling import Guide, Models

    models = Models(str(tiny))
    bb = models.original.backbone
    calls = []
    hook = bb.denoiser.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    x, t = torch.randn(bb.latent_shape(2)), torch.tensor(300)
    with torch.no_grad():
        engine, terms = _engine(models, [Guide(prompt="a star", weight=2.0), Guide(prompt="a circle", weight=-1.0)])
        engine.predictions(x, t, terms)
        assert calls == [6]  # ∅ and both terms on the original: one forward of 3 x 2
        calls.clear()
        engine, terms = _engine(models, [Guide(adapter=str(lora_run), prompt="<v1> star", weight=2.0),
                                         Guide(prompt="a star", weight=2.0)])
        engine.predictions(x, t, terms)
        assert sorted(calls) == [2, 4]  # the adapter's term alone, ∅ with the original's term
    hook.remove()


# ---- the concept-centric model ---------------------------------------------------------------------


def _rendered_latents(bb, n=4):
    from pristine.data import preprocess
    from pristine.world.concepts import domain_dataset
    from pristine.world.render import render
    from PIL import Image

    pixels = torch.stack([preprocess(Image.fromarray(render(s)[0]), bb.image_size) for s in domain_dataset("retro", n)])
    with torch.no_grad():
        return bb.encode_images(pixels)


def test_null_text_constants_are_the_measured_means_of_real_forward_passes(tiny):
    from pristine.backbones import load_backbone

    reference = load_backbone(str(tiny))
    latents = _rendered_latents(reference)
    # the means, measured apart: hooks on the untouched model's cross-attention, the same draws
    sums, counts = {}, {}

    def hook(name):
        def record(module, args, out):
            flat = out.double().reshape(-1, out.shape[-1])
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + len(flat)
        return record

    blocks = {n: m for n, m in reference.denoiser.named_modules() if getattr(m, "attn2", None) is not None}
    hooks = [m.attn2.register_forward_hook(hook(f"{n}.attn2")) for n, m in blocks.items()]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        cond = reference.encode_prompts([""] * len(latents))
        for _ in range(3):
            noise = torch.randn(latents.shape, generator=generator)
            t = reference.sample_timesteps(len(latents), generator)
            reference.predict(reference.add_noise(latents, noise, t), t, cond)
    for h in hooks:
        h.remove()
    expected = {n: (sums[n] / counts[n]).float() for n in sums}

    bb = load_backbone(str(tiny))
    modules = bb.make_text_free(measure=True)
    assert set(modules) == set(expected) and len(expected) > 0
    measured = bb.measure_null_text(latents, torch.Generator().manual_seed(5), passes=3)
    for name, value in measured.items():
        assert value.abs().max() > 1e-3  # not the authors' zero buffer
        assert torch.allclose(value, expected[name], atol=1e-5), name
    # no parameter of a cross-attention block or of the norm before it is left
    left = [n for n, _ in bb.denoiser.named_parameters() if ".transformer_blocks." in n and (".attn2." in n or ".norm2." in n)]
    assert not left and any(".transformer_blocks." in n and ".norm2." in n for n, _ in reference.denoiser.named_parameters())
    # text-free: any prompt gives the same prediction
    x, t = torch.randn(latents.shape), torch.tensor([400] * len(latents))
    with torch.no_grad():
        a = bb.predict(x, t, bb.encode_prompts(["a red star"] * len(latents)))
        b = bb.predict(x, t, bb.encode_prompts(["a blue circle at night"] * len(latents)))
        c = reference.predict(x, t, reference.encode_prompts(["a red star"] * len(latents)))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-4)


def test_concept_model_saves_and_loads_with_its_constants(tiny, retro_images, tmp_path):
    from safetensors.torch import load_file, save_file

    from pristine.errors import UsageError
    from pristine.sampling import Models
    from pristine.train import TrainConfig, run_training

    run = tmp_path / "cc"
    config = TrainConfig.from_dict({"out": str(run), "model": str(tiny), "method": "concept_centric", "steps": 3,
                                    "batch_size": 2, "lr": 1e-3, "concepts": [{"images": str(retro_images)}],
                                    "method_args": {"measure_passes": 2, "measure_images": 4}})
    assert config.ema_decay == 0.999  # the method's default, written into config.yaml
    _, method = run_training(config)
    constants = {k: v.clone() for k, v in method.constants().items()}
    assert all(v.abs().max() > 1e-3 for v in constants.values())
    assert all(torch.equal(constants[k], method.measured[k]) for k in constants)  # not trained, kept as measured

    denoiser = Models(str(tiny)).run(run)
    loaded = dict(denoiser.backbone.denoiser.named_buffers())
    for name, value in constants.items():
        assert torch.equal(loaded[f"{name}.constant"], value)
    bb = method.backbone
    x, t = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(1)), torch.tensor([200, 700])
    with torch.no_grad():
        expected = bb.predict(x, t, bb.unconditional(2))
        with denoiser.active():
            got = denoiser.predict(x, t, denoiser.encode(["anything", "at all"]))
    assert torch.equal(got, expected)

    # a model file without one constant (the authors' strict=False load) is refused, not zero-filled
    state = load_file(str(run / "concept_model.safetensors"))
    state.pop(next(k for k in state if k.endswith(".constant")))
    save_file(state, str(run / "concept_model.safetensors"))
    with pytest.raises(UsageError, match="does not fit"):
        Models(str(tiny)).run(run)


def test_concept_centric_cli_gcfg_grid_and_lora_option(tiny, retro_images, tmp_path, capsys):
    run = tmp_path / "cc_lora"
    code, err = _cli(capsys, "train", "--model", str(tiny), "--method", "concept_centric", "--images", str(retro_images),
                     "--out", str(run), "--steps", "2", "--batch-size", "2", "--method-arg", "lora=true",
                     "--method-arg", "measure_passes=1", "--lr", "1e-3")
    assert code == 0, err
    assert (run / "null_text.safetensors").is_file() and (run / "pytorch_lora_weights.safetensors").is_file()
    out = tmp_path / "grid.png"
    code, err = _cli(capsys, "sample", "--model", str(tiny), "--guide", f"adapter={run},w=2.5",
                     "--guide", "prompt=a big star, on grass,w=2.5", "--out", str(out), "--n", "2", "--steps", "3")
    assert code == 0, err
    assert out.is_file()
    # the same from YAML
    (tmp_path / "s.yaml").write_text(f"model: {tiny}\nn: 1\nsteps: 2\nguides:\n  - {{adapter: {run}, w: 2.5}}\n"
                                     "  - {prompt: 'a star', w: 2.5}\n")
    code, err = _cli(capsys, "sample", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "g2.png"))
    assert code == 0, err


# ---- EMA ------------------------------------------------------------------------------------------


def test_ema_is_saved_and_resumes_to_the_same_weights(tiny, star_images, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--steps", "4", "--checkpoint-every", "2", "--lr", "1e-2", "--ema-decay", "0.9"]
    for name in ("a", "b"):
        assert _cli(capsys, "train", *common, "--out", str(tmp_path / name))[0] == 0
    raw = _cli(capsys, "train", *common[:-2], "--out", str(tmp_path / "raw"))
    assert raw[0] == 0
    b = tmp_path / "b"
    for p in ("DONE", "pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        (b / p).unlink()
    (b / "checkpoints" / "step_0000004.safetensors").unlink()
    code, err = _cli(capsys, "train", *common, "--out", str(b), "--resume", "latest")
    assert code == 0, err
    assert "ema.0" in load_file(str(b / "checkpoints" / "step_0000002.safetensors"))
    name = "pytorch_lora_weights.safetensors"
    x, y, r = (load_file(str(tmp_path / d / name)) for d in ("a", "b", "raw"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(x[k], r[k]) for k in x)  # the outputs are the averaged weights
    code, err = _cli(capsys, "train", *common[:-1], "0.5", "--out", str(b), "--resume", "latest")
    assert code == 2 and "ema_decay" in err


# ---- the domain task ---------------------------------------------------------------------------------


def test_domain_task_runs_end_to_end_on_tiny_steps(tmp_path, capsys):
    code, err = _cli(capsys, "bench", "domain", "--out", str(tmp_path), "--quick", "--images", "4", "--prompts", "1",
                     "--train-steps", "1", "--sample-steps", "2")
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"lora_trigger", "dreambooth_trigger", "concept_centric"}
    for r in results["methods"].values():
        assert 0 <= r["domain_fidelity"] <= 1 and 0 <= r["adherence"] <= 1 and r["seconds_per_picture"] > 0
    # GCFG takes ∅ from the frozen original: with the concept term off, its pictures are the original's
    assert results["methods"]["concept_centric"]["drift_pixels"] == 0
    assert (tmp_path / "runs" / "concept_centric" / "concept_model.safetensors").is_file()
