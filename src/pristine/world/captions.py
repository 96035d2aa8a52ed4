"""Describing scenes in words: several templates and phrasings, and captions that leave things out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import Scene, WorldObject

POSITION_PHRASES = {
    "left": ("on the left", "to the left", "at the left"),
    "right": ("on the right", "to the right", "at the right"),
    "top": ("at the top", "near the top", "on top"),
    "bottom": ("at the bottom", "near the bottom", "below"),
    "center": ("in the center", "in the middle", "at the center"),
}
BACKGROUND_PHRASES = {
    "white": ("on a white background", "on white"),
    "night": ("at night", "in the night sky"),
    "grass": ("on grass", "on the grass"),
    "sky": ("in the sky", "against a blue sky"),
    "sand": ("on sand", "on the beach"),
    "water": ("on water", "in the water"),
    "wood": ("on wood", "on a wooden table"),
    "brick": ("on a brick wall", "in front of bricks"),
}
PATTERN_WORDS = {
    "solid": ("solid",),
    "striped": ("striped",),
    "dotted": ("dotted", "polka dot"),
    "checkered": ("checkered", "checked"),
    "zigzag": ("zigzag",),
    "gradient": ("gradient",),
}
STYLE_PREFIX = {"plain": ("", "a photo of "), "cartoon": ("a cartoon of ", "cartoon drawing of "), "retro": ("a retro photo of ",)}
STYLE_SUFFIX = {"plain": ("",), "cartoon": (", cartoon style",), "retro": (", retro style",)}


@dataclass(frozen=True)
class CaptionPolicy:
    """How often a caption leaves an attribute out (pre-training captions are incomplete, as real ones are)."""

    drop_size: float = 0.2
    drop_color: float = 0.1
    drop_pattern: float = 0.25
    drop_position: float = 0.15
    drop_background: float = 0.15
    drop_style: float = 0.1
    say_solid: float = 0.1


COMPLETE = CaptionPolicy(0, 0, 0, 0, 0, 0, 0)


def _pick(rng: np.random.Generator | None, options: tuple[str, ...]) -> str:
    return options[0] if rng is None else options[rng.integers(len(options))]


def _drop(rng: np.random.Generator | None, p: float) -> bool:
    return rng is not None and p > 0 and rng.random() < p


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(
    obj: WorldObject,
    rng: np.random.Generator | None = None,
    policy: CaptionPolicy = COMPLETE,
    token: str | None = None,
) -> str:
    """'a big red striped star'; a concept is named by its token and class word: '<v1> star'."""
    if token is not None:
        words = [] if _drop(rng, policy.drop_size) else [obj.size]
        return article(" ".join(words + [token, obj.shape]))
    words = []
    if not _drop(rng, policy.drop_size):
        words.append(obj.size)
    if not _drop(rng, policy.drop_color):
        words.append(obj.color)
    if obj.pattern != "solid" and not _drop(rng, policy.drop_pattern):
        words.append(_pick(rng, PATTERN_WORDS[obj.pattern]))
    elif obj.pattern == "solid" and _drop(rng, policy.say_solid):
        words.append("solid")
    words.append(obj.shape)
    return article(" ".join(words))


def caption(
    scene: Scene,
    rng: np.random.Generator | None = None,
    policy: CaptionPolicy | None = None,
    tokens: dict[str, str] | None = None,
) -> str:
    """A caption of the scene. With no rng: the one canonical, complete phrasing.

    tokens maps concept names to their tokens, for objects that are concepts.
    """
    policy = policy or (COMPLETE if rng is None else CaptionPolicy())
    tokens = tokens or {}
    parts = []
    for obj in scene.objects:
        phrase = object_phrase(obj, rng, policy, tokens.get(obj.concept) if obj.concept else None)
        if not _drop(rng, policy.drop_position):
            phrase += " " + _pick(rng, POSITION_PHRASES[obj.position])
        parts.append(phrase)
    objects = " and ".join(parts)
    background = "" if _drop(rng, policy.drop_background) else _pick(rng, BACKGROUND_PHRASES[scene.background])
    style = scene.style if not _drop(rng, policy.drop_style) else "plain"
    template = 0 if rng is None else rng.integers(3)
    if template == 1 and background:  # background first
        text = f"{background}, {objects}"
    elif template == 2:
        text = f"there is {objects}" + (f" {background}" if background else "")
    else:
        text = objects + (f", {background}" if background else "")
    if style != "plain" or rng is not None:
        if rng is not None and rng.random() < 0.5:
            text += _pick(rng, STYLE_SUFFIX[style])
        else:
            text = _pick(rng, STYLE_PREFIX[style]) + text
    return text


ACROSS = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def unrelated_prompts() -> list[str]:
    """A fixed set of 24 world prompts (output preservation's `unrelated`): every shape, color and
    background, both sizes and base styles, a third of them with a second object, in the canonical
    phrasing. They are built from the vocabulary by rule, and none is one of MiniBench's pollution
    prompts (a test checks it), so preserving them does not train on what the benchmark measures."""
    from . import vocab

    prompts = []
    for i in range(24):
        two = i % 3 == 2  # a small second object across the picture
        position = vocab.POSITIONS[(2 * i + 1) % 5]
        if two and position == "center":
            position = "right"
        objects = [WorldObject(vocab.SHAPES[i % 8], vocab.COLOR_NAMES[(3 * i + i // 8) % 8],
                               "small" if two else vocab.SIZES[(i // 2) % 2], position, vocab.BASE_PATTERNS[(i // 3) % 4])]
        if two:
            objects.append(WorldObject(vocab.SHAPES[(i + 3) % 8], vocab.COLOR_NAMES[(5 * i + 2) % 8], "small",
                                       ACROSS[position]))
        prompts.append(caption(Scene(tuple(objects), vocab.BACKGROUNDS[(5 * i + 3) % 8], vocab.BASE_STYLES[int(i % 6 == 5)])))
    return prompts
