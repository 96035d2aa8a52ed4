"""pristine's LoRA training beside another trainer's script at the same settings: steps/s and peak memory.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora.py` (or a script that takes its flags),
given by path with a Python that can run it; it is never part of pristine. Both train on the same
instance images of a development concept, at the same resolution, batch size, rank, learning rate,
step count and seed, with the same number of threads, each in a fresh process, in alternating rounds
(pristine, peer, pristine, peer, ...) so that a drift in the machine's speed hits both alike.

Both are timed by `peer_timer.py` in the same way: a hook on every optimizer step, so the figure is the
training loop's steps/s after `warmup` steps (loading, caching and saving are outside it; pristine's
checkpoints inside it are counted), and the process's peak resident size.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..files import atomic_write_text

HERE = Path(__file__).parent
TIMER = HERE / "peer_timer.py"
SHIM = HERE / "peer_shim"


@dataclass
class PeerSettings:
    """What both trainers are told; `pristine_args` are extra `pristine train` flags (e.g. a setting to compare)."""

    resolution: int = 32
    batch_size: int = 4
    rank: int = 4
    lr: float = 1e-4
    steps: int = 300
    seed: int = 0
    threads: int = 2
    warmup: int = 10
    concept: str = "ember_star"
    class_word: str = ""  # the concept's own when empty
    pristine_args: list = field(default_factory=list)


def check_peer(script: str, python: str) -> tuple[Path, Path]:
    script_path, python_path = Path(script), Path(python)
    if not script_path.is_file():
        raise UsageError(f"--script {script}: no such file; give the path of diffusers' "
                         "examples/dreambooth/train_dreambooth_lora.py")
    if not (python_path.is_file() and os.access(python_path, os.X_OK)):
        raise UsageError(f"--python {python}: not an executable; give the Python of a venv that can run the script")
    return script_path, python_path


def needs_shim(python: Path) -> bool:
    """Whether the peer's Python lacks a working torchvision (PyPI's builds do not import beside the
    CPU torch this project pins); the scripts use only its transforms, which the stand-in provides."""
    done = subprocess.run([str(python), "-c", "import torchvision.transforms"], capture_output=True)
    return done.returncode != 0


def _environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _rate(record: dict, warmup: int) -> float:
    stamps = record["step_end_s"]
    if len(stamps) < warmup + 2:
        raise UsageError(f"--steps: only {len(stamps)} optimizer steps were recorded; give more --steps than --warmup + 1")
    return (len(stamps) - 1 - warmup) / (stamps[-1] - stamps[warmup])


def _run(who: str, command: list[str], env: dict, log: Path) -> None:
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        fix = "check --script and --python" if who == "peer" else "check --pristine-arg"
        raise UsageError(f"the {who} run stopped with exit status {done.returncode}; its output is in {log}; {fix}")


def commands(settings: PeerSettings, script: Path, python: Path, model: str, images: Path, token: str,
             class_word: str, out: Path, k: int) -> dict[str, tuple[list[str], Path]]:
    """Round k's two command lines and the timer's result file of each."""
    s = settings
    ours_json, peer_json = out / f"round{k}_pristine.json", out / f"round{k}_peer.json"
    ours = [sys.executable, str(TIMER), str(ours_json), "-m", "pristine.cli", "train", "--model", model,
            "--method", "lora", "--images", str(images), "--token", token, "--class-word", class_word,
            "--instance-prompt", f"a photo of {{token}} {class_word}", "--resolution", str(s.resolution),
            "--batch-size", str(s.batch_size), "--rank", str(s.rank), "--lr", str(s.lr), "--steps", str(s.steps),
            "--seed", str(s.seed), "--report-to", "none", "--out", str(out / "runs" / f"pristine_{k}"), "--overwrite",
            *s.pristine_args]
    peer = [str(python), str(TIMER), str(peer_json), str(script), "--pretrained_model_name_or_path", model,
            "--instance_data_dir", str(images), "--instance_prompt", f"a photo of sks {class_word}",
            "--resolution", str(s.resolution), "--train_batch_size", str(s.batch_size), "--rank", str(s.rank),
            "--learning_rate", str(s.lr), "--max_train_steps", str(s.steps), "--seed", str(s.seed),
            "--output_dir", str(out / "runs" / f"peer_{k}"), "--checkpointing_steps", str(10 * s.steps)]
    return {"pristine": (ours, ours_json), "peer": (peer, peer_json)}


def run(script: str, python: str, out: Path, rounds: int = 5, settings: PeerSettings | None = None,
        model: str = "") -> dict:
    """`rounds` alternating pairs; per round the ratio of steps/s and of peak memory (pristine over peer)."""
    from tqdm import tqdm

    from ..world.concepts import get_concept
    from ..world.export import write_concept_folder

    settings = settings or PeerSettings()
    script_path, python_path = check_peer(script, python)
    if not model:
        from .. import mini

        model = str(mini.path())
    try:
        concept = get_concept(settings.concept)
    except KeyError as e:
        raise UsageError(f"--concept: {e.args[0]}")
    if concept.split != "dev":
        raise UsageError(f"--concept {concept.name}: a final concept; compare on a development concept")
    class_word = settings.class_word or concept.class_word
    out.mkdir(parents=True, exist_ok=True)
    images = write_concept_folder(concept, "<v1>", out / "images")
    for text in images.glob("*.txt"):  # the script reads every file of its folder as an image; both use one prompt
        text.unlink()
    env_ours = _environment(settings.threads)
    env_peer = _environment(settings.threads)
    if needs_shim(python_path):
        env_peer["PRISTINE_PEER_SHIM"] = str(SHIM)
    results = []
    with tqdm(total=2 * rounds, desc="peer rounds") as bar:
        for k in range(rounds):
            record = {}
            for who, (command, result) in commands(settings, script_path, python_path, model, images, "<v1>",
                                                   class_word, out, k).items():
                result.unlink(missing_ok=True)
                _run(who, command, env_ours if who == "pristine" else env_peer, out / f"round{k}_{who}.log")
                timed = json.loads(result.read_text())
                record[who] = {"steps_per_s": _rate(timed, settings.warmup), "peak_rss_bytes": timed["peak_rss_bytes"],
                               "wall_s": timed["wall_s"], "threads": timed["threads"]}
                bar.update()
            record["speed_ratio"] = record["pristine"]["steps_per_s"] / record["peer"]["steps_per_s"]
            record["memory_ratio"] = record["pristine"]["peak_rss_bytes"] / record["peer"]["peak_rss_bytes"]
            results.append(record)
    speed = [r["speed_ratio"] for r in results]
    memory = [r["memory_ratio"] for r in results]
    summary = {"settings": asdict(settings), "script": str(script_path), "python": str(python_path), "model": model,
               "rounds": results, "speed_ratio": statistics.median(speed), "speed_ratio_range": [min(speed), max(speed)],
               "memory_ratio": statistics.median(memory), "memory_ratio_range": [min(memory), max(memory)],
               "pristine_steps_per_s": statistics.median(r["pristine"]["steps_per_s"] for r in results),
               "peer_steps_per_s": statistics.median(r["peer"]["steps_per_s"] for r in results)}
    atomic_write_text(out / "peer.json", json.dumps(summary, indent=1))
    return summary
