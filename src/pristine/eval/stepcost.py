"""What one training step of a method costs: seconds per step and peak memory above the loaded model.

Each method is measured in a fresh process (so one method's memory cannot hide in another's) with
the training loop's own pieces: the backbone, the method's parameters and loss, the optimizer, the
cached training set. Memory is the peak resident size over all steps (warm-up included) minus the
size just before the first step (model, data and caches loaded), sampled every 2 ms; on a GPU it
is torch.cuda's peak allocation above the same point.

A shared machine's speed drifts by tens of percent over minutes, so time is measured apart from
memory: all methods in one process, one step of each in turn, and a method's time ratio is the
median over steps of its step time over the first method's step in the same turn. `repeats`
rounds of both; the figures are medians over rounds, with the rounds' range.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Samples the process's resident size in a thread; `peak` is the largest seen."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def training_step(method: str, method_args: dict, images: str, token: str, class_word: str, model: str = "mini",
                  batch_size: int = 4, seed: int = 0, gradient_checkpointing: bool = False, preserve: str = "",
                  preserve_weight: float = 1.0):
    """One method's optimizer step, built from the training loop's own pieces: the backbone, the
    method's parameters and loss, the optimizer, the cached training set. Returns step(k)."""
    from ..backbones import load_backbone
    from ..data import ConceptImages, ConceptSpec, build_training_set, cache_latents
    from ..methods import get_method
    from ..train import TrainConfig, _optimizer

    torch.manual_seed(seed)
    spec = ConceptSpec(images, token, class_word)
    backbone = load_backbone(model)
    cls = get_method(method)
    m = cls(cls.Config.from_dict(method_args), backbone, [spec])
    groups = m.setup()
    if preserve:
        m.use_preservation(TrainConfig(method=method, preserve=preserve, preserve_weight=preserve_weight,
                                       concepts=[spec]).output_preservation())
    if gradient_checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    config = TrainConfig(method=method, batch_size=batch_size, lr=1e-4)
    optimizer = _optimizer(groups, config, config.lr)
    data = build_training_set([ConceptImages.load(spec)], backbone.image_size)
    cache_latents(data, backbone)
    trainable = [p for g in groups for p in g["params"]]

    def step(k: int) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        batch = data.draw(batch_size, g)
        batch["step"] = k
        loss, _ = m.loss(batch, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(steps: int = 30, warmup: int = 5, **job) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones, and the peak memory; this process only."""
    step = training_step(**job)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    # the baseline is taken before the first step: gradients, optimizer moments and activations are
    # allocated in the first steps and reused after, so a baseline after warm-up would hide them
    with PeakMemory() as mem:
        base_rss = _rss()
        for k in range(warmup + steps):
            t = time.perf_counter()
            step(k)
            if cuda:
                torch.cuda.synchronize()
            if k >= warmup:
                times.append(time.perf_counter() - t)
    peak_above = (torch.cuda.max_memory_allocated() - base) if cuda else (mem.peak - base_rss)
    return {"method": job["method"], "method_args": job["method_args"], "preserve": job.get("preserve", ""), "steps": steps, "batch_size": job.get("batch_size", 4),
            "s_per_step": statistics.median(times), "s_per_step_mean": statistics.fmean(times),
            "peak_bytes_above_loaded": int(peak_above), "peak_bytes_process": int(mem.peak),
            "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}


def paired_times(jobs: dict[str, dict], steps: int = 30, warmup: int = 5) -> dict[str, list[float]]:
    """Every method in this one process, one step of each in turn, so that a drift in the machine's
    speed hits all of them alike; seconds of each timed step, per method."""
    fns = {name: training_step(**job) for name, job in jobs.items()}
    cuda = torch.cuda.is_available()
    times = {name: [] for name in jobs}
    for k in range(warmup + steps):
        for name, step in fns.items():
            t = time.perf_counter()
            step(k)
            if cuda:
                torch.cuda.synchronize()
            if k >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def run(methods: dict[str, dict], images: str, token: str, class_word: str, out: Path, model: str = "mini",
        steps: int = 30, batch_size: int = 4, repeats: int = 3, gradient_checkpointing: bool = False) -> dict:
    """`repeats` rounds of: each method alone in a fresh process (memory), then all of them in turn in
    one process (time). PureCC's stage 2 gets a short stage-1 run first; SPF one stage-1 step. Per method: medians over
    rounds, and the range of each round's ratio to the first method."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name, spec in methods.items():
        method, args = spec["method"], dict(spec.get("method_args", {}))
        if method == "purecc" and args.get("stage", "2") == "2":
            stage1 = out / "purecc_stage1"
            if not (stage1 / "DONE").exists():
                from ..data import ConceptSpec
                from ..train import TrainConfig, train

                train(TrainConfig(out=str(stage1), model=model, method="purecc", steps=5, batch_size=batch_size,
                                  method_args={"stage": "1"}, concepts=[ConceptSpec(images, token, class_word)]))
            args.update(stage="2", stage1_run=str(stage1))
        if method == "spf" and args.get("stage", "both") == "both":
            args["stage1_steps"] = 1  # one stage-1 step in the warm-up: every timed step is a stage-2 step
        jobs[name] = {"method": method, "method_args": args, "images": images, "token": token,
                      "class_word": class_word, "model": model, "batch_size": batch_size,
                      "gradient_checkpointing": gradient_checkpointing,
                      **{k: spec[k] for k in ("preserve", "preserve_weight") if k in spec}}

    def subprocess_json(what: str, payload: dict):
        done = subprocess.run([sys.executable, "-m", "pristine.eval.stepcost", what, json.dumps(payload)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"step-cost {what} run failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rounds = []
    with tqdm(total=repeats * (len(jobs) + 1), desc="step cost") as bar:
        for _ in range(repeats):
            solo = {}
            for name, job in jobs.items():  # memory: each method alone in a fresh process
                solo[name] = subprocess_json("solo", {**job, "steps": steps})
                bar.update()
            paired = subprocess_json("paired", {"jobs": jobs, "steps": steps})  # time: all in turn
            bar.update()
            rounds.append({"solo": solo, "paired": paired})
    first = next(iter(jobs))
    results = {}
    for name in jobs:
        solo = [r["solo"][name] for r in rounds]
        # per round: the median over steps of this method's step time over the first method's same step
        time_ratios = [statistics.median(a / b for a, b in zip(r["paired"][name], r["paired"][first])) for r in rounds]
        memory_ratios = [r["solo"][name]["peak_bytes_above_loaded"] / max(1, r["solo"][first]["peak_bytes_above_loaded"])
                         for r in rounds]
        results[name] = {**solo[0], "repeats": repeats,
                         "s_per_step": statistics.median(t for r in rounds for t in r["paired"][name]),
                         "s_per_step_alone": statistics.median(x["s_per_step"] for x in solo),
                         "peak_bytes_above_loaded": int(statistics.median(x["peak_bytes_above_loaded"] for x in solo)),
                         "peak_bytes_process": int(statistics.median(x["peak_bytes_process"] for x in solo)),
                         "time_vs_first": statistics.median(time_ratios), "time_vs_first_range": [min(time_ratios), max(time_ratios)],
                         "memory_vs_first": statistics.median(memory_ratios),
                         "memory_vs_first_range": [min(memory_ratios), max(memory_ratios)],
                         "rounds": [{"solo": r["solo"][name], "paired_s": r["paired"][name]} for r in rounds]}
    tmp = out / "stepcost.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "stepcost.json")
    return results


if __name__ == "__main__":
    what, payload = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(measure(**payload) if what == "solo" else paired_times(**payload)))
