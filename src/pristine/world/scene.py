"""Scenes: what is in a picture, independent of how it is drawn or described."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import vocab


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    position: str
    pattern: str = "solid"
    marking: str = "none"  # concepts only
    accent: str | None = None  # the marking's second color
    concept: str | None = None  # concept name when this object is a concept
    # Small per-render variations that captions never mention.
    jitter: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    brightness: float = 1.0

    def attributes(self) -> dict:
        d = asdict(self)
        d["jitter"] = list(self.jitter)
        return d


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str
    style: str = "plain"
    texture_seed: int = 0

    def attributes(self) -> dict:
        return {
            "objects": [o.attributes() for o in self.objects],
            "background": self.background,
            "style": self.style,
            "texture_seed": self.texture_seed,
        }

    @staticmethod
    def from_attributes(d: dict) -> "Scene":
        objs = tuple(WorldObject(**{**o, "jitter": tuple(o.get("jitter", (0.0, 0.0)))}) for o in d["objects"])
        return Scene(objs, d["background"], d.get("style", "plain"), d.get("texture_seed", 0))


def positions_compatible(a: WorldObject | tuple[str, str], b: WorldObject | tuple[str, str]) -> bool:
    """Two objects may share a scene when their discs do not overlap at nominal placement."""
    pa, sa = (a.position, a.size) if isinstance(a, WorldObject) else a
    pb, sb = (b.position, b.size) if isinstance(b, WorldObject) else b
    if pa == pb:
        return False
    (xa, ya), (xb, yb) = vocab.POSITION_XY[pa], vocab.POSITION_XY[pb]
    dist = float(np.hypot(xa - xb, ya - yb))
    return vocab.SIZE_RADIUS[sa] + vocab.SIZE_RADIUS[sb] + 0.02 <= dist


@dataclass
class SceneSampler:
    """Draws random scenes from a chosen part of the world.

    The defaults are the pre-training distribution: base patterns and styles, no markings.
    """

    patterns: tuple[str, ...] = vocab.BASE_PATTERNS
    pattern_probs: tuple[float, ...] | None = (0.55, 0.15, 0.15, 0.15)
    styles: tuple[str, ...] = vocab.BASE_STYLES
    style_probs: tuple[float, ...] | None = (0.75, 0.25)
    backgrounds: tuple[str, ...] = vocab.BACKGROUNDS
    two_object_prob: float = 0.45
    markings: tuple[str, ...] = ("none",)
    variations: bool = True

    def sample_object(self, rng: np.random.Generator, taken: list[WorldObject]) -> WorldObject | None:
        for _ in range(50):
            size = vocab.SIZES[rng.integers(2)]
            position = vocab.POSITIONS[rng.integers(len(vocab.POSITIONS))]
            if all(positions_compatible((position, size), t) for t in taken):
                break
        else:
            return None
        marking = self.markings[rng.integers(len(self.markings))]
        colors = vocab.COLOR_NAMES
        color = colors[rng.integers(len(colors))]
        accent = None
        if marking != "none":
            accent = colors[(colors.index(color) + 1 + rng.integers(len(colors) - 1)) % len(colors)]
        pattern = "solid" if marking != "none" else str(rng.choice(self.patterns, p=self.pattern_probs))
        return WorldObject(
            shape=vocab.SHAPES[rng.integers(len(vocab.SHAPES))],
            color=color,
            size=size,
            position=position,
            pattern=pattern,
            marking=marking,
            accent=accent,
            **self._variations(rng),
        )

    def _variations(self, rng: np.random.Generator) -> dict:
        if not self.variations:
            return {}
        return {
            "jitter": (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02))),
            "angle": float(rng.uniform(-12, 12)),
            "brightness": float(rng.uniform(0.92, 1.06)),
        }

    def sample(self, rng: np.random.Generator, n_objects: int | None = None) -> Scene:
        if n_objects is None:
            n_objects = 2 if rng.random() < self.two_object_prob else 1
        objects: list[WorldObject] = []
        while len(objects) < n_objects:
            obj = self.sample_object(rng, objects)
            if obj is None:  # no free place for this size: start over
                objects = []
                continue
            objects.append(obj)
        return Scene(
            objects=tuple(objects),
            background=self.backgrounds[rng.integers(len(self.backgrounds))],
            style=str(rng.choice(self.styles, p=self.style_probs)),
            texture_seed=int(rng.integers(2**31)),
        )

    def with_variations(self, obj: WorldObject, rng: np.random.Generator) -> WorldObject:
        from dataclasses import replace

        return replace(obj, **self._variations(rng))


# Every part of the world, for the oracle: held-out patterns, markings and styles included.
FULL_WORLD = SceneSampler(
    patterns=vocab.PATTERNS,
    pattern_probs=None,
    styles=vocab.STYLES,
    style_probs=None,
    markings=vocab.MARKINGS,
)
PRETRAINING_WORLD = SceneSampler()
