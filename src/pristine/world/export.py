"""Writing renders to disk for inspection: PNGs, masks and one metadata.jsonl with the ground truth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import caption
from .concepts import CONCEPTS, attribute_dataset, domain_dataset
from .render import render
from .scene import FULL_WORLD, PRETRAINING_WORLD, Scene


def _items(part: str, n: int, seed: int) -> list[tuple[str, Scene, str]]:
    """(relative file stem, scene, caption) for the chosen part of the world."""
    if part in ("pretraining", "full"):
        sampler = PRETRAINING_WORLD if part == "pretraining" else FULL_WORLD
        rng = np.random.default_rng(seed)
        return [(f"{i:06d}", s, caption(s, rng)) for i in range(n) for s in [sampler.sample(rng)]]
    if part == "concepts":  # n references per concept, one folder each
        return [
            (f"{c.name}/{k:02d}", scene, c.prompt("<" + c.name + ">", scene))
            for c in CONCEPTS
            for k, scene in enumerate(c.references(n))
        ]
    kind, _, word = part.partition(":")
    if kind == "attribute":
        return [(f"{i:06d}", s, text) for i, (s, text) in enumerate(attribute_dataset(word, n, seed))]
    if kind == "domain":  # uncaptioned by design
        return [(f"{i:06d}", s, "") for i, s in enumerate(domain_dataset(word, n, seed))]
    raise ValueError(f"unknown part of the world: {part!r}")


def write_renders(out: Path, n: int, seed: int = 0, size: int = 32, part: str = "pretraining") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for stem, scene, text in _items(part, n, seed):
        image, masks = render(scene, size)
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / f"{stem}.png")
        mask_files = []
        for k, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_mask{k}.png")
            mask_files.append(f"{stem}_mask{k}.png")
        records.append({"file_name": f"{stem}.png", "text": text, "masks": mask_files, "scene": scene.attributes()})
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out / "metadata.jsonl")
    return out


def write_concept_folder(concept, token: str, folder: Path, n: int = 5, masks: bool = False) -> Path:
    """A concept's references as a user brings them: PNGs with a caption (.txt) naming the token, and with
    `masks` the concept's mask beside each (`00_mask0.png`, white = the concept: CLIF's Region pairs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, scene in enumerate(concept.references(n)):
        image, object_masks = render(scene)
        Image.fromarray(image).save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text(concept.prompt(token, scene))
        if masks:
            Image.fromarray(object_masks[0].astype(np.uint8) * 255).save(folder / f"{k:02d}_mask0.png")
    return folder
