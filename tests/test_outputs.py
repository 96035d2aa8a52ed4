"""Outputs every tool loads (SD1.x/2.x here; SDXL and FLUX.1 in test_families): the kohya file through
plain `load_lora_weights(file)`, a text-encoder LoRA through diffusers and through `pristine sample`,
Custom Diffusion through diffusers' attention processors and textual-inversion loader."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_sd  # noqa: E402

from pristine.cli import main  # noqa: E402

PROMPT = "a photo of <v1> star"


def _train(capsys, *argv):
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 0, err


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd2") / "model", sd2=True)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_kohya_file_loads_in_plain_diffusers_and_draws_what_the_diffusers_file_draws(tiny, tiny_sd2, star_images,
                                                                                    tmp_path, capsys, family):
    """kohya's SD1.x/2.x layout (diffusers block names, lora_te_ for the text encoder), read by a plain
    `load_lora_weights(file)` with no unet_config, UNet and text-encoder LoRA alike."""
    from safetensors.torch import load_file

    model, run = (tiny if family == "sd1" else tiny_sd2), tmp_path / "run"
    _train(capsys, "--model", str(model), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
           "--steps", "3", "--lr", "1e-2", "--train-text-encoder", "--checkpoint-every", "0", "--export", "kohya",
           "--out", str(run))
    kohya = load_file(str(run / "lora_kohya.safetensors"))
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
                "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v.alpha",
                "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight"):
        assert key in kohya, key
    assert not any("input_blocks" in k or "output_blocks" in k for k in kohya)  # SGM names are SDXL's
    pictures, text_layers = [], []
    pipe = _pipe(model)
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    for weights in (run / "pytorch_lora_weights.safetensors", run / "lora_kohya.safetensors", None):
        if weights:
            pipe.load_lora_weights(str(weights))
        text_layers.append(sum("lora_A" in n for n, _ in pipe.text_encoder.named_parameters()))
        pictures.append(_image(pipe))
        pipe.unload_lora_weights()
    assert text_layers == [8, 8, 0]  # q, k, v, out of both layers, from either file
    assert np.allclose(pictures[0], pictures[1], atol=2e-3)  # the kohya file is stored in float16
    assert not np.allclose(pictures[0], pictures[2], atol=1e-3)  # and the LoRA changes the picture
    if family == "sd1":
        _engine_draws_what_the_pipeline_draws_with_a_text_encoder_lora(model, run, tmp_path)


def _engine_draws_what_the_pipeline_draws_with_a_text_encoder_lora(model, run, tmp_path):
    """`pristine sample`'s engine switches a run's text-encoder LoRA on for that run's prompts (and its ∅)
    only: with --adapter it draws what the pipeline draws, and the original's terms are untouched."""
    from pristine.sample import generate
    from pristine.sampling import Guide, sample

    pipe = _pipe(model)
    pipe.load_lora_weights(str(run))
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    reference = np.stack(generate(pipe, [PROMPT] * 2, [0, 1], steps=4, guidance=4.0))
    ours = np.stack(sample(model=str(model), guides=[Guide(adapter=str(run), prompt=PROMPT, weight=4.0)],
                           unconditional=str(run), n=2, steps=4)[0])
    assert np.array_equal(reference, ours)
    pipe.unload_lora_weights()
    original = np.stack(generate(pipe, ["a photo of star"] * 2, [0, 1], steps=4, guidance=4.0))
    both = sample(model=str(model), guides=[Guide(adapter=str(run), prompt=PROMPT, weight=4.0)], n=2, steps=4,
                  prompts=["a photo of star"])  # a run loaded beside: the original's picture stays the original's
    plain = sample(model=str(model), guides=[Guide(prompt="a photo of star", weight=4.0)], n=2, steps=4)
    assert not np.array_equal(np.stack(both[0]), np.stack(plain[0]))  # the run's term did its work
    assert np.array_equal(original, np.stack(plain[0]))
    # as diffusers' DreamBooth LoRA script writes it with --train_text_encoder: the same layers, no
    # settings in the file (rank and alpha inferred), no token, no config.yaml
    from safetensors.torch import load_file, save_file

    script = tmp_path / "from_script"
    script.mkdir()
    save_file(load_file(str(run / "pytorch_lora_weights.safetensors")), str(script / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt"})
    pipe.load_lora_weights(str(script))
    reference = np.stack(generate(pipe, ["a photo of star"] * 2, [0, 1], steps=4, guidance=4.0))
    ours = sample(model=str(model), guides=[Guide(adapter=str(script), prompt="a photo of star", weight=4.0)],
                  unconditional=str(script), n=2, steps=4)[0]
    assert np.array_equal(reference, np.stack(ours)) and not np.array_equal(reference, original)


def test_lora_beyond_the_attention_projections_loads_every_layer(tiny, star_images, tmp_path, capsys):
    """diffusers' loader reads a UNet LoRA file in one layout, chosen from its first key: every layer of a
    run that targets more than the attention projections comes back, not only one layout's half."""
    targets = ["proj_in", "to_k", "to_v", "conv1"]
    run = tmp_path / "run"
    _train(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
           "--steps", "2", "--lr", "1e-2", "--checkpoint-every", "0", "--method-arg", f"targets=[{','.join(targets)}]",
           "--out", str(run))
    pipe = _pipe(tiny)
    wanted = {n for n, _ in pipe.unet.named_modules() if any(n.endswith("." + t) for t in targets)}
    assert any(n.endswith("conv1") for n in wanted) and any(n.endswith("to_k") for n in wanted)
    pipe.load_lora_weights(str(run))
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert loaded == wanted


def test_custom_diffusion_run_loads_through_diffusers_attention_processors(tiny, star_images, tmp_path, capsys):
    """pytorch_custom_diffusion_weights.safetensors with `unet.load_attn_procs` and learned_embeds with
    `load_textual_inversion` draw what `pristine sample` draws from the run."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors.torch import load_file

    from pristine.sample import generate

    run = tmp_path / "cd"
    _train(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
           "--method", "custom_diffusion", "--steps", "3", "--lr", "1e-2", "--checkpoint-every", "0", "--out", str(run))
    procs = load_file(str(run / "pytorch_custom_diffusion_weights.safetensors"))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight" in procs
    grid = tmp_path / "grid.png"
    code = main(["sample", "--model", str(tiny), "--adapter", str(run), "--prompt", PROMPT, "--n", "2", "--steps", "4",
                 "--guidance", "4", "--out", str(grid)])
    assert code == 0, capsys.readouterr().err
    ours = np.stack([np.asarray(Image.open(tmp_path / f"grid-00-seed{k}.png")) for k in (0, 1)])

    def diffusers_pictures(with_procs: bool):
        pipe = _pipe(tiny)
        if with_procs:
            # diffusers (0.42 too) sets the processors only when given the pipeline (its issue #9320)
            pipe.unet.load_attn_procs(str(run), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)
            assert sum(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values()) == 12
        pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
        return np.stack(generate(pipe, [PROMPT] * 2, [0, 1], steps=4, guidance=4.0))

    reference = diffusers_pictures(True)
    assert np.abs(reference.astype(int) - ours.astype(int)).max() <= 2  # bmm attention against SDPA, in uint8
    assert np.abs(diffusers_pictures(False).astype(int) - ours.astype(int)).max() > 8  # the K/V are what differ
