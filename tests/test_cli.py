import json
import subprocess
import sys

import pytest

from pristine.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, *words):
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_world_render_writes_images_masks_and_metadata(tmp_path, capsys):
    code, out, _ = run(capsys, "world", "render", "--n", "5", "--out", str(tmp_path / "r"), "--seed", "3")
    assert code == 0
    lines = [json.loads(l) for l in (tmp_path / "r" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for rec in lines:
        assert (tmp_path / "r" / rec["file_name"]).is_file()
        assert rec["text"] and len(rec["masks"]) == len(rec["scene"]["objects"])
        assert all((tmp_path / "r" / m).is_file() for m in rec["masks"])
    again = tmp_path / "again"
    run(capsys, "world", "render", "--n", "5", "--out", str(again), "--seed", "3")
    assert (again / "000004.png").read_bytes() == (tmp_path / "r" / "000004.png").read_bytes()


@pytest.mark.parametrize("part", ["concepts", "attribute:zigzag", "domain:retro", "full"])
def test_world_render_parts(tmp_path, capsys, part):
    code, _, _ = run(capsys, "world", "render", "--n", "4", "--out", str(tmp_path), "--part", part, "--size", "64")
    assert code == 0
    records = [json.loads(l) for l in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert records
    from PIL import Image

    assert Image.open(tmp_path / records[0]["file_name"]).size == (64, 64)


def test_world_render_bad_arguments(tmp_path, capsys):
    assert_usage_error(*run(capsys, "world", "render", "--n", "0", "--out", str(tmp_path))[::2], "--n")
    assert_usage_error(*run(capsys, "world", "render", "--n", "x", "--out", str(tmp_path))[::2], "--n")
    assert_usage_error(*run(capsys, "world", "render", "--out", str(tmp_path), "--part", "moon")[::2], "--part")
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert_usage_error(*run(capsys, "world", "render", "--out", str(f))[::2], "--out")
    assert f.read_text() == "keep me"
    assert_usage_error(*run(capsys, "world", "render")[::2], "--out")
    assert_usage_error(*run(capsys, "paint")[::2], "paint")


def test_mini_score_selftest_json(capsys):
    code, out, _ = run(capsys, "mini", "score", "--selftest", "--n", "100", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"oracle.base.shape", "oracle.base.color", "oracle.full.background", "oracle.full.position"}
    assert all(0.0 <= v <= 1.0 for v in result.values())


def test_mini_score_generates_and_judges(capsys):
    code, out, _ = run(capsys, "mini", "score", "--n", "3", "--steps", "4", "--seed", "5", "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("single.shape", "single.color", "single.background", "single.position", "two.all_right"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_prompts"] == 6


def test_mini_score_bad_arguments(tmp_path, capsys):
    assert_usage_error(*run(capsys, "mini", "score", "--model", str(tmp_path))[::2], "model_index.json")
    assert_usage_error(*run(capsys, "mini", "score", "--n", "-3")[::2], "--n")


def test_mini_pretrain_stage_runs_resumes_and_checks_order(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "model"
    args = ("mini", "pretrain", "--stage", "vae", "--steps", "2", "--corpus-size", "64",
            "--workdir", str(work), "--out", str(out))
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert len((work / "vae" / "log.jsonl").read_text().splitlines()) == 2
    code, _, _ = run(capsys, *args)  # already done: resumes at the end, trains nothing more
    assert code == 0 and len((work / "vae" / "log.jsonl").read_text().splitlines()) == 2
    assert_usage_error(*run(capsys, "mini", "pretrain", "--stage", "unet", "--workdir", str(work), "--out", str(out))[::2],
                       "text_encoder")
    assert_usage_error(*run(capsys, "mini", "pretrain", "--stage", "paint")[::2], "--stage")
    # the remaining stages, two steps each, make a model folder diffusers loads
    for stage in ("clip", "unet", "unet-joint", "clip-negatives", "oracle"):
        code, _, err = run(capsys, "mini", "pretrain", "--stage", stage, "--steps", "2", "--corpus-size", "64",
                           "--workdir", str(work), "--out", str(out))
        assert code == 0, err
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32)
    assert pipe("a red star", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert (out / "oracle" / "selftest.json").is_file()


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pristine.cli", "world", "render", "--n", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
