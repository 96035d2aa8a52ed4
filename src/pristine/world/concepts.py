"""What pre-training never sees: concepts, new attribute words and a new domain.

These are the customization tasks of METHODS.md, rendered from the same world so the oracle can
judge them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import vocab
from .captions import caption
from .scene import PRETRAINING_WORLD, Scene, SceneSampler, WorldObject


@dataclass(frozen=True)
class Concept:
    """A unique object: a class word plus two-color markings no base caption can describe."""

    name: str
    shape: str  # the class word
    color: str
    accent: str
    marking: str
    split: str  # "dev" or "final"

    @property
    def class_word(self) -> str:
        return self.shape

    def object(self, position: str = "center", size: str = "big") -> WorldObject:
        return WorldObject(
            shape=self.shape, color=self.color, size=size, position=position,
            marking=self.marking, accent=self.accent, concept=self.name,
        )

    def scene(self, rng: np.random.Generator, position: str | None = None, background: str | None = None,
              size: str = "big", style: str = "plain") -> Scene:
        position = position or vocab.POSITIONS[rng.integers(len(vocab.POSITIONS))]
        background = background or vocab.BACKGROUNDS[rng.integers(len(vocab.BACKGROUNDS))]
        obj = PRETRAINING_WORLD.with_variations(self.object(position, size), rng)
        return Scene((obj,), background, style, int(rng.integers(2**31)))

    def references(self, n: int = 5) -> list[Scene]:
        """The concept's training images: varied places and backgrounds, fixed per concept."""
        rng = np.random.default_rng(_seed(self.name, "references"))
        backgrounds = rng.permutation(vocab.BACKGROUNDS)
        positions = rng.permutation(vocab.POSITIONS)
        return [self.scene(rng, positions[i % 5], backgrounds[i % len(backgrounds)]) for i in range(n)]

    def prompt(self, token: str, scene: Scene) -> str:
        return caption(scene, tokens={self.name: token})


def _seed(*parts: str) -> int:
    return int.from_bytes(("/".join(parts)).encode(), "little") % (2**63)


def _c(name, shape, color, accent, marking, split="dev") -> Concept:
    return Concept(name, shape, color, accent, marking, split)


CONCEPTS: tuple[Concept, ...] = (
    _c("ember_star", "star", "red", "yellow", "dot"),
    _c("tide_circle", "circle", "blue", "cyan", "band"),
    _c("harlequin_diamond", "diamond", "purple", "yellow", "quarters"),
    _c("sunset_heart", "heart", "orange", "pink", "split"),
    _c("mint_square", "square", "green", "pink", "rim"),
    _c("royal_hexagon", "hexagon", "blue", "orange", "dot"),
    _c("lime_cross", "cross", "yellow", "green", "quarters"),
    _c("berry_triangle", "triangle", "pink", "purple", "band"),
    _c("glacier_star", "star", "cyan", "blue", "split"),
    _c("clay_circle", "circle", "orange", "red", "rim"),
    _c("plum_square", "square", "purple", "cyan", "split"),
    _c("meadow_heart", "heart", "green", "yellow", "dot"),
    # kept apart for final checks
    _c("cobalt_diamond", "diamond", "blue", "yellow", "rim", "final"),
    _c("coral_hexagon", "hexagon", "pink", "orange", "quarters", "final"),
    _c("frost_cross", "cross", "cyan", "purple", "band", "final"),
    _c("amber_triangle", "triangle", "yellow", "red", "split", "final"),
)
DEV_CONCEPTS = tuple(c for c in CONCEPTS if c.split == "dev")
FINAL_CONCEPTS = tuple(c for c in CONCEPTS if c.split == "final")


def get_concept(name: str) -> Concept:
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(f"unknown concept {name!r}; known: {', '.join(c.name for c in CONCEPTS)}")


# ---- new attribute words (the SPF task) ------------------------------------------------------

ATTRIBUTE_WORDS = vocab.HELDOUT_PATTERNS


def attribute_dataset(word: str, n: int = 300, seed: int = 0) -> list[tuple[Scene, str]]:
    """Captioned scenes in which one object carries the new pattern word, and its caption says so."""
    if word not in ATTRIBUTE_WORDS:
        raise KeyError(f"unknown attribute word {word!r}; known: {', '.join(ATTRIBUTE_WORDS)}")
    rng = np.random.default_rng(_seed("attribute", word, str(seed)))
    out = []
    for _ in range(n):
        scene = PRETRAINING_WORLD.sample(rng)
        objs = list(scene.objects)
        k = int(rng.integers(len(objs)))
        objs[k] = replace(objs[k], pattern=word)
        scene = replace(scene, objects=tuple(objs))
        text = caption(scene, rng)
        if word not in text:  # the caption dropped the word: state it
            text = caption(scene)
        out.append((scene, text))
    return out


# ---- a new domain (the concept-centric model task) -----------------------------------------

DOMAINS = vocab.HELDOUT_STYLES


def domain_dataset(style: str = "retro", n: int = 2000, seed: int = 0) -> list[Scene]:
    """Uncaptioned scenes in a rendering style pre-training never saw."""
    if style not in DOMAINS:
        raise KeyError(f"unknown domain {style!r}; known: {', '.join(DOMAINS)}")
    sampler = SceneSampler(styles=(style,), style_probs=None)
    rng = np.random.default_rng(_seed("domain", style, str(seed)))
    return [sampler.sample(rng) for _ in range(n)]
