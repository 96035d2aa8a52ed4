"""ICO (per-image contexts in training) and DCI (the two-branch sampler), METHODS.md 5."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pristine.cli import main


def _train(tiny, images, out, *extra):
    return main(["train", "--model", str(tiny), "--images", str(images), "--token", "<v1>", "--class-word", "star",
                 "--out", str(out), "--lr", "1e-2", *extra])


@pytest.fixture(scope="module")
def lora_run(tiny, star_images, tmp_path_factory):
    run = tmp_path_factory.mktemp("dci_lora") / "run"
    assert _train(tiny, star_images, run, "--steps", "2") == 0
    return run


# ---- ICO ---------------------------------------------------------------------------------------------


def test_contexts_sit_where_the_words_they_replace_would_sit(tiny):
    """Contexts equal to the embedding layer's output of 'a' and '.' at their positions give exactly the
    encoding of 'a <prompt> .': prefix after the start token, suffix after the prompt, positions kept."""
    from pristine.backbones import load_backbone

    bb = load_backbone(str(tiny))
    embeddings = bb._text_embeddings()
    with torch.no_grad():
        ids = bb.tokenize(["a big star ."])
        states = embeddings(input_ids=ids)[0]  # token + position embeddings
        prefix, suffix = states[1:2][None], states[4:5][None]  # "a" at 1; "big star" at 2-3; "." at 4
        got = bb.encode_with_contexts(["big star"], prefix, suffix)["encoder_hidden_states"]
        want = bb.encode_prompts(["a big star ."])["encoder_hidden_states"]
        plain = bb.encode_prompts(["big star"])["encoder_hidden_states"]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # two prefix vectors move the prompt one place on: 'a a big star .'
    with torch.no_grad():
        states2 = embeddings(input_ids=bb.tokenize(["a a big star ."]))[0]
        got2 = bb.encode_with_contexts(["big star"], states2[1:3][None], states2[5:6][None])["encoder_hidden_states"]
        want2 = bb.encode_prompts(["a a big star ."])["encoder_hidden_states"]
    assert torch.allclose(got2, want2, atol=1e-5)


def test_ico_contexts_train_are_checkpointed_and_absent_from_the_outputs(tiny, star_images, tmp_path):
    from pristine.backbones import load_backbone

    run = tmp_path / "run"
    assert _train(tiny, star_images, run, "--steps", "3", "--checkpoint-every", "1", "--ico", "--n-ctx", "2") == 0
    checkpoint = load_file(str(sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]))
    prefix, suffix = checkpoint["trainable.contexts.prefix"], checkpoint["trainable.contexts.suffix"]
    n_images = len(list(star_images.glob("*.png")))
    assert prefix.shape[:2] == (n_images, 2) and suffix.shape[:2] == (n_images, 1)
    bb = load_backbone(str(tiny))
    start_prefix, start_suffix = bb.context_init("a", 2), bb.context_init(".", 1)
    assert not torch.allclose(prefix, start_prefix.expand_as(prefix), atol=1e-6)  # they trained
    assert not torch.allclose(suffix, start_suffix.expand_as(suffix), atol=1e-6)
    assert not torch.allclose(prefix[0], prefix[1])  # each image its own
    # the outputs: the token alone, nothing shaped or named like a context anywhere
    assert set(load_file(str(run / "learned_embeds.safetensors"))) == {"<v1>"}
    for f in run.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                assert "context" not in key
                assert tuple(st.get_slice(key).get_shape()) not in (tuple(prefix.shape), tuple(suffix.shape))


@pytest.mark.parametrize("method", ["dreambooth", "custom_diffusion", "purecc", "textual_inversion"])
def test_ico_trains_with_every_method_and_dci_samples_its_runs(tiny, star_images, tmp_path, method):
    from pristine.sampling import Guide, Models, sample

    run = tmp_path / method
    extra = ["--method-arg", "stage1_steps=1"] if method == "purecc" else []  # stage 2 too, with its contexts
    assert _train(tiny, star_images, run, "--method", method, "--steps", "2", "--ico", *extra) == 0
    checkpoint = load_file(str(sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]))
    assert "trainable.contexts.prefix" in checkpoint
    assert set(load_file(str(run / "learned_embeds.safetensors"))) == {"<v1>"}
    if method == "textual_inversion":
        return
    models = Models(str(tiny))
    kw = dict(guides=[Guide(adapter=str(run), prompt="a <v1> star on the left, at night", weight=5.0)],
              unconditional=str(run), n=1, steps=4)
    plain = np.stack(sample(models=models, **kw)[0])
    dci = np.stack(sample(models=models, sampler="dci", agg_time=0.6, dci_lambda=2.0, **kw)[0])
    assert dci.shape == plain.shape and not np.array_equal(dci, plain)


# ---- DCI ---------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("scale", [None, 7.8125])  # the authors' 500 (the default), and a smaller constant
def test_dci_blend_on_a_toy_attention_layer_matches_hand_computed_weights(scale):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from pristine.dci import BlendCrossAttention, BlendPlan

    torch.manual_seed(0)
    heads, dim_head, pixels, tokens = 2, 4, 5, 7
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=heads, dim_head=dim_head, bias=True).eval()
    x = torch.randn(2, pixels, 8)  # row 0: concept branch, row 1: auxiliary branch
    ctx = torch.randn(2, tokens, 6)
    concept_at, noun_at, len_c, len_a, lam = [2, 3], [2], 4, 3, 0.7
    plan = BlendPlan(0, 1, [concept_at], [noun_at], [len_c], [len_a], lam, *([scale] if scale else []))
    with torch.no_grad():
        got = BlendCrossAttention(AttnProcessor(), {"plan": plan})(attn, x, encoder_hidden_states=ctx)
        plain = BlendCrossAttention(AttnProcessor(), {"plan": None})(attn, x, encoder_hidden_states=ctx)
        reference = AttnProcessor()(attn, x, encoder_hidden_states=ctx)

    # by hand, in float64, pixel by pixel and head by head
    W = {n: getattr(attn, n).weight.detach().double().numpy() for n in ("to_q", "to_k", "to_v")}
    B = {n: getattr(attn, n).bias.detach().double().numpy() for n in ("to_q", "to_k", "to_v")}
    Wo, bo = attn.to_out[0].weight.detach().double().numpy(), attn.to_out[0].bias.detach().double().numpy()
    xs, cs = x.double().numpy(), ctx.double().numpy()
    probs = np.zeros((2, heads, pixels, tokens))
    outs = np.zeros((2, heads, pixels, dim_head))
    for b in range(2):
        q, k, v = (xs[b] @ W["to_q"].T + B["to_q"], cs[b] @ W["to_k"].T + B["to_k"], cs[b] @ W["to_v"].T + B["to_v"])
        for h in range(heads):
            sl = slice(h * dim_head, (h + 1) * dim_head)
            for p in range(pixels):
                probs[b, h, p] = _softmax(q[p, sl] @ k[:, sl].T / np.sqrt(dim_head))
                outs[b, h, p] = probs[b, h, p] @ v[:, sl]
    blended = outs.copy()
    for h in range(heads):
        a_c = np.array([sum(_softmax(10 * probs[0, h, p, 1:1 + len_c])[i - 1] for i in concept_at) for p in range(pixels)])
        a_a = np.array([1 - sum(_softmax(10 * probs[1, h, p, 1:1 + len_a])[i - 1] for i in noun_at) for p in range(pixels)])
        constant = scale or 500
        m_c, m_a = constant * _softmax(10 * a_c), constant * _softmax(10 * a_a)
        for p in range(pixels):
            w_c, w_a = _softmax(np.array([m_c[p], lam * m_a[p]]))
            blended[0, h, p] = w_c * outs[0, h, p] + w_a * outs[1, h, p]
    want = np.stack([np.concatenate([blended[b, h] for h in range(heads)], -1) @ Wo.T + bo for b in range(2)])
    assert np.allclose(got.double().numpy(), want, atol=1e-5)
    assert torch.allclose(plain, reference, atol=1e-6)
    assert torch.allclose(got[1], reference[1], atol=1e-6)  # the auxiliary row keeps its own output
    assert not torch.allclose(got[0], reference[0], atol=1e-4)  # the blend did something


def test_dci_with_agg_time_zero_is_plain_sampling_bit_for_bit_and_runs_both_branches_in_one_forward(tiny, lora_run):
    from pristine.sampling import Guide, Models, sample

    models = Models(str(tiny))
    kw = dict(guides=[Guide(adapter=str(lora_run), prompt="a big <v1> star on the left, on grass", weight=5.0)],
              unconditional=str(lora_run), n=2, steps=6, seed=3)
    plain = np.stack(sample(models=models, **kw)[0])
    zero = np.stack(sample(models=models, sampler="dci", agg_time=0.0, **kw)[0])
    assert np.array_equal(zero, plain)
    bb = models.run(str(lora_run)).backbone
    batches = []
    hook = bb.denoiser.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    early = np.stack(sample(models=models, sampler="dci", agg_time=0.5, dci_lambda=2.0, **kw)[0])
    hook.remove()
    assert not np.array_equal(early, plain)
    # DDIM's 6 steps are t = 833, 666, 500, ...: two with t/T > 1 - 0.5. While early ∅, the concept prompt
    # and the auxiliary branch are one forward of 3 x 2, then CFG's 2 x 2
    assert batches == [6, 6, 4, 4, 4, 4]
    own = np.stack(sample(models=models, sampler="dci", agg_time=0.5, dci_lambda=2.0, shared_guidance=False, **kw)[0])
    assert not np.array_equal(own, early)


PHRASINGS = [  # prompt, expected auxiliary prompt, how often the class noun appears in it
    ("a photo of <v1> star", "a photo of star", 1),
    ("<v1> star on the left, on grass", "star on the left, on grass", 1),
    ("a big red <v1> star, in cartoon style, next to a small blue circle", "a big red star, in cartoon style, next to a "
     "small blue circle", 1),
    ("a zigzag <v1> star and another star at night", "a zigzag star and another star at night", 2),
    ("an <v1> star in the center", "a star in the center", 1),
]


@pytest.mark.parametrize("vectors", [1, 2])
def test_token_positions_are_found_for_several_phrasings(tiny, vectors):
    from pristine.backbones import load_backbone
    from pristine.dci import branch_prompts

    bb = load_backbone(str(tiny))
    bb.add_tokens(["<v1>"], ["star"], vectors)
    tok = bb.tokenizer
    names = ["<v1>"] + [f"<v1>_{k}" for k in range(1, vectors)]
    for prompt, aux, nouns in PHRASINGS:
        found = branch_prompts(bb, prompt, {"<v1>": vectors}, {"<v1>": "star"})
        assert found["aux"] == aux
        ids = tok(bb.expand_prompt(prompt, {"<v1>": vectors})).input_ids
        assert [tok.convert_ids_to_tokens(ids[p]) for p in found["concept_at"]] == names
        aux_ids = tok(aux).input_ids
        assert [tok.convert_ids_to_tokens(aux_ids[p]).lower() for p in found["noun_at"]] == ["star</w>"] * nouns
        assert found["length_c"] == len(ids) - 2 and found["length_a"] == len(aux_ids) - 2


def test_dci_refuses_a_prompt_without_the_token(tiny, lora_run):
    from pristine.errors import UsageError
    from pristine.sampling import Guide, Models, sample

    with pytest.raises(UsageError, match="--sampler dci"):
        sample(models=Models(str(tiny)), sampler="dci", guides=[Guide(adapter=str(lora_run), prompt="a star", weight=5.0)],
               n=1, steps=2)


def test_context_bench_rows_share_runs_between_dci_and_plain_and_add_ico_to_training():
    from pristine.eval.minibench import BUDGETS
    from pristine.eval.minibench_context import CONTEXT_ROWS, row_training

    assert {name for name in CONTEXT_ROWS} == {f"{m}{s}" for m in ("lora", "custom_diffusion")
                                              for s in ("", "_ico", "_dci", "_ico_dci")}
    for method in ("lora", "custom_diffusion"):
        plain, ico = row_training(method, None), row_training(f"{method}_ico", None)
        assert row_training(f"{method}_dci", None) == plain and row_training(f"{method}_ico_dci", None) == ico
        assert plain[0] != ico[0]  # their own run folders
        assert "ico" not in plain[2] and ico[2]["ico"] is True
        assert ico[2]["lr"] == plain[2]["lr"] == BUDGETS[method]["lr"]
    assert row_training("lora_ico", 7)[2]["steps"] == 7


def test_ico_resumes_from_a_checkpoint_to_the_same_contexts_and_outputs(tiny, star_images, tmp_path):
    import shutil

    flags = ["--steps", "4", "--checkpoint-every", "2", "--ico"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _train(tiny, star_images, whole, *flags) == 0
    shutil.copytree(whole, resumed)
    for name in ("DONE", "pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        (resumed / name).unlink()
    (resumed / "checkpoints" / "step_0000004.safetensors").unlink()  # as if stopped after step 2
    assert _train(tiny, star_images, resumed, *flags, "--resume", "latest") == 0
    last = "checkpoints/step_0000004.safetensors"
    a, b = load_file(str(whole / last)), load_file(str(resumed / last))
    assert torch.equal(a["trainable.contexts.prefix"], b["trainable.contexts.prefix"])
    assert torch.equal(a["trainable.contexts.suffix"], b["trainable.contexts.suffix"])
    step2 = load_file(str(whole / "checkpoints/step_0000002.safetensors"))
    assert not torch.equal(step2["trainable.contexts.prefix"], a["trainable.contexts.prefix"])  # steps 3-4 moved them
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        wa, wb = load_file(str(whole / name)), load_file(str(resumed / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ico_is_refused_in_one_line_by_a_family_without_a_place_for_contexts(tmp_path):
    from tiny_families import build_tiny_sdxl

    from pristine.backbones import load_backbone
    from pristine.errors import UsageError

    bb = load_backbone(str(build_tiny_sdxl(tmp_path / "sdxl")))
    with pytest.raises(UsageError, match="--ico: the sdxl family"):
        bb.context_init("a", 1)


@pytest.mark.parametrize("value", [0, -3.0, float("nan"), True])
def test_a_bad_dci_scale_is_one_line_naming_the_setting(value):
    from pristine.errors import UsageError
    from pristine.sampling import SampleSettings

    with pytest.raises(UsageError, match=r"run.yaml.dci_scale \(--dci-scale\): a positive number"):
        SampleSettings.from_dict({"prompts": ["a <v1> star"], "sampler": "dci", "dci_scale": value}, "run.yaml")
