import difflib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pristine.mini as mini
from pristine.world import PRETRAINING_WORLD, render
from pristine.world.captions import caption
from pristine.world.concepts import DEV_CONCEPTS

MODEL = Path(mini.path())


def test_folder_is_a_stable_diffusion_model_of_fp16_safetensors_within_60mb():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "clip", "oracle"):
        assert (MODEL / part).is_dir(), part
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 5
    assert sum(p.stat().st_size for p in weights) <= 60 * 2**20
    from safetensors import safe_open

    for p in weights:
        with safe_open(str(p), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"F16", "I64"}, (p, dtypes)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(mini.path(), torch_dtype=torch.float32, local_files_only=True)


def test_loads_offline_through_diffusers_and_generates(pipe):
    out = pipe(["a big red star on the left, on grass"] * 2, num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.02
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_vae_maps_32px_images_to_4x16x16_latents_and_back(pipe):
    scene = PRETRAINING_WORLD.sample(np.random.default_rng(0))
    x = torch.from_numpy(render(scene)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        back = pipe.vae.decode(z).sample
    assert z.shape == (1, 4, 16, 16)  # v3: one downsampling, so a 1-pixel rim survives
    assert (back - x).abs().mean() < 0.1  # reconstructs, not just shapes right


def test_tokenizer_round_trips_english_and_added_tokens(pipe):
    tok = pipe.tokenizer
    text = "a photo of a big red star on grass, naïve café — twice!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",").replace(" !", "!") == text.lower()
    assert tok.eos_token_id not in tok("x42 ☃ ñ").input_ids[1:-1]  # digits and any unicode: byte-level, no unknowns
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # Stable Diffusion's ids
    n = len(tok)
    tok.add_tokens(["<v1>", "<v2>"])
    ids = tok("a <v1> star next to a <v2> circle").input_ids
    assert n in ids and n + 1 in ids
    assert tok.convert_ids_to_tokens(ids)[2] == "<v1>"
    pipe.text_encoder.resize_token_embeddings(len(tok))
    with torch.no_grad():
        h = pipe.text_encoder(torch.tensor([ids])).last_hidden_state
    assert h.shape == (1, len(ids), pipe.unet.config.cross_attention_dim)


def test_whole_clip_matches_captions_to_their_images():
    model, processor = mini.load_clip()
    rng = np.random.default_rng(11)
    scenes = [PRETRAINING_WORLD.sample(rng) for _ in range(32)]
    images = [render(s)[0] for s in scenes]
    inputs = processor(text=[caption(s) for s in scenes], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    top1 = (logits.argmax(1) == torch.arange(32)).float().mean().item()
    assert top1 > 0.3  # chance is 1/32


@pytest.fixture(scope="module")
def oracle():
    return mini.load_oracle()


def test_oracle_selftest_on_a_small_sample(oracle):
    from pristine.mini.score import selftest

    acc = selftest(oracle, n=300, seed=777)
    for attribute in ("shape", "color", "size", "position", "pattern", "background", "style"):
        assert acc[f"base.{attribute}"] >= 0.96, (attribute, acc)
        assert acc[f"full.{attribute}"] >= 0.8, (attribute, acc)


def test_oracle_reads_a_render(oracle):
    scene = PRETRAINING_WORLD.sample(np.random.default_rng(21), n_objects=1)
    reading = oracle.read([render(scene)[0]])[0]
    obj = scene.objects[0]
    assert len(reading["objects"]) == 1
    assert {k: reading["objects"][0][k] for k in ("shape", "color", "position")} == {
        "shape": obj.shape, "color": obj.color, "position": obj.position}
    assert reading["background"] == scene.background


def test_oracle_embedding_tells_concepts_apart(oracle):
    rng = np.random.default_rng(3)
    hits = 0
    for concept in DEV_CONCEPTS:
        others = [c for c in DEV_CONCEPTS if c.name != concept.name]
        refs = oracle.embedding([render(s)[0] for s in concept.references(5)])
        own = oracle.embedding([render(concept.scene(rng))[0] for _ in range(4)])
        other = oracle.embedding([render(others[k].scene(rng))[0] for k in range(4)])
        hits += int((own @ refs.T).mean() > (other @ refs.T).mean())
    assert hits == len(DEV_CONCEPTS)


def test_plain_from_pretrained_generates_on_cpu():
    """What a diffusers user types first: no dtype, no other argument."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(mini.path())
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a big red star on the left, on grass", height=32, width=32, num_inference_steps=2).images[0]
    assert image.size == (32, 32)


def test_readme_python_example_runs_as_written(tmp_path):
    import os
    import re
    import subprocess
    import sys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no Python example"
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.xfail(strict=True, reason="issue 10: the shipped CLIP's swapped captions are below the bar (docs/MINI.md, What is missing); "
                                       "strict: this fails once the CLIP meets the bar, so the marker must then go")
def test_clip_reads_every_attribute_on_a_small_sample():
    """The issue's bar on 500 renders; here 100, so a few points of sampling slack."""
    from pristine.mini import clip_reading
    from pristine.mini.tokenizer import load_tokenizer

    model, _ = mini.load_clip()
    result = clip_reading.check(model, load_tokenizer(MODEL / "tokenizer"), n=100, seed=5)
    for name, bar in clip_reading.ZERO_SHOT_BAR.items():
        assert result[f"zero_shot.{name}"] >= bar - 0.05, (name, result)
    assert result["swapped_caption"] >= clip_reading.SWAP_BAR - 0.05, result


def test_swapped_captions_say_one_thing_wrong_in_the_same_words():
    from pristine.mini.clip_reading import caption_with_negatives, swapped_scenes

    rng = np.random.default_rng(4)
    for _ in range(20):
        scene = PRETRAINING_WORLD.sample(rng, n_objects=2)
        positive, negatives = caption_with_negatives(scene, 123, 3, rng)
        assert positive == caption(scene, np.random.default_rng(123))
        for neg in negatives:
            assert neg != positive
            changes = [op for op in difflib.SequenceMatcher(None, positive.split(), neg.split()).get_opcodes() if op[0] != "equal"]
            assert 1 <= len(changes) <= 2, (positive, neg)  # one value, or one value exchanged between two objects
        a, b = scene.objects
        exchanged = [s for s in swapped_scenes(scene) if {s.objects[0].color, s.objects[1].color} == {a.color, b.color}
                     and s.objects[0].color == b.color and a.color != b.color]
        assert len(exchanged) == (a.color != b.color)


def test_negatives_are_drawn_by_kind_so_exchanges_between_objects_come_up():
    """Among some sixty swaps of a two-object scene its one to three exchanges between the objects
    would be one negative in twenty; drawn kind by kind, three negatives hold one in about a third of
    the scenes, and the three are of three kinds."""
    from pristine.mini.clip_reading import caption_with_negatives, swaps_by_kind

    rng, with_exchange, scenes = np.random.default_rng(7), 0, 0
    while scenes < 60:
        scene = PRETRAINING_WORLD.sample(rng, n_objects=2)
        kinds = swaps_by_kind(scene)
        if "binding" not in kinds:
            continue
        scenes += 1
        _, negatives = caption_with_negatives(scene, 123, 3, rng)
        kind_of = {caption(s, np.random.default_rng(123)): kind for kind, swaps in kinds.items() for s in swaps}
        drawn = [kind_of.get(text) for text in negatives]
        assert len(set(drawn)) == 3, drawn
        with_exchange += "binding" in drawn
    assert with_exchange >= 12, with_exchange  # drawn from all swaps alike: about 60 * 3 / 20 = 9


def _stage_state(work: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / stage.replace("-", "_") / "state.safetensors"))


@pytest.mark.parametrize("stage", ["vae", "clip", "unet", "unet-joint", "clip-image", "clip-negatives", "clip-binding", "vae-world", "vae16"])  # oracle: below, stopped mid-run
def test_every_pretraining_stage_resumes_to_the_same_weights(tmp_path, stage):
    """Two steps, stop, one more: the same weights and optimizer moments as three straight steps
    (within the warm-up the schedule does not depend on the total)."""
    from pristine.cli import main

    base = tmp_path / "base"
    for part in ("vae", "text_encoder", "tokenizer", "unet", "clip"):
        shutil.copytree(MODEL / part, base / part)
    states = {}
    for name, schedule in (("straight", (3,)), ("resumed", (2, 3))):
        work, out = tmp_path / name / "work", tmp_path / name / "model"
        shutil.copytree(base, out)
        for steps in schedule:
            args = ["mini", "pretrain", "--stage", stage, "--steps", str(steps), "--corpus-size", "64",
                    "--workdir", str(work), "--out", str(out), "--batch-size", "8"]
            assert main(args) == 0
        states[name] = _stage_state(work, stage)
        log = [json.loads(line) for line in (work / stage.replace("-", "_") / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3] and all("wall" in r for r in log)
    assert states["straight"].keys() == states["resumed"].keys()
    # float kernels may differ in the last bits between calls (and a key bias, whose gradient is only
    # rounding noise, is all last bits); a lost optimizer state, a repeated
    # batch or a wrong step count would differ by far more (the Adam moments by whole percents)
    assert any(k.startswith("optim.") for k in states["straight"])
    for key, value in states["straight"].items():
        if key != "rng.torch":
            assert torch.allclose(value.double(), states["resumed"][key].double(), rtol=1e-5, atol=1e-7), key


def test_after_clip_image_clip_negatives_starts_from_its_tower_and_clip_binding_from_the_folders_clip(tmp_path):
    """clip-negatives trains a CLIP whose image tower is clip-image's (a new text tower), not a
    fine-tune of the model folder's CLIP; clip-binding fine-tunes the folder's CLIP, mining negatives."""
    from safetensors.torch import load_file

    from pristine.cli import main

    out, work = tmp_path / "model", tmp_path / "work"
    for part in ("clip", "tokenizer"):
        shutil.copytree(MODEL / part, out / part)
    common = ["--corpus-size", "64", "--workdir", str(work), "--out", str(out), "--batch-size", "8"]
    assert main(["mini", "pretrain", "--stage", "clip-image", "--steps", "2", *common]) == 0
    shipped = load_file(str(MODEL / "clip" / "model.safetensors"))
    assert main(["mini", "pretrain", "--stage", "clip-binding", "--steps", "2", *common]) == 0  # before clip-negatives rewrites out/clip
    init = load_file(str(work / "clip_binding" / "init" / "model.safetensors"))
    assert all(torch.equal(init[k], shipped[k]) for k in shipped)
    log = [json.loads(line) for line in (work / "clip_binding" / "log.jsonl").read_text().splitlines()]
    assert any("mined_acc" in r for r in log)  # how often the true caption beats the mined negatives
    assert main(["mini", "pretrain", "--stage", "clip-negatives", "--steps", "1", *common]) == 0
    tower = load_file(str(work / "clip_image" / "tower" / "model.safetensors"))
    init = load_file(str(work / "clip_negatives" / "init" / "model.safetensors"))
    key = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(init[key], tower[key]) and not torch.allclose(init[key].float(), shipped[key].float())
    log = [json.loads(line) for line in (work / "clip_image" / "log.jsonl").read_text().splitlines()]
    assert {"shape", "color", "background"} <= set(log[-1])  # per-attribute accuracies are logged


def test_per_place_read_outs_train_on_both_towers(tmp_path):
    """binding_weight: each tower's per-place read-out is trained and its accuracy logged."""
    from pristine.mini import pretrain as P

    out, work = tmp_path / "model", tmp_path / "work"
    for part in ("clip", "tokenizer"):
        shutil.copytree(MODEL / part, out / part)
    settings = P.StageSettings(steps=1, batch_size=8, lr=1e-4, warmup=1, checkpoint_every=1)
    work.mkdir()
    P.pretrain_clip_negatives(work, out, P.build_corpus(work, 32, workers=1), settings, binding_weight=1.0, stage="clip_binding")
    record = json.loads((work / "clip_binding" / "log.jsonl").read_text().splitlines()[-1])
    assert record["binding"] > 0 and 0 <= record["image_slots"] <= 1 and 0 <= record["text_slots"] <= 1


def test_mined_negatives_are_the_ones_the_clip_scores_highest():
    from transformers import CLIPModel

    from pristine.mini import clip_reading as R
    from pristine.mini.pretrain import _mine_negatives
    from pristine.mini.tokenizer import load_tokenizer
    from pristine.world import PRETRAINING_WORLD, render
    from pristine.mini.oracle import to_tensor

    clip = CLIPModel.from_pretrained(MODEL / "clip", torch_dtype=torch.float32).eval()
    ids = R.TextEncoderCache(load_tokenizer(MODEL / "tokenizer"))
    rng = np.random.default_rng(0)
    scenes = [PRETRAINING_WORLD.sample(rng, n_objects=n) for n in (1, 2, 2)]
    img = R.image_features(clip, to_tensor([render(s)[0] for s in scenes]))
    seeds, drawn = [11, 12, 13], []
    for scene, seed in zip(scenes, seeds):
        drawn.append(R.caption_with_negatives(scene, seed, 3 + (4 if len(scene.objects) == 1 else 0), rng)[1])
    out = _mine_negatives(clip, ids, img, scenes, seeds, drawn, 4, np.random.default_rng(5), "cpu")
    assert len(out) == 3 * 7 and out[:7] == drawn[0]  # a single object keeps its drawn seven
    pool_rng = np.random.default_rng(5)  # the pools _mine_negatives drew, drawn again
    for b in (1, 2):
        pool = R.some_negatives(scenes[b], seeds[b], 16, pool_rng, skip=set(drawn[b]))
        mined = out[7 * b + 3 : 7 * b + 7]
        assert out[7 * b : 7 * b + 3] == drawn[b] and set(mined) <= set(pool) and not set(mined) & set(drawn[b])
        with torch.no_grad():
            scores = R.text_features(clip, ids(pool)) @ img[b]
        top = {pool[j] for j in scores.argsort(descending=True)[:4].tolist()}
        assert set(mined) == top


def test_oracle_marks_continues_the_model_folders_oracle_on_dots_and_rims(tmp_path):
    from safetensors.torch import load_file

    from pristine.cli import main
    from pristine.mini.pretrain import ORACLE_MARKS_MIX, labelled_renders

    out, work = tmp_path / "model", tmp_path / "work"
    shutil.copytree(MODEL / "oracle", out / "oracle")
    args = ["mini", "pretrain", "--stage", "oracle-marks", "--steps", "1", "--corpus-size", "24", "--batch-size", "8",
            "--workdir", str(work), "--out", str(out)]
    assert main(args) == 0
    init, shipped = load_file(str(work / "oracle_marks" / "init" / "model.safetensors")), load_file(str(MODEL / "oracle" / "model.safetensors"))
    assert all(torch.equal(init[k], shipped[k]) for k in shipped)
    trained = load_file(str(out / "oracle" / "model.safetensors"))
    assert not all(torch.equal(trained[k], shipped[k]) for k in shipped)  # one step moved it
    assert (out / "oracle" / "selftest.json").exists()
    _, _, scenes = labelled_renders(8, seed=1, mix=ORACLE_MARKS_MIX)
    assert {o.marking for o in scenes[3].objects} <= {"dot", "rim"}  # every fourth render: dots and rims only
    assert main([*args[:-1], str(tmp_path / "none")]) == 2  # no oracle to continue: one line, exit 2


def test_slot_truth_names_each_object_at_its_place():
    from dataclasses import replace

    from pristine.mini.clip_reading import SLOTS, slot_truth
    from pristine.world import PRETRAINING_WORLD, vocab

    rng = np.random.default_rng(3)
    scene = next(s for s in (PRETRAINING_WORLD.sample(rng) for _ in range(200)) if len(s.objects) == 2)
    truth = slot_truth(scene)
    a, b = scene.objects
    for obj in (a, b):
        row = truth[vocab.POSITIONS.index(obj.position)]
        assert [values[i] for values, i in zip(SLOTS.values(), row)] == [getattr(obj, n) for n in SLOTS]
    assert (truth >= 0).any(1).sum() == 2  # the other places are empty
    exchanged = replace(scene, objects=(replace(a, position=b.position), replace(b, position=a.position)))
    assert (slot_truth(exchanged) != truth).any() or a == replace(b, position=a.position)


def test_oracle_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from pristine.mini import pretrain as P
    from pristine.mini.oracle import Oracle

    settings = P.StageSettings(steps=3, batch_size=8, lr=1e-3, warmup=1, checkpoint_every=1)
    P.pretrain_oracle(tmp_path / "once", tmp_path / "once" / "model", settings, n_train=24)

    degrade, calls = P.degrade, []

    def stop_at_the_third_step(x, g):  # a stop after two checkpointed steps
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return degrade(x, g)

    monkeypatch.setattr(P, "degrade", stop_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain_oracle(tmp_path / "twice", tmp_path / "twice" / "model", settings, n_train=24)
    monkeypatch.setattr(P, "degrade", degrade)
    acc = P.pretrain_oracle(tmp_path / "twice", tmp_path / "twice" / "model", settings, n_train=24)
    assert {"base.shape", "full.marking", "full.accent"} <= set(acc)
    assert len(P.read_log(tmp_path / "twice", "oracle")) == 3
    assert Oracle.load(tmp_path / "twice" / "model" / "oracle").config["full_res_convs"] == 2
    from safetensors.torch import load_file

    # the same batches and optimizer state; float sums may differ in the last bits
    once, twice = (load_file(str(tmp_path / w / "oracle" / "state.safetensors")) for w in ("once", "twice"))
    assert all(torch.allclose(once[k].float(), twice[k].float(), rtol=0, atol=1e-6) for k in once if k.startswith("model."))


def test_oracle_loads_folders_saved_before_full_resolution_layers(tmp_path):
    from pristine.mini.oracle import Oracle

    old = Oracle(full_res_convs=1)
    old.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["full_res_convs"]  # what earlier oracles wrote
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Oracle.load(tmp_path).config["full_res_convs"] == 1


def test_pristine_mini_dir_points_every_command_at_another_model_folder(tmp_path, monkeypatch, capsys):
    from pristine.cli import main

    other = tmp_path / "other"
    shutil.copytree(MODEL, other)
    monkeypatch.setenv("PRISTINE_MINI_DIR", str(other))
    assert mini.path() == str(other)
    monkeypatch.setenv("PRISTINE_MINI_DIR", str(tmp_path / "nowhere"))
    assert main(["mini", "score", "--n", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PRISTINE_MINI_DIR" in err[0] and "nowhere" in err[0]


def test_vae16_then_the_denoiser_gives_a_model_of_16x16_latents_that_draws_32_px(tmp_path, star_images, monkeypatch):
    """v3's recipe on tiny steps: vae16 writes a 4x16x16 autoencoder, unet-joint warm-starts the
    model folder's UNet on its latents, and the folder loads and draws 32-px pictures with no size
    given (the UNet's sample_size follows the grid)."""
    from pristine.cli import main

    out, work = tmp_path / "model", tmp_path / "work"
    shutil.copytree(MODEL, out)
    common = ["--corpus-size", "64", "--workdir", str(work), "--out", str(out), "--batch-size", "8"]
    assert main(["mini", "pretrain", "--stage", "vae16", "--steps", "2", *common]) == 0
    assert main(["mini", "pretrain", "--stage", "unet-joint", "--steps", "2", *common]) == 0
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["sample_size"] == 16 and len(unet_config["block_out_channels"]) == 4  # grown: one more level
    assert "_name_or_path" not in unet_config  # no work-folder path in a model that ships
    pipe = mini.load_pipeline(out)
    latents = pipe("a big red star", num_inference_steps=2, output_type="latent").images
    assert tuple(latents.shape) == (1, 4, 16, 16)
    image = pipe("a big red star", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    # every method's trainer and sampler take the new grid from the folder (PRISTINE_MINI_DIR)
    monkeypatch.setenv("PRISTINE_MINI_DIR", str(out))
    run = tmp_path / "lora"
    assert main(["train", "--model", "mini", "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--method", "lora", "--steps", "2", "--out", str(run)]) == 0
    assert main(["sample", "--adapter", str(run), "--prompt", "a photo of <v1> star", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid-00-seed0.png").size == (32, 32)


def test_grown_unet_computes_what_the_8x8_one_did_on_its_inner_levels():
    """v3's warm start: every level of v2's denoiser, moved one level in, gives the same output for
    the same input; the grown model takes 16x16 latents and returns 16x16 predictions."""
    from pristine.mini import architecture as arch

    torch.manual_seed(0)
    small = arch.new_unet(8).eval()
    for p in small.parameters():  # not the init's zeros: every weight must reach its new place
        p.data.normal_(0, 0.05)
    grown = arch.grow_unet(small).eval()
    h, temb = torch.randn(2, 64, 8, 8), torch.randn(2, 256)
    text = torch.randn(2, 77, arch.TEXT_WIDTH)
    with torch.no_grad():
        a, a_skips = small.down_blocks[0](h, temb, encoder_hidden_states=text)
        b, b_skips = grown.down_blocks[1](h, temb, encoder_hidden_states=text)
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(a_skips, b_skips))
        m = torch.randn(2, 192, 2, 2)
        assert torch.equal(small.mid_block(m, temb, encoder_hidden_states=text),
                           grown.mid_block(m, temb, encoder_hidden_states=text))
        up_in, skips = torch.randn(2, 192, 2, 2), (torch.randn(2, 128, 2, 2), torch.randn(2, 192, 2, 2))
        assert torch.equal(small.up_blocks[0](up_in, skips, temb, encoder_hidden_states=text),
                           grown.up_blocks[0](up_in, skips, temb, encoder_hidden_states=text))
        out = grown(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), text).sample
    assert out.shape == (2, 4, 16, 16) and grown.config.sample_size == 16
    with pytest.raises(ValueError, match="cannot grow"):
        arch.grow_unet(grown)
