"""Benchmark reports: one HTML page with the table, per-concept grids and plots."""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np


def _plots(out: Path, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    methods = list(summary)
    files = []
    # one colour and marker per row, told apart beyond matplotlib's 10 default colours
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
    style = {m: (colours[i % len(colours)], "osD^v<>"[i % 7]) for i, m in enumerate(methods)}
    legend_inches = 0.22 * ((len(methods) + 2) // 3)  # three rows' names per line, below the plots
    fig, axes = plt.subplots(1, 2, figsize=(10, 4 + legend_inches))
    for ax, (key, label) in zip(axes, (("pollution_distance", "pollution (a): pixel distance on unrelated prompts"),
                                       ("drift", "pollution (c): context drift"))):
        for m in methods:
            f, p = summary[m].get("fidelity"), summary[m].get(key)
            if f and p:
                ax.errorbar(p["mean"], f["mean"], xerr=[[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]],
                            yerr=[[f["mean"] - f["lo"]], [f["hi"] - f["mean"]]], fmt=style[m][1], color=style[m][0],
                            capsize=3, label=m)
        ax.set_xlabel(label)
        ax.set_ylabel("fidelity (oracle)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the plots, where it hides no point
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(out / "fidelity_vs_pollution.png", dpi=100)
    plt.close(fig)
    files.append("fidelity_vs_pollution.png")

    concepts = results["settings"]["concepts"]
    fig, ax = plt.subplots(figsize=(max(6, len(concepts) * 0.9), 3.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        values = [np.mean([r["fidelity"] for r in results["records"]
                           if r["method"] == m and r["concept"] == c and r["kind"] == "concept"]) for c in concepts]
        ax.bar(np.arange(len(concepts)) + i * width, values, width, label=m, color=style[m][0])
    ax.set_xticks(np.arange(len(concepts)) + width * (len(methods) - 1) / 2, concepts, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fidelity (oracle)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, hiding none
    fig.tight_layout()
    fig.savefig(out / "per_concept_fidelity.png", dpi=100)
    plt.close(fig)
    files.append("per_concept_fidelity.png")
    return files


def markdown_table(results: dict) -> str:
    """The summary as a Markdown table: one row per metric, one column per method, mean [95% interval]."""
    summary = results["summary"]
    methods = list(summary)
    keys = list(dict.fromkeys(k for m in methods for k in summary[m]))
    lines = ["| metric | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for key in keys:
        label = next(summary[m][key]["label"] for m in methods if key in summary[m])
        cells = [f"{summary[m][key]['mean']:.3f} [{summary[m][key]['lo']:.3f}, {summary[m][key]['hi']:.3f}]"
                 if key in summary[m] else "" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    timings = results.get("timings") or {}
    if timings:
        cells = []
        for m in methods:
            t = timings.get(m, {}).values()
            cells.append(f"{sum(x.get('train_s', 0) for x in t) / 60:.1f} + {sum(x.get('sample_s', 0) for x in t) / 60:.1f}")
        lines.append("| minutes: training + sampling, all concepts | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: dict, grids: dict, concept_prompts_by: dict, seeds: int) -> Path:
    from .grids import make_grid

    summary = results["summary"]
    methods = list(summary)
    keys = list(next(iter(summary.values())).keys()) if summary else []
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    rows = ""
    for key in keys:
        cells = "".join(
            f"<td>{summary[m][key]['mean']:.3f} <small>[{summary[m][key]['lo']:.3f}, {summary[m][key]['hi']:.3f}]</small></td>"
            if key in summary[m] else "<td></td>" for m in methods)
        rows += f"<tr><td>{html.escape(summary[methods[0]][key]['label'])}</td>{cells}</tr>"
    plots = "".join(f"<img src='{f}'>" for f in _plots(out, results))
    sections = []
    (out / "grids").mkdir(exist_ok=True)
    for concept, by_source in grids.items():
        prompts = concept_prompts_by[concept]
        rows_img, labels = [], []
        for i, prompt in enumerate(prompts):
            for source, images in by_source.items():
                rows_img.append(images[i * seeds:(i + 1) * seeds])
                labels.append(f"{source}: {prompt}" if source != "original" else f"original: {prompt.replace('<v1> ', '')}")
        name = f"grids/{concept}.png"
        make_grid(rows_img, labels, label_width=330).save(out / name)
        sections.append(f"<h3>{html.escape(concept)}</h3><img src='{name}'>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>MiniBench</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd}}
img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>MiniBench</h1><p>Concepts: {html.escape(', '.join(results['settings']['concepts']))}; seeds per prompt: {seeds};
DDIM {results['settings']['sample_steps']} steps, guidance {results['settings']['guidance']}.
Means with 95% bootstrap intervals over concepts and seeds.</p>
<table>{head}{rows}</table>{plots}
<h2>Per concept: rows per prompt, original model (class prompt) then each method, {seeds} seeds</h2>{''.join(sections)}
</body></html>"""
    (out / "table.md.tmp").write_text(markdown_table(results))
    os.replace(out / "table.md.tmp", out / "table.md")
    tmp = out / "index.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, out / "index.html")
    return out / "index.html"
