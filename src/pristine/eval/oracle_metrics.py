"""Exact scores from the Shapes world's oracle: concept fidelity, prompt adherence, change."""

from __future__ import annotations

import numpy as np
import torch

from ..world.scene import Scene


def concept_hits(oracle, images, concept) -> np.ndarray:
    """Per image: does the oracle read an object with the concept's shape, body color, marking and
    accent? The world's ground truth makes this exact. (An earlier test, "closer in the oracle's
    embedding to the concept's references than to plain members of its class", credited another
    concept's renders 34% of the time: any marked object is closer to marked references than to
    plain ones.)"""
    wanted = (concept.shape, concept.color, concept.marking, concept.accent)
    return np.array([any((o["shape"], o["color"], o["marking"], o["accent"]) == wanted for o in reading["objects"])
                     for reading in oracle.read(images)])


def context_adherence(oracle, images, scenes: list[Scene]) -> dict[str, float]:
    """How often the oracle finds the background and place each prompt asked for."""
    readings = oracle.read(images)
    background = [r["background"] == s.background for r, s in zip(readings, scenes)]
    position = [any(o["position"] == s.objects[0].position for o in r["objects"]) for r, s in zip(readings, scenes)]
    return {"background": float(np.mean(background)), "position": float(np.mean(position))}


def change(oracle, before, after) -> dict[str, float]:
    """How much pictures from the same prompts and seeds moved: pixels and the oracle's reading."""
    a = np.stack(before).astype(np.float32) / 255
    b = np.stack(after).astype(np.float32) / 255
    ra, rb = oracle.read(before), oracle.read(after)

    def summary(r):
        return (r["background"], tuple(sorted((o["position"], o["shape"], o["color"]) for o in r["objects"])))

    agree = [summary(x) == summary(y) for x, y in zip(ra, rb)]
    return {"pixel_distance": float(np.abs(a - b).mean()), "oracle_agreement": float(np.mean(agree))}


def to_uint8(images) -> list[np.ndarray]:
    if torch.is_tensor(images):
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [np.asarray(im) for im in images]
