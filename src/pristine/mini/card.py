"""Figures for the model card (docs/MINI.md): loss curves per stage and a sample grid."""

from __future__ import annotations

from pathlib import Path

from .pretrain import read_log

STAGES = ("vae", "clip", "oracle", "unet", "unet_joint", "clip_image", "clip_negatives", "clip_binding", "vae_world", "vae16", "oracle_marks")


def plot_losses(workdirs: list[Path], out_png: Path) -> Path:
    """One panel per stage log found in the work folders (with several folders, say one per machine,
    each panel names its folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    logs = {}
    for workdir in workdirs:
        for stage in STAGES:
            log = read_log(workdir, stage)  # stages run on another machine have no log here
            if log:
                logs[stage if len(workdirs) == 1 else f"{stage}, {workdir.name}"] = log
    if not logs:
        raise FileNotFoundError(f"{', '.join(map(str, workdirs))}: no stage logs to plot")
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3.2), squeeze=False)
    axes = axes[0]
    for ax, (stage, log) in zip(axes, logs.items()):
        steps = np.array([r["step"] for r in log])
        loss = np.array([r["loss"] for r in log])
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps, loss, alpha=0.25, lw=0.7)
        ax.plot(steps[k - 1 :], smooth, lw=1.5)
        ax.set_title(f"{stage} ({log[-1].get('wall', 0) / 60:.0f} min)" if log[-1].get("wall") else stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def sample_grid(out_png: Path, seeds_per_prompt: int = 6, folder=None) -> Path:
    from ..demo import DEMO_PROMPTS
    from ..eval.grids import make_grid
    from . import load_pipeline
    from ..sample import generate

    prompts = [p for p in DEMO_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [i % seeds_per_prompt for i in range(len(prompts))]
    images = generate(load_pipeline(folder), prompts, seeds, batch=len(prompts), desc="card samples")
    rows = [images[i : i + seeds_per_prompt] for i in range(0, len(images), seeds_per_prompt)]
    make_grid(rows, DEMO_PROMPTS).save(out_png)
    return out_png
