import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_sd  # noqa: E402

from pristine.cli import main  # noqa: E402
from pristine.world.concepts import get_concept  # noqa: E402
from pristine.world.render import render  # noqa: E402

METHODS = ("lora", "textual_inversion", "dreambooth", "custom_diffusion")


def train_cli(capsys, *argv):
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_its_output_loads_in_diffusers(tiny, star_images, tmp_path, capsys, method):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / method
    code, err = train_cli(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--method", method, "--out", str(run), "--steps", "3",
                          "--lr", "1e-2", "--export", "kohya")
    assert code == 0, err
    assert (run / "config.yaml").is_file() and (run / "DONE").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3

    def image(pipe):
        return pipe("a photo of <v1> star", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    base = StableDiffusionPipeline.from_pretrained(str(tiny), local_files_only=True)
    if method == "dreambooth":
        pipe = StableDiffusionPipeline.from_pretrained(str(run / "model"), local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny), local_files_only=True)
        pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"), token="<v1>")
        base.load_textual_inversion(str(run / "learned_embeds.safetensors"), token="<v1>")
        if method == "lora":
            pipe.load_lora_weights(str(run))
            from safetensors.torch import load_file

            kohya = load_file(str(run / "lora_kohya.safetensors"))
            assert all(k.startswith("lora_unet_") for k in kohya)
            assert any(".alpha" in k for k in kohya)
        if method == "custom_diffusion":
            from pristine.methods.custom_diffusion import apply_custom_diffusion

            apply_custom_diffusion(pipe.unet, run / "custom_diffusion.safetensors")
    after = image(pipe)
    if method == "textual_inversion":  # only the embedding changed: the base with it loaded is the same model
        assert np.allclose(after, image(base))
    else:  # the adapter changes what the token prompt draws
        assert not np.allclose(after, image(base), atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_frozen_parameters_stay_bit_identical(tiny, star_images, method):
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods import get_method

    spec = ConceptSpec(str(star_images), "<v1>", "star")
    backbone = load_backbone(str(tiny))
    cls = get_method(method)
    m = cls(cls.Config(), backbone, [spec])
    groups = m.setup()
    new_rows = m.tokens.ids
    initial_rows = m.tokens.rows.detach().clone()
    before = {n: p.detach().clone() for mod in (backbone.unet, backbone.text_encoder, backbone.vae)
              for n, p in mod.named_parameters(prefix=type(mod).__name__)}
    data = build_training_set([ConceptImages.load(spec)], 32)
    cache_latents(data, backbone)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        loss, _ = m.loss(data.draw(2, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = {id(p) for grp in groups for p in grp["params"]}
    changed = set()
    for mod in (backbone.unet, backbone.text_encoder, backbone.vae):
        for n, p in mod.named_parameters(prefix=type(mod).__name__):
            if n not in before:
                continue  # adapter weights added by setup
            if id(p) not in trainable:
                assert torch.equal(p, before[n]), n
            elif not torch.equal(p, before[n]):
                changed.add(n)
    # the new tokens learn in their own rows; the vocabulary matrix is untouched until written back
    if not torch.equal(m.tokens.rows, initial_rows):
        changed.add("token rows")
    m.tokens.write_back()
    emb = backbone.text_encoder.get_input_embeddings().weight
    others = torch.ones(len(emb), dtype=torch.bool)
    others[new_rows] = False
    (emb_before,) = [v for n, v in before.items() if "token_embedding" in n]
    assert torch.equal(emb[others], emb_before[others])
    assert torch.equal(emb[new_rows], m.tokens.rows.detach())
    assert changed or method == "lora"  # lora's own weights are new parameters
    lora = [p for n, p in backbone.unet.named_parameters() if "lora_B" in n]
    if method == "lora":
        assert lora and any(p.abs().sum() > 0 for p in lora)


def test_resume_ends_with_the_same_weights(tiny, star_images, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--steps", "6", "--checkpoint-every", "2", "--lr", "1e-2"]
    assert train_cli(capsys, *common, "--out", str(tmp_path / "a"))[0] == 0
    # a run killed after step 4: keep its checkpoint at step 4, remove the rest, resume
    assert train_cli(capsys, *common, "--out", str(tmp_path / "b"))[0] == 0
    b = tmp_path / "b"
    for p in ("DONE", "pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        (b / p).unlink()
    (b / "checkpoints" / "step_0000006.safetensors").unlink()
    code, err = train_cli(capsys, *common, "--out", str(b), "--resume", "latest")
    assert code == 0, err
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        x, y = load_file(str(tmp_path / "a" / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    code, err = train_cli(capsys, *common, "--out", str(b))
    assert code == 2 and "--resume" in err


def test_yaml_config_with_two_concepts_and_v_prediction(tmp_path, star_images, capsys):
    tiny_v = build_tiny_sd(tmp_path / "tiny_v", prediction_type="v_prediction", layers_per_block=1)
    heart = tmp_path / "heart"
    heart.mkdir()
    for k, scene in enumerate(get_concept("sunset_heart").references(4)):
        Image.fromarray(render(scene)[0]).save(heart / f"{k}.png")
        (heart / f"{k}.txt").write_text("a photo of <v2> heart")
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {tiny_v}
method: lora
method_args: {{rank: 2, alpha: 2}}
out: {tmp_path / 'run'}
steps: 2
batch_size: 2
mixed_precision: bf16
gradient_accumulation: 2
gradient_checkpointing: true
lr_scheduler: cosine
warmup_steps: 1
concepts:
  - {{images: {star_images}, token: "<v1>", class_word: star}}
  - {{images: {heart}, token: "<v2>", class_word: heart}}
""")
    code, err = train_cli(capsys, "--config", str(config))
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [c["token"] for c in saved["concepts"]] == ["<v1>", "<v2>"]
    # the given settings, and the method's defaults written out beside them
    assert saved["method_args"]["rank"] == 2 and saved["method_args"]["alpha"] == 2 and saved["method_args"]["train_token"] is True
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))) == {"<v1>", "<v2>"}


def test_image_modes_exif_and_captions(tmp_path):
    from pristine.data import ConceptImages, ConceptSpec

    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.zeros((40, 20, 3), np.uint8)
    rgb[:10] = 255
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 20), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")
    Image.fromarray(rgb).save(folder / "pic.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored sideways
    Image.fromarray(rgb).save(folder / "rot.jpg", exif=exif)
    (folder / "pic.txt").write_text("a <v1> star on grass")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "rot.jpg", "text": "<v1> star, rotated"}) + "\n")
    c = ConceptImages.load(ConceptSpec(str(folder), "<v1>", "star"))
    assert all(im.mode == "RGB" for im in c.images)
    sizes = {p.name: im.size for p, im in zip(c.paths, c.images)}
    assert sizes["rot.jpg"] == (40, 20) and sizes["gray.png"] == (20, 40)
    captions = dict(zip([p.name for p in c.paths], c.captions))
    assert captions["pic.webp"] == "a <v1> star on grass" and captions["rot.jpg"] == "<v1> star, rotated"
    assert "<v1> star" in captions["gray.png"]  # a template


def _one_line_error(code, err, *words):
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_training_errors(tiny, star_images, tmp_path, capsys):
    base = ["--model", str(tiny), "--token", "<v1>", "--class-word", "star", "--steps", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(*train_cli(capsys, *base, "--images", str(empty), "--out", str(tmp_path / "r1")), str(empty))
    _one_line_error(*train_cli(capsys, *base, "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")), "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    _one_line_error(*train_cli(capsys, *base, "--images", str(bad), "--out", str(tmp_path / "r3")), "broken.png")
    _one_line_error(*train_cli(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "star",
                               "--class-word", "star", "--out", str(tmp_path / "r4")), "vocabulary")
    _one_line_error(*train_cli(capsys, *base, "--images", str(star_images), "--method", "magic",
                               "--out", str(tmp_path / "r5")), "magic")
    _one_line_error(*train_cli(capsys, "--model", str(tmp_path), "--images", str(star_images), "--token", "<v1>",
                               "--class-word", "star", "--out", str(tmp_path / "r6")), "model_index.json")
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'r7'}\nstepz: 3\n")
    _one_line_error(*train_cli(capsys, "--config", str(config)), "stepz")
    config.write_text(f"out: {tmp_path / 'r7'}\nsteps: many\n")
    _one_line_error(*train_cli(capsys, "--config", str(config), "--images", str(star_images), "--token", "<v1>",
                               "--class-word", "star"), "steps")
    _one_line_error(*train_cli(capsys, *base, "--images", str(star_images), "--out", str(tmp_path / "r8"),
                               "--method-arg", "rnak=4"), "rnak")
    for r in ("r1", "r2", "r3", "r4", "r5", "r6"):
        assert not (tmp_path / r).exists()  # nothing half-written


def test_prior_preservation_samples_and_tensorboard(tiny, star_images, tmp_path, capsys):
    run = tmp_path / "runs" / "prior"
    code, err = train_cli(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--out", str(run), "--steps", "2", "--prior-preservation",
                          "--num-class-images", "3", "--sample-every", "2", "--sample-prompt", "a photo of <v1> star",
                          "--checkpoint-every", "1")
    assert code == 0, err
    cached = list((tmp_path / "runs" / ".class_images").glob("*/*.png"))
    assert len(cached) == 3  # generated once, reused by later runs
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert all("prior" in r for r in log)
    assert (run / "samples" / "step_0000002.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*"))
    assert len(list((run / "checkpoints").glob("*.safetensors"))) == 2  # keeps the latest two
    mtimes = [p.stat().st_mtime for p in cached]
    code, _ = train_cli(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>",
                        "--class-word", "star", "--out", str(tmp_path / "runs" / "prior2"), "--steps", "1",
                        "--prior-preservation", "--num-class-images", "3")
    assert code == 0 and [p.stat().st_mtime for p in cached] == mtimes


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny, star_images, tmp_path,
                                                                                    capsys, monkeypatch):
    from pristine.methods.lora import LoRA

    real_loss = LoRA.loss
    calls = {"n": 0}

    def loss(self, batch, generator, prior_weight=1.0):
        calls["n"] += 1
        value, logs = real_loss(self, batch, generator, prior_weight)
        return (value * float("nan") if calls["n"] == 3 else value), logs

    monkeypatch.setattr(LoRA, "loss", loss)
    run = tmp_path / "nan"
    code, err = train_cli(capsys, "--model", str(tiny), "--images", str(star_images), "--token", "<v1>",
                          "--class-word", "star", "--out", str(run), "--steps", "5", "--checkpoint-every", "2")
    _one_line_error(code, err, "nan", "step 3", "step_0000002")
    assert (run / "checkpoints" / "step_0000002.safetensors").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_on_pristine_mini(method):
    """A fixed probe (same images, noise and timesteps) before and after a few steps on mini."""
    from pristine.backbones import load_backbone
    from pristine.data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from pristine.methods import get_method
    from pristine.world.concepts import get_concept

    import tempfile

    concept = get_concept("tide_circle")
    with tempfile.TemporaryDirectory() as d:
        for k, scene in enumerate(concept.references(5)):
            Image.fromarray(render(scene)[0]).save(Path(d) / f"{k}.png")
            (Path(d) / f"{k}.txt").write_text(concept.prompt("<v1>", scene))
        spec = ConceptSpec(d, "<v1>", "circle")
        backbone = load_backbone("mini")
        cls = get_method(method)
        m = cls(cls.Config(), backbone, [spec])
        groups = m.setup()
        data = build_training_set([ConceptImages.load(spec)], 32, flip=False)
    cache_latents(data, backbone)
    probe = {"prompts": data.prompts, "latents": data.latents[:, 0], "is_prior": data.is_prior}

    def probe_loss():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(m.loss(probe, g)[0].item() for _ in range(8))

    lr = {"lora": 1e-3, "textual_inversion": 5e-3, "dreambooth": 1e-4, "custom_diffusion": 1e-4}[method]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    before = probe_loss()
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        loss, _ = m.loss(data.draw(4, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < 0.99 * before


def test_repeated_prompts_are_encoded_once_with_the_same_values_and_gradients(tiny):
    """A batch with one instance prompt runs the text encoder once; each copy's gradient reaches the token."""
    from pristine.backbones import load_backbone
    from pristine.data import ConceptSpec
    from pristine.methods.base import TokenEmbeddings, encode_distinct

    bb = load_backbone(str(tiny))
    tokens = TokenEmbeddings(bb, [ConceptSpec("unused", "<v1>", "star")])
    rows = tokens.make_trainable()
    # in float64: float32 rounding differs between one backward of the summed copies and three backwards
    bb.text_encoder.to(torch.float64)
    rows[0].data = rows[0].data.double()
    prompts = [tokens.prompt(p) for p in ["a photo of <v1> star", "a <v1> star on grass", "a photo of <v1> star",
                                          "a photo of <v1> star"]]
    calls = []
    original = bb.encode_prompts
    bb.encode_prompts = lambda ps: calls.append(list(ps)) or original(ps)
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64).view(4, 1, 1)

    def loss_and_grad(encode):
        for r in rows:
            r.grad = None
        out = encode(prompts)
        (out["encoder_hidden_states"] * weights).pow(2).sum().backward()
        return out["encoder_hidden_states"].detach(), rows[0].grad.clone()

    distinct, grad_distinct = loss_and_grad(lambda ps: encode_distinct(bb, ps))
    assert calls[-1] == [prompts[0], prompts[1]]  # two distinct prompts, in first-seen order
    full, grad_full = loss_and_grad(original)
    assert torch.allclose(distinct, full, atol=1e-12)
    assert grad_full.abs().sum() > 0 and torch.allclose(grad_distinct, grad_full, rtol=1e-9, atol=1e-12)
