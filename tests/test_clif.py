"""CLIF (METHODS.md section 4): the contrastive loss, the Global/Region/Mix pairs, the three stages."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from pristine.cli import main  # noqa: E402
from pristine.clif_pairs import FILL, build_pairs  # noqa: E402
from pristine.methods.clif import clif_contrastive_loss  # noqa: E402


def _ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row if v != -math.inf)) - row[target]


def test_contrastive_loss_on_a_toy_batch_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # the third one normalises to [1, 0]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    keys = torch.tensor([1, 2, 1])  # pairs 0 and 2 show the same concept
    inf = -math.inf
    # scale 2 x cosine: rows are texts, columns images; (0, 2) and (2, 0) masked as same-concept
    logits = [[2.0, 0.0, inf], [0.0, 2.0, 1.6], [inf, 0.0, 1.2]]
    rows = sum(_ce(logits[i], i) for i in range(3)) / 3
    cols = sum(_ce([logits[j][i] for j in range(3)], i) for i in range(3)) / 3
    got = clif_contrastive_loss(text, image, keys, scale=2.0)
    assert got.item() == pytest.approx((rows + cols) / 2, rel=1e-6)

    # without the mask the duplicate is a negative: (0, 2) = 2 * 0.6, (2, 0) = 2 * 1
    full = [[2.0, 0.0, 1.2], [0.0, 2.0, 1.6], [2.0, 0.0, 1.2]]
    rows = sum(_ce(full[i], i) for i in range(3)) / 3
    cols = sum(_ce([full[j][i] for j in range(3)], i) for i in range(3)) / 3
    unmasked = clif_contrastive_loss(text, image, keys, scale=2.0, mask_same_concept=False)
    assert unmasked.item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    assert unmasked.item() > got.item() + 0.1
    # the authors' unnormalised features: the third text counts twice as much
    raw = [[2.0, 0.0, inf], [0.0, 2.0, 1.6], [inf, 0.0, 2.4]]
    rows = sum(_ce(raw[i], i) for i in range(3)) / 3
    cols = sum(_ce([raw[j][i] for j in range(3)], i) for i in range(3)) / 3
    assert clif_contrastive_loss(text, image, keys, 2.0, normalize=False).item() == pytest.approx((rows + cols) / 2, rel=1e-6)


def _concept_folder(folder: Path, name: str, token: str, masks: bool = True, n: int = 4) -> tuple[Path, list]:
    """A concept's references with captions naming the token, (optionally) the world's masks beside them,
    and the true masks."""
    from pristine.world.concepts import get_concept
    from pristine.world.export import write_concept_folder
    from pristine.world.render import render

    concept = get_concept(name)
    write_concept_folder(concept, token, folder, n=n, masks=masks)
    return folder, [render(scene)[1][0] for scene in concept.references(n)]


def _load(*specs):
    from pristine.data import ConceptImages, ConceptSpec

    return [ConceptImages.load(ConceptSpec(str(f), t, c)) for f, t, c in specs]


def test_region_and_mix_pairs_carry_their_captions_and_masks(tmp_path):
    star, star_truth = _concept_folder(tmp_path / "star", "ember_star", "<v1>")  # red with a yellow dot
    circle, _ = _concept_folder(tmp_path / "circle", "tide_circle", "<v2>")  # blue with a cyan band
    concepts = _load((star, "<v1>", "star"), (circle, "<v2>", "circle"))
    pairs = build_pairs(concepts, 32, "auto", mixes=6)
    kinds = [p.kind for p in pairs]
    assert kinds.count("global") == 8 and kinds.count("region") == 8 and kinds.count("mix") == 6

    globals_ = [p for p in pairs if p.kind == "global"]
    assert [p.caption for p in globals_[:4]] == concepts[0].captions
    assert np.array_equal(globals_[0].masks[0], star_truth[0])  # the world's mask, as given
    fill = np.asarray(FILL, np.uint8)
    for p in (p for p in pairs if p.kind == "region"):
        k = p.concepts[0]
        assert p.caption == ["a <v1> star", "a <v2> circle"][k] and p.concepts == (k,) and list(p.masks) == [k]
        m = p.masks[k]
        assert 0.2 < m.mean() < 0.8
        inside = p.image[m].astype(int)
        assert (p.image[~m] == fill).all(axis=-1).mean() > 0.9  # the rest is filled, the segment alone
        red, blue = inside[:, 0].mean(), inside[:, 2].mean()
        assert (red > blue + 60) if k == 0 else (blue > red + 60)
    mixes = [p for p in pairs if p.kind == "mix"]
    for p in mixes:
        assert p.concepts == (0, 1) and p.key == 0b11
        first, second = p.caption.split(" and ")
        assert first.endswith("on the left") and second.endswith("on the right")
        left = 0 if first.startswith("a <v1> star") else 1
        assert second.startswith(["a <v1> star", "a <v2> circle"][1 - left])
        xs = np.arange(32)
        for k in (0, 1):
            m = p.masks[k]
            centre = (m * xs[None, :]).sum() / m.sum()
            assert (centre < 16) == (k == left)
            inside = p.image[m].astype(int)
            red, blue = inside[:, 0].mean(), inside[:, 2].mean()
            assert (red > blue + 60) if k == 0 else (blue > red + 60)
        assert not (p.masks[0] & p.masks[1]).any()
    # three concepts: some Mix pairs show all three, the third at the top
    heart, _ = _concept_folder(tmp_path / "heart", "sunset_heart", "<v3>")
    three = build_pairs(_load((star, "<v1>", "star"), (circle, "<v2>", "circle"), (heart, "<v3>", "heart")), 32)
    triples = [p for p in three if p.kind == "mix" and len(p.concepts) == 3]
    assert triples and all(p.caption.count(" and ") == 2 and "at the top" in p.caption for p in triples)


def test_without_masks_a_superpixel_segment_or_a_crop(tmp_path):
    star, truth = _concept_folder(tmp_path / "star", "ember_star", "<v1>", masks=False)
    circle, _ = _concept_folder(tmp_path / "circle", "tide_circle", "<v2>", masks=False)
    concepts = _load((star, "<v1>", "star"), (circle, "<v2>", "circle"))
    from pristine.clif_pairs import concept_segment

    ious = []
    for path, image, m in zip(concepts[0].paths, concepts[0].images, truth):
        seg, how = concept_segment(path, np.asarray(image), "auto")
        assert how == "slic"
        ious.append((seg & m).sum() / (seg | m).sum())
    assert np.mean(ious) > 0.6, ious
    fill = np.asarray(FILL, np.uint8)
    pairs = build_pairs(concepts, 32, "crop")
    globals_, crops = [p for p in pairs if p.kind == "global"], [p for p in pairs if p.kind == "region"]
    for g, p in zip(globals_, crops):
        if not (g.image[0, 0] == fill).all():  # (the world's white background is the fill colour itself)
            assert not (p.image == fill).all(-1).any()  # a crop keeps its background
    with pytest.raises(Exception, match="segments=auto"):
        build_pairs(concepts, 32, "masks")


@pytest.fixture(scope="module")
def two_concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clif")
    from tiny_model import build_tiny_clip

    star, _ = _concept_folder(root / "star", "ember_star", "<v1>")
    heart, _ = _concept_folder(root / "heart", "sunset_heart", "<v2>")
    return {"root": root, "star": star, "heart": heart, "clip": build_tiny_clip(root / "clip")}


def _config(tiny, w, out: Path, **method_args) -> Path:
    import yaml

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({
        "model": str(tiny), "method": "clif", "out": str(out), "lr": 1e-2, "batch_size": 2,
        "method_args": {"clip": str(w["clip"]), "vectors": 2, "pairs_batch": 6, "stage1_lr": 1e-2, "rank": 2,
                        "alpha": 2, **method_args},
        "concepts": [{"images": str(w["star"]), "token": "<v1>", "class_word": "star"},
                     {"images": str(w["heart"]), "token": "<v2>", "class_word": "heart"}]}))
    return path


def _embeds(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "learned_embeds.safetensors"))


def _stages(run: Path) -> list[int]:
    return [json.loads(line)["stage"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_three_stages_chain_and_the_embeddings_load_in_diffusers(tiny, two_concepts, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    w = two_concepts
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    assert main(["train", "--config", str(_config(tiny, w, s1, stage="1")), "--steps", "3"]) == 0
    assert _stages(s1) == [1, 1, 1] and not (s1 / "pytorch_lora_weights.safetensors").exists()
    e1 = _embeds(s1)
    assert sorted(e1) == ["<v1>", "<v2>"] and all(v.shape == (2, 32) for v in e1.values())  # two vectors per concept
    base = StableDiffusionPipeline.from_pretrained(str(tiny))
    rows = base.text_encoder.get_input_embeddings().weight
    init = {t: rows[base.tokenizer(c, add_special_tokens=False).input_ids].mean(0) for t, c in (("<v1>", "star"), ("<v2>", "heart"))}
    assert all(not torch.allclose(e1[t][0], init[t], atol=1e-4) for t in init)  # stage 1 moved them

    # stage 2 starts from stage 1's embeddings: at a vanishing rate it keeps them
    assert main(["train", "--config", str(_config(tiny, w, s2, stage="2", previous_run=str(s1), token_lr=1e-12)),
                 "--steps", "2"]) == 0
    e2 = _embeds(s2)
    assert _stages(s2) == [2, 2] and all(torch.allclose(e2[t], e1[t], atol=1e-6) for t in e1)
    assert main(["train", "--config", str(_config(tiny, w, s3, stage="3", previous_run=str(s2))), "--steps", "2"]) == 0
    assert _stages(s3) == [3, 3] and (s3 / "pytorch_lora_weights.safetensors").is_file()
    e3 = _embeds(s3)
    assert sorted(e3) == ["<v1>", "<v2>"] and not torch.allclose(e3["<v1>"], e2["<v1>"])  # trained jointly

    # the run's outputs as the ecosystem loads them: diffusers' load_textual_inversion, one entry per token
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    pipe.load_lora_weights(str(s3))
    pipe.load_textual_inversion([e3["<v1>"], e3["<v2>"]], token=["<v1>", "<v2>"])
    assert pipe.tokenizer.convert_tokens_to_ids("<v2>_1") != pipe.tokenizer.unk_token_id
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids("<v2>_1")], e3["<v2>"][1])
    pipe("a <v1> star on the left and a <v2> heart on the right, on grass", num_inference_steps=2, output_type="np")
    # and through `pristine sample`
    assert main(["sample", "--model", str(tiny), "--adapter", str(s3), "--prompt",
                 "a <v1> star on the left and a <v2> heart on the right", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0

    # a stage that does not follow the run it names is refused, naming it
    capsys.readouterr()
    assert main(["train", "--config", str(_config(tiny, w, tmp_path / "bad", stage="3", previous_run=str(s1))),
                 "--steps", "1"]) == 2
    assert "previous_run" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_all_stages_in_one_run_resume_to_the_same_weights(tiny, two_concepts, tmp_path, monkeypatch):
    from pristine.methods.clif import Clif

    w = two_concepts
    flags = ["--steps", "6", "--checkpoint-every", "1"]
    straight = tmp_path / "straight"
    config = dict(stage="all", stage1_steps=2, stage2_steps=2)
    assert main(["train", "--config", str(_config(tiny, w, straight, **config)), *flags]) == 0
    assert _stages(straight) == [1, 1, 2, 2, 3, 3]

    stopped = tmp_path / "stopped"
    real_loss = Clif.loss

    def stop_in_stage_two(self, batch, generator, prior_weight=1.0):
        if batch["step"] == 3:
            raise KeyboardInterrupt
        return real_loss(self, batch, generator, prior_weight)

    monkeypatch.setattr(Clif, "loss", stop_in_stage_two)
    assert main(["train", "--config", str(_config(tiny, w, stopped, **config)), *flags]) == 130  # as Ctrl-C
    monkeypatch.setattr(Clif, "loss", real_loss)
    assert not (stopped / "DONE").exists()
    assert main(["train", "--config", str(_config(tiny, w, stopped, **config)), *flags, "--resume", "latest"]) == 0
    from safetensors.torch import load_file

    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(stopped / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _stages(stopped) == [1, 1, 2, 2, 3, 3]


def test_dump_pairs_writes_pictures_masks_and_captions(tiny, two_concepts, tmp_path, capsys):
    w = two_concepts
    out = tmp_path / "pairs"
    assert main(["train", "--config", str(_config(tiny, w, tmp_path / "run", mixes=3)), "--dump-pairs", str(out)]) == 0
    assert not (tmp_path / "run").exists()  # nothing trained
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines].count("mix") == 3 and len(lines) == 4 + 4 + 4 + 4 + 3
    for r in lines:
        with Image.open(out / r["file_name"]) as im:
            assert im.size == (16, 16)  # the tiny CLIP's image size
        assert all((out / f).is_file() for f in r["masks"].values())
        assert all(t in r["text"] for t in r["concepts"])
