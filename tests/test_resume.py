"""Kills and damage: a run killed while writing a checkpoint resumes from the one before and ends
with the weights of a run never stopped; a damaged checkpoint is passed over, saying so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pristine.cli import main

HERE = Path(__file__).parent
OUTPUTS = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")


def _flags(tiny, star_images, out):
    return ["--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
            "--steps", "6", "--checkpoint-every", "2", "--lr", "1e-2", "--out", str(out)]


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_kill_during_a_checkpoint_write_then_resume(tiny, star_images, tmp_path, capsys):
    assert main(["train", *_flags(tiny, star_images, tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    # the same thread count as this process: bit-equal weights need the same float kernels
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "kill_during_checkpoint.py"), "4", *_flags(tiny, star_images, killed)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002.safetensors", "step_0000004.safetensors.tmp"]  # the kill left half a file
    assert not (killed / "DONE").exists()

    capsys.readouterr()
    assert main(["train", *_flags(tiny, star_images, killed), "--resume", "latest"]) == 0, capsys.readouterr().err
    _same_outputs(tmp_path / "straight", killed)
    assert not list(killed.rglob("*.tmp"))  # the stray half-written file is gone
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 were logged before the kill, and only once after it


def test_a_damaged_checkpoint_is_passed_over_saying_so(tiny, star_images, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_flags(tiny, star_images, run)]) == 0
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in OUTPUTS:
        (kept / name).write_bytes((run / name).read_bytes())
    (run / "DONE").unlink()
    last = run / "checkpoints" / "step_0000006.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a bad copy, a full disk
    capsys.readouterr()
    assert main(["train", *_flags(tiny, star_images, run), "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_0000006.safetensors" in warnings[0] and "before it" in warnings[0], err
    assert (run / "checkpoints" / "step_0000006.safetensors.damaged").is_file()  # kept aside, not deleted
    _same_outputs(kept, run)  # steps 5 and 6 trained again from step 4's checkpoint: the same weights


def test_overwrite_replaces_a_run_and_resume_keeps_its_settings(tiny, star_images, tmp_path, capsys):
    import yaml

    run = tmp_path / "run"
    flags = _flags(tiny, star_images, run)[:-2] + ["--out", str(run), "--steps", "2"]
    assert main(["train", *flags]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 1e-2 and saved["steps"] == 2
    assert main(["train", *flags, "--seed", "5", "--overwrite"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.safetensors"]
    # the method's default learning rate is written out, not 0
    other = tmp_path / "default_lr"
    assert main(["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--steps", "1", "--method", "textual_inversion", "--out", str(other)]) == 0
    assert yaml.safe_load((other / "config.yaml").read_text())["lr"] == 5e-3


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tiny, star_images, tmp_path, capsys, monkeypatch):
    import errno

    import pristine.backbones.base as backbone_base

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".lora.tmp"))

    monkeypatch.setattr(backbone_base, "durable_replace", no_space)  # where the LoRA file is renamed into place
    run = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--steps", "1", "--out", str(run)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "disk is full" in lines[0] and "Traceback" not in err, err
    assert (run / "checkpoints" / "step_0000001.safetensors").is_file()  # what was written before is intact
    assert not (run / ".lora.tmp").exists() and not list(run.rglob("*.tmp"))
