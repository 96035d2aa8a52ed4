"""SDXL, SD3 and FLUX.1 (dev- and schnell-style) behind the backbone interface, on tiny models of
the real pipeline classes: every method trains and lowers its loss, frozen weights stay
bit-identical, outputs load into the family's own diffusers pipeline and change its pictures,
and a resumed run ends where an uninterrupted one does."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_families  # noqa: E402

from pristine.cli import main  # noqa: E402

BUILDERS = {"sdxl": tiny_families.build_tiny_sdxl, "sd3": tiny_families.build_tiny_sd3,
            "flux": tiny_families.build_tiny_flux,
            "flux_schnell": lambda folder: tiny_families.build_tiny_flux(folder, guidance_embeds=False)}
METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion", "purecc")
CASES = [(f, m) for f in ("sdxl", "sd3", "flux") for m in METHODS] + [("flux_schnell", "lora")]
PROMPT = "a photo of <v1> star"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = BUILDERS[family](root / family)
        return cache[family]

    return get


def image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, height=16, width=16, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def family_pipeline(folder):
    from pristine.backbones import backbone_class

    cls = backbone_class(Path(folder))
    return cls.pipeline_class().from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                **cls.PIPELINE_KWARGS)


@pytest.mark.parametrize("family,method", CASES)
def test_method_trains_keeps_frozen_weights_and_loads_into_the_family_pipeline(models, star_images, tmp_path,
                                                                               family, method):
    from safetensors.torch import load_file, save_file

    from pristine.backbones import load_backbone
    from pristine.backbones.base import load_embeddings, pipeline_denoiser
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods import get_method
    from pristine.methods.custom_diffusion import apply_custom_diffusion

    folder = models(family)
    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(folder))
    assert backbone.family == family.split("_")[0]
    frozen = [backbone.denoiser, backbone.vae, *backbone.text_encoders]
    before = {f"{k}.{n}": p.detach().clone() for k, mod in enumerate(frozen) for n, p in mod.named_parameters()}
    cls = get_method(method)
    args = {"stage1_steps": 4} if method == "purecc" else {}
    m = cls(cls.Config.from_dict(args), backbone, [spec])
    groups = m.setup()
    data = build_training_set([ConceptImages.load(spec)], 16, flip=False)
    cache_latents(data, backbone)
    # PureCC is probed on its stage-1 loss (the extractor and token it trains in the first 4 steps)
    probe = {"prompts": data.prompts, "latents": data.latents[:, 0], "is_prior": data.is_prior, "step": 0,
             "concept": torch.zeros(len(data.prompts), dtype=torch.long)}

    def probe_loss():
        with torch.no_grad():
            return sum(m.loss(probe, torch.Generator().manual_seed(7 + k))[0].item() for k in range(4))

    initial = probe_loss()
    start_rows = [e.rows.detach().clone() for e in m.tokens.encoders]
    opt = torch.optim.AdamW(groups, lr=3e-3 if method == "dreambooth" else 1e-2, weight_decay=0.0)
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        batch = data.draw(4, g)
        batch["step"] = step
        loss, _ = m.loss(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < initial
    trainable = {id(p) for grp in groups for p in grp["params"]}
    changed = 0
    for k, mod in enumerate(frozen):
        for n, p in mod.named_parameters():
            if f"{k}.{n}" not in before:
                continue  # adapter weights added by setup
            if id(p) in trainable:
                changed += not torch.equal(p, before[f"{k}.{n}"])
            elif "token_embedding" not in n and "shared" not in n and "embed_tokens" not in n:
                assert torch.equal(p, before[f"{k}.{n}"]), n
            else:  # the embedding matrix: every old row bit-identical (new rows appended by add_tokens)
                old = before[f"{k}.{n}"]
                assert torch.equal(p[:len(old)], old), n
    assert changed or method in ("lora", "purecc", "textual_inversion")  # those train new parameters only
    # the new token learned in every text encoder (T5 included)
    assert all(not torch.equal(e.rows, r) for e, r in zip(m.tokens.encoders, start_rows))

    run = tmp_path / "run"
    run.mkdir()
    m.save(run, [])
    base, tuned = family_pipeline(folder), family_pipeline(run / "model" if method == "dreambooth" else folder)
    if method == "dreambooth":
        assert not np.allclose(image(tuned), image(base), atol=1e-4)
        return
    # the base pipeline gets the tokens at their starting rows (the class word's): only training differs
    start = tmp_path / "start"
    start.mkdir()
    for k, (name, tokenizer, encoder) in enumerate(backbone.text_pairs()):
        file = "learned_embeds.safetensors" if k == 0 else f"learned_embeds_{name}.safetensors"
        learned = load_file(str(run / file))
        assert set(learned) == {"<v1>"} and learned["<v1>"].shape[-1] == encoder.get_input_embeddings().weight.shape[1]
        class_ids = tokenizer(spec.class_word, add_special_tokens=False).input_ids
        save_file({"<v1>": encoder.get_input_embeddings().weight[class_ids].mean(0).detach().clone()}, str(start / file))
    assert load_embeddings(tuned, run, type(backbone).TEXT_PAIRS) and load_embeddings(base, start, type(backbone).TEXT_PAIRS)
    if method in ("lora", "purecc"):
        tuned.load_lora_weights(str(run))
        # every trained LoRA matrix arrived (a layout the loader half-reads still changes the pictures)
        loaded = {n for n, _ in pipeline_denoiser(tuned).named_parameters() if "lora_" in n}
        assert len(loaded) == len(m.trainable_denoiser_params()) // (2 if method == "purecc" else 1) > 0
    if method == "custom_diffusion":
        apply_custom_diffusion(pipeline_denoiser(tuned), run / "custom_diffusion.safetensors")
    assert not np.allclose(image(tuned), image(base), atol=1e-4)


def train_cli(capsys, *argv):
    code = main(["train", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_resume_ends_with_the_same_weights_with_prior_preservation(models, star_images, tmp_path, capsys, family):
    from safetensors.torch import load_file

    common = ["--model", str(models(family)), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--steps", "4", "--checkpoint-every", "2", "--lr", "1e-2", "--batch-size", "2",
              "--prior-preservation", "--num-class-images", "2"]
    if family == "sdxl":
        common += ["--export", "kohya"]
    assert train_cli(capsys, *common, "--out", str(tmp_path / "a"))[0] == 0
    assert train_cli(capsys, *common, "--out", str(tmp_path / "b"))[0] == 0
    b = tmp_path / "b"
    outputs = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert "pytorch_lora_weights.safetensors" in outputs and "learned_embeds_text_encoder_2.safetensors" in outputs
    for name in ["DONE", *outputs]:
        (b / name).unlink()
    (b / "checkpoints" / "step_0000004.safetensors").unlink()  # killed after step 2
    code, err = train_cli(capsys, *common, "--out", str(b), "--resume", "latest")
    assert code == 0, err
    for name in outputs:
        x, y = load_file(str(tmp_path / "a" / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert len(list((tmp_path / ".class_images").glob("*/*.png"))) == 2  # the family's own pipeline drew them


@pytest.mark.parametrize("convs", [False, True, "samplers"])
def test_sdxl_kohya_layout_round_trips_through_diffusers_conversion(models, star_images, tmp_path, capsys, convs):
    """lora_kohya.safetensors (kohya / ComfyUI names) read by diffusers' own kohya conversion draws what
    the diffusers-layout file draws; with `convs`, LoRA on the resnets too (kohya's conv_dim), and
    with "samplers" on the down- and upsamplers' convolutions as well."""
    from safetensors.torch import load_file

    folder, run = models("sdxl"), tmp_path / "run"
    targets = ["--method-arg", "targets=[to_q,to_k,to_v,to_out.0,conv1,conv2,time_emb_proj"
               + (",conv" if convs == "samplers" else "") + "]"] if convs else []
    code, err = train_cli(capsys, "--model", str(folder), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--steps", "3", "--lr", "1e-2", "--method-arg", "train_token=false",
                          *targets, "--train-text-encoder", "--export", "kohya", "--out", str(run))
    assert code == 0, err
    kohya = load_file(str(run / "lora_kohya.safetensors"))
    if convs:  # every resnet of the original UNet, by its own names
        for layer in ("in_layers_2", "out_layers_3", "emb_layers_1"):
            assert any(k.startswith("lora_unet_input_blocks_") and f"_0_{layer}.lora_down" in k for k in kohya), layer
            assert any(k.startswith("lora_unet_middle_block_2_") and layer in k for k in kohya), layer
            assert any(k.startswith("lora_unet_output_blocks_") and f"_0_{layer}.lora_up" in k for k in kohya), layer
    if convs == "samplers":  # SGM's names: a Downsample's conv is `op`, an Upsample's `conv`
        assert any(k.startswith("lora_unet_input_blocks_") and k.endswith("_0_op.lora_down.weight") for k in kohya)
        assert any(k.startswith("lora_unet_output_blocks_") and k.endswith("_conv.lora_down.weight") for k in kohya)
    assert kohya and any(k.endswith(".alpha") for k in kohya)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}  # kohya's SDXL prefixes, text encoders too
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in kohya  # SGM block names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    _kohya_draws_what_the_diffusers_file_draws(folder, run, text_encoders=("text_encoder", "text_encoder_2"))


