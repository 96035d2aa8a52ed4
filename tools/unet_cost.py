"""Seconds per denoiser training step (forward and backward, random inputs) for pristine-mini's
UNet layouts: v2 at 8x8, v2's layout run at 16x16, and v3's (v2 under one more level).

    .venv/bin/python tools/unet_cost.py [--batch 64] [--threads 1]
"""

import argparse
import time

import torch
from diffusers import UNet2DConditionModel

from pristine.mini import architecture as arch


def seconds_per_step(config: dict, grid: int, batch: int, repeats: int = 4) -> float:
    unet = UNet2DConditionModel(**config)
    x, text = torch.randn(batch, 4, grid, grid), torch.randn(batch, 77, arch.TEXT_WIDTH)
    t = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet(x, t, text).sample.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # the median after the first (warm-up) step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layouts = {"v2 at 8x8": (arch.unet_config(8), 8),
               "v2's layout at 16x16": ({**arch.unet_config(8), "sample_size": 16}, 16),
               "v3 (one more level) at 16x16": (arch.unet_config(16), 16)}
    for name, (config, grid) in layouts.items():
        print(f"{name}: {seconds_per_step(config, grid, args.batch):.2f} s a step (batch {args.batch})", flush=True)


if __name__ == "__main__":
    main()
