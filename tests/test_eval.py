import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_sd  # noqa: E402

import pristine.mini as mini  # noqa: E402
from pristine.cli import main  # noqa: E402
from pristine.errors import UsageError  # noqa: E402
from pristine.eval.dreambench import parse, prompts_for, shared_dir  # noqa: E402


def _dreambench_beside_checkout() -> bool:
    try:
        return shared_dir().is_dir()
    except UsageError:
        return False


# The DreamBench prompts live in ../shared/dreambench, beside the checkout, not in the repo.
needs_dreambench = pytest.mark.skipif(not _dreambench_beside_checkout(),
                                      reason="../shared/dreambench is not beside this checkout")


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """A tiny CLIP and a tiny ViT built from configs, saved as local folders."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("metrics")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(Path(mini.MODEL_DIR) / "tokenizer")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def _folder(path: Path, n: int, seed: int, prompts: bool = True) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path / f"{i}.png")
        if prompts:
            (path / f"{i}.txt").write_text(f"a photo of <v1> dog number {i}")
    return path


@needs_dreambench
def test_dreambench_prompts_parse():
    classes, objects, live = parse(shared_dir() / "prompts_and_classes.txt")
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    cls, prompts = prompts_for("dog", "<v1>")
    assert cls == "dog" and prompts[0] == "a <v1> dog in the jungle" and "santa hat" in " ".join(prompts)
    cls, prompts = prompts_for("teapot", "<v1>")
    assert "santa hat" not in " ".join(prompts) and len(prompts) == 25


def test_eval_scores_an_image_folder(metric_models, tmp_path, capsys):
    clip, dino = metric_models
    gen = _folder(tmp_path / "gen", 4, 0)
    refs = _folder(tmp_path / "refs", 3, 1, prompts=False)
    code = main(["eval", "--images", str(gen), "--references", str(refs), "--clip", str(clip), "--dino", str(dino),
                 "--token", "<v1>", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["n_images"] == 4 and all(-1 <= result[k] <= 1 for k in ("clip_t", "clip_i", "dino"))
    # identical pictures score the maximum against themselves
    code = main(["eval", "--images", str(gen), "--references", str(gen), "--dino", str(dino), "--json"])
    same = json.loads(capsys.readouterr().out)["dino"]
    assert same > result["dino"]


def test_eval_errors(metric_models, tmp_path, capsys):
    clip, _ = metric_models
    gen = _folder(tmp_path / "gen", 2, 0)
    assert main(["eval", "--images", str(gen)]) == 2
    assert "no metric model" in capsys.readouterr().err
    bare = _folder(tmp_path / "bare", 2, 0, prompts=False)
    assert main(["eval", "--images", str(bare), "--clip", str(clip)]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["eval", "--images", str(gen), "--clip", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval", "--preset", "dreambench", "--subject", "unicorn", "--token", "<v1>", "--clip", str(clip)]) == 2


@needs_dreambench
def test_dreambench_preset_generates_and_scores(metric_models, tmp_path, capsys):
    clip, dino = metric_models
    tiny = build_tiny_sd(tmp_path / "tiny")
    code = main(["eval", "--preset", "dreambench", "--subject", "dog", "--token", "dog", "--model", str(tiny),
                 "--clip", str(clip), "--dino", str(dino), "--steps", "1", "--out", str(tmp_path / "db"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_images"] == 100
    assert len((tmp_path / "db" / "metadata.jsonl").read_text().splitlines()) == 100
