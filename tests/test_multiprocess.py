"""Two processes (torchrun, gloo on the CPU) against one: every trained tensor equal across processes,
outputs written once, and 2 processes x batch 2 the same training as 1 process x batch 4."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
SCRIPT = HERE / "multiprocess_run.py"

CASES = {  # method flags; each run trains two steps
    "lora_with_token": ["--method", "lora"],
    "textual_inversion": ["--method", "textual_inversion"],
    "purecc": ["--method", "purecc", "--method-arg", "stage1_steps=1"],  # one step of each stage
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, flags: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), str(tmp / f"dump_{name}"),
           *flags, "--out", str(tmp / name)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_like_one_with_the_whole_batch(tiny, star_images, tmp_path, case):
    common = ["--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
              "--steps", "2", "--lr", "1e-2", *CASES[case]]
    two = _launch(tmp_path, "two", [*common, "--batch-size", "2"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "dump_two" / f"rank{r}.safetensors")) for r in (0, 1)]
    from pristine.cli import build_parser, train_config_from_args
    from pristine.train import run_training

    args = build_parser().parse_args(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    _, method = run_training(train_config_from_args(args))  # one process, here
    single = method.trainable_state()
    backbone = method.backbone

    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    token_key = next(k for k in single if k.startswith("token."))  # the token's row is among what is compared
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs across processes"
        # summing a batch in two halves changes the last bits of a gradient; Adam's first steps turn an
        # element whose gradient sits at that noise floor into a full step of either sign, so a few
        # elements may differ by up to the learning rate; a wrong split of the batch moves most of them
        diff = (ranks[0][key] - single[key].float()).abs()
        assert diff.max() <= 2 * 1e-2 * 2, f"{key}: 2 x batch 2 differs from 1 x batch 4 by {diff.max():.2e}"
        assert (diff > 1e-5).float().mean() <= 0.01, \
            f"{key}: {(diff > 1e-5).float().mean():.1%} of its elements differ between 2 x batch 2 and 1 x batch 4"
    # what is equal was trained: the token's row moved from the class word's, and the saved one is it
    star = backbone.tokenizer("star", add_special_tokens=False).input_ids
    from pristine.backbones import load_backbone

    start = load_backbone(str(tiny)).text_encoder.get_input_embeddings().weight[star].mean(0)
    embeds = load_file(str(tmp_path / "two" / "learned_embeds.safetensors"))
    assert not torch.allclose(ranks[0][token_key], start, atol=1e-4)
    assert torch.equal(embeds["<v1>"].reshape(-1), ranks[0][token_key])

    # written once: one log line per step, one checkpoint, the outputs of the main process
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step_0000002.safetensors"]
    assert not list((tmp_path / "two").rglob("*.tmp"))
