"""Exact scores from the Shapes world's oracle: concept fidelity, prompt adherence, change."""

from __future__ import annotations

import numpy as np
import torch

from ..world import render
from ..world.scene import PRETRAINING_WORLD, Scene


def class_renders(concept, n: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Generic objects of the concept's class word: any color and pattern, no markings."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = PRETRAINING_WORLD.sample(rng, n_objects=1)
        obj = scene.objects[0]
        from dataclasses import replace

        out.append(render(replace(scene, objects=(replace(obj, shape=concept.shape),)))[0])
    return out


def concept_hits(oracle, images, concept, n_refs: int = 5) -> np.ndarray:
    """Per image: is it closer (oracle embedding) to the concept's references than to plain members of its class?"""
    refs = oracle.embedding([render(s)[0] for s in concept.references(n_refs)])
    generic = oracle.embedding(class_renders(concept))
    emb = oracle.embedding(images)
    to_concept = (emb @ refs.T).max(dim=1).values
    to_class = (emb @ generic.T).max(dim=1).values
    return (to_concept > to_class).numpy()


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