def _kohya_draws_what_the_diffusers_file_draws(folder, run, text_encoders=()):
    """Plain load_lora_weights(file) of the kohya file (diffusers converts it) against the diffusers file;
    `text_encoders`: those that must have got their LoRA layers from either file."""
    pictures, layers = [], []
    for weights in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", None):
        pipe = family_pipeline(folder)
        if weights:
            pipe.load_lora_weights(str(run / weights))
            denoiser = getattr(pipe, "unet", None) or pipe.transformer
            layers.append({n for n, m in denoiser.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)})
            for name in text_encoders:
                assert any("lora_A" in n for n, _ in getattr(pipe, name).named_parameters()), (weights, name)
        pictures.append(image(pipe))
    assert layers[0] and layers[0] == layers[1]  # every layer of the diffusers file came back from kohya's
    assert np.allclose(pictures[0], pictures[1], atol=2e-3)  # the kohya file is stored in fp16
    assert not np.allclose(pictures[0], pictures[2], atol=1e-4)


def test_unknown_pipeline_class_is_one_clear_line(tmp_path, star_images, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    code, err = train_cli(capsys, "--model", str(tmp_path / "m"), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--out", str(tmp_path / "r"))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "KandinskyPipeline" in lines[0] and "model_index.json" in lines[0], err


def test_a_format_the_family_cannot_write_is_refused_before_training(models, star_images, tmp_path, capsys):
    code, err = train_cli(capsys, "--model", str(models("sd3")), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--export", "kohya", "--out", str(tmp_path / "r"))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "kohya" in lines[0] and "sd3" in lines[0], err
    assert not (tmp_path / "r").exists()


def test_flux_kohya_layout_round_trips_through_diffusers_conversion(models, star_images, tmp_path, capsys):
    """Fused kohya qkv (block-diagonal up matrices) read by diffusers' FLUX kohya conversion draws what the
    diffusers-layout file draws. Single-stream blocks stay out: that conversion hard-codes FLUX.1's widths."""
    from safetensors.torch import load_file

    folder, run = models("flux"), tmp_path / "run"
    targets = ",".join(f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                             "attn.to_add_out", "ff.net.2"))
    code, err = train_cli(capsys, "--model", str(folder), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--steps", "3", "--lr", "1e-2", "--method-arg", "train_token=false",
                          "--method-arg", f"targets={targets}", "--method-arg", "alpha=2", "--resolution", "16",
                          "--train-text-encoder", "--export", "kohya", "--out", str(run))
    assert code == 0, err
    kohya = load_file(str(run / "lora_kohya.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight" in kohya  # CLIP's; T5 has none
    _kohya_draws_what_the_diffusers_file_draws(folder, run, text_encoders=("text_encoder",))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_capture_keeps_outputs_and_yields_maps_over_the_text(models, family):
    from pristine.attention import capture_cross_attention
    from pristine.backbones import load_backbone

    backbone = load_backbone(str(models(family)))
    layers = backbone.cross_attention_layers()
    assert layers and all(name.startswith("transformer_blocks.") for name in layers)  # double-stream / joint blocks
    cond = backbone.encode_prompts([PROMPT, "a photo of a star"])
    x0 = torch.randn(2, backbone.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = backbone.sample_timesteps(2, torch.Generator().manual_seed(1))
    x_t = backbone.add_noise(x0, torch.randn_like(x0), t)
    with torch.no_grad():
        plain = backbone.predict(x_t, t, cond)
        with capture_cross_attention(backbone.denoiser) as maps:
            captured = backbone.predict(x_t, t, cond)
    assert torch.allclose(plain, captured, atol=1e-5)
    assert set(maps) == set(layers)
    n_txt = cond["encoder_hidden_states"].shape[1]
    for m in maps.values():
        assert m.shape[:2] == (2, backbone.denoiser.config.num_attention_heads) and m.shape[-1] == n_txt
        assert m.shape[2] in (16, 64)  # the image tokens: 8x8 latents in 2x2 patches (SD3) or packed (FLUX)
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
    assert maps[layers[0]][0].ne(maps[layers[0]][1]).any()  # the two prompts attend differently
    assert not any("Capture" in type(p).__name__ for p in backbone.denoiser.attn_processors.values())


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_output_preservation_compares_with_the_loaded_model_in_every_family(models, star_images, family):
    """The original's prediction (adapters off, Custom Diffusion's K/V as loaded) is the loaded model's,
    bit for bit; the loss is zero untrained, positive once the trained weights move, and the trained
    model is back in place after it."""
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods import get_method
    from pristine.methods.base import OutputPreservation

    folder = models(family)
    spec = ConceptSpec(str(star_images), "<v1>", "star")
    fresh = load_backbone(str(folder))
    for method in ("lora", "custom_diffusion"):
        backbone = load_backbone(str(folder))
        cls = get_method(method)
        m = cls(cls.Config.from_dict({}), backbone, [spec])
        m.setup()
        m.use_preservation(OutputPreservation.from_setting("class", 1.0, [spec]))
        data = build_training_set([ConceptImages.load(spec)], 16, flip=False)
        cache_latents(data, backbone)
        g = torch.Generator().manual_seed(0)
        batch = {"prompts": data.prompts[:2], "is_prior": data.is_prior[:2], "step": 0}
        x0 = data.latents[:2, 0]
        t = backbone.sample_timesteps(2, g)
        x_t = backbone.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        cond = m.encode(batch["prompts"])
        targets = m.preservation_targets(x_t, t, batch)
        with torch.no_grad():
            loaded = fresh.predict(targets["x"], targets["t"], targets["cond"])
            assert torch.equal(targets["original"], loaded), method
            assert m.predict_preserving(x_t, t, cond, targets)[1].item() < 1e-10, method
            for p in m.trainable_denoiser_params().values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        targets = m.preservation_targets(x_t, t, batch)
        assert torch.equal(targets["original"], loaded), method
        _, l_preserve = m.predict_preserving(x_t, t, cond, targets)
        assert l_preserve.item() > 1e-6, method
        l_preserve.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_denoiser_params().values())
