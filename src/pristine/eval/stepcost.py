"""What one training step of a method costs: seconds per step and peak memory above the loaded model.

Each method is measured in a fresh process (so one method's memory cannot hide in another's) with
the training loop's own pieces: the backbone, the method's parameters and loss, the optimizer, the
cached training set. Memory is the peak resident size over all steps (warm-up included) minus the
size just before the first step (model, data and caches loaded), sampled every 2 ms; on a GPU it
is torch.cuda's peak allocation above the same point.
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


def measure(method: str, method_args: dict, images: str, token: str, class_word: str, model: str = "mini",
            steps: int = 30, warmup: int = 5, batch_size: int = 4, seed: int = 0) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; this process only."""
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
    return {"method": method, "method_args": method_args, "steps": steps, "batch_size": batch_size,
            "s_per_step": statistics.median(times), "s_per_step_mean": statistics.fmean(times),
            "peak_bytes_above_loaded": int(peak_above), "peak_bytes_process": int(mem.peak),
            "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}


def run(methods: dict[str, dict], images: str, token: str, class_word: str, out: Path, model: str = "mini",
        steps: int = 30, batch_size: int = 4) -> dict:
    """Every method in its own process; PureCC's stage 2 gets a short stage-1 run first."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, spec in tqdm(methods.items(), desc="step cost"):
        method, args = spec["method"], dict(spec.get("method_args", {}))
        if method == "purecc" and args.get("stage", "2") == "2":
            stage1 = out / "purecc_stage1"
            if not (stage1 / "DONE").exists():
                from ..data import ConceptSpec
                from ..train import TrainConfig, train

                train(TrainConfig(out=str(stage1), model=model, method="purecc", steps=5, batch_size=batch_size,
                                  method_args={"stage": "1"}, concepts=[ConceptSpec(images, token, class_word)]))
            args.update(stage="2", stage1_run=str(stage1))
        job = json.dumps({"method": method, "method_args": args, "images": images, "token": token,
                          "class_word": class_word, "model": model, "steps": steps, "batch_size": batch_size})
        done = subprocess.run([sys.executable, "-m", "pristine.eval.stepcost", job], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"step-cost run for {name} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    ref = next(iter(results.values()))
    for r in results.values():
        r["time_vs_first"] = r["s_per_step"] / ref["s_per_step"]
        r["memory_vs_first"] = r["peak_bytes_above_loaded"] / max(1, ref["peak_bytes_above_loaded"])
    tmp = out / "stepcost.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "stepcost.json")
    return results


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
