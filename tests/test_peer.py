"""`pristine bench peer`: the step timer both trainers run under, the torchvision stand-in the peer
script may need, and the bench's own checks. The comparison itself is a benchmark (docs/BENCHMARKS.md)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pristine.cli import main
from pristine.errors import UsageError
from pristine.eval import peer

TRAINER = """
import sys, torch
w = torch.nn.Parameter(torch.zeros(3))
opt = torch.optim.AdamW([w], lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps step, as the trainers' schedulers do
for _ in range(int(sys.argv[1])):
    (w - 1).pow(2).sum().backward()
    opt.step(); sched.step(); opt.zero_grad()
print("trained", w.detach().tolist())
"""


def test_timer_records_every_optimizer_step_of_a_script_and_its_memory(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    result = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(peer.TIMER), str(result), str(script), "7"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "trained" in done.stdout  # the script ran as __main__ with its own arguments
    record = json.loads(result.read_text())
    stamps = record["step_end_s"]
    assert len(stamps) == 7 and stamps == sorted(stamps) and stamps[-1] <= record["wall_s"]
    assert record["peak_rss_bytes"] > 50 * 2**20  # torch is loaded: tens of MB at least


def test_rate_leaves_out_the_warmup_steps():
    # 10 slow steps, then one every 0.1 s
    stamps = [float(k) for k in range(10)] + [9 + 0.1 * k for k in range(1, 21)]
    assert peer._rate({"step_end_s": stamps}, warmup=10) == pytest.approx(10.0)
    with pytest.raises(UsageError, match="more --steps"):
        peer._rate({"step_end_s": stamps[:5]}, warmup=10)


def test_torchvision_stand_in_matches_the_transforms_the_script_uses():
    assert "torchvision" not in sys.modules
    sys.path.insert(0, str(peer.SHIM))
    try:
        import torchvision.transforms as T

        assert "pristine-peer-shim" in sys.modules["torchvision"].__version__
        _check_transforms(T)
    finally:  # the rest of the suite must not see a torchvision
        sys.path.remove(str(peer.SHIM))
        for name in ("torchvision.transforms", "torchvision"):
            sys.modules.pop(name, None)


def _check_transforms(T):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    resized = T.Resize(32, interpolation=T.InterpolationMode.BILINEAR)(image)
    assert resized.size == (51, 32)  # the shorter side to 32, the ratio kept
    cropped = T.CenterCrop(32)(resized)
    assert cropped.size == (32, 32)
    assert T.RandomCrop(32)(resized).size == (32, 32)
    x = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])(cropped)
    expected = torch.from_numpy(np.asarray(cropped, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected, atol=1e-6)


def test_bench_peer_refuses_a_missing_script_in_one_line(tmp_path, capsys):
    code = main(["bench", "peer", "--script", str(tmp_path / "nope.py"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "--script" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bench_peer_refuses_a_final_concept(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("")
    from pristine.world.concepts import CONCEPTS

    final = next(c.name for c in CONCEPTS if c.split == "final")
    code = main(["bench", "peer", "--script", str(script), "--concept", final, "--out", str(tmp_path / "o")])
    assert code == 2 and "final concept" in capsys.readouterr().err


def test_commands_give_both_trainers_the_same_settings(tmp_path):
    s = peer.PeerSettings(steps=123, batch_size=3, rank=8, lr=2e-4, seed=5, resolution=32)
    c = peer.commands(s, tmp_path / "script.py", tmp_path / "python", "MODEL", tmp_path / "img", "<v1>", "star", tmp_path, 0)
    ours, theirs = c["pristine"][0], c["peer"][0]

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    for mine, other in (("--steps", "--max_train_steps"), ("--batch-size", "--train_batch_size"), ("--rank", "--rank"),
                        ("--lr", "--learning_rate"), ("--seed", "--seed"), ("--resolution", "--resolution"),
                        ("--images", "--instance_data_dir"), ("--model", "--pretrained_model_name_or_path")):
        assert flag(ours, mine) == flag(theirs, other), mine
    # pristine's prompt names its token where the script's names its rare word
    assert flag(ours, "--instance-prompt").replace("{token}", "sks") == flag(theirs, "--instance_prompt")


def test_a_failing_peer_script_is_one_line_naming_its_log(tmp_path, capsys):
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit(3)\n")
    code = main(["bench", "peer", "--script", str(script), "--steps", "20", "--rounds", "1", "--threads", "1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "exit status 3" in lines[0] and "round0_peer.log" in lines[0]
