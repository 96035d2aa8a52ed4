import re

import numpy as np
import pytest

from pristine.world import FULL_WORLD, PRETRAINING_WORLD, Scene, render, vocab
from pristine.world.captions import caption
from pristine.world.concepts import (CONCEPTS, DEV_CONCEPTS, FINAL_CONCEPTS, attribute_dataset, domain_dataset,
                                     get_concept)
from pristine.world.scene import positions_compatible


def test_same_seed_same_scenes_and_pixels():
    a = [PRETRAINING_WORLD.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [PRETRAINING_WORLD.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    for s in a:
        assert np.array_equal(render(s)[0], render(s)[0])
    other = PRETRAINING_WORLD.sample(np.random.default_rng(8))
    assert not np.array_equal(render(a[0])[0], render(other)[0])


def test_scene_round_trips_through_its_attributes():
    scene = FULL_WORLD.sample(np.random.default_rng(3), n_objects=2)
    again = Scene.from_attributes(scene.attributes())
    assert again == scene
    assert np.array_equal(render(again)[0], render(scene)[0])


def test_render_sizes_and_masks_match_ground_truth():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = FULL_WORLD.sample(rng)
        for size in (32, 48):
            image, masks = render(scene, size)
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
            assert len(masks) == len(scene.objects)
            for obj, mask in zip(scene.objects, masks):
                assert mask.sum() > 0.02 * size * size
                ys, xs = np.nonzero(mask)
                ex, ey = vocab.POSITION_XY[obj.position]
                # the mask's centre of mass sits at the object's place
                assert abs(xs.mean() / size - ex) < 0.09 and abs(ys.mean() / size - ey) < 0.09
            if len(masks) == 2:
                assert (masks[0] & masks[1]).sum() <= 2  # objects do not overlap


def test_an_object_changes_the_pixels_under_its_mask_only():
    rng = np.random.default_rng(1)
    scene = PRETRAINING_WORLD.sample(rng, n_objects=1)
    empty = Scene((), scene.background, scene.style, scene.texture_seed)
    full, (mask,) = render(scene)
    bare, _ = render(empty)
    changed = np.abs(full.astype(int) - bare.astype(int)).sum(-1) > 0
    assert changed[mask].mean() > 0.9


def test_two_objects_never_share_a_place_or_overlap():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = PRETRAINING_WORLD.sample(rng, n_objects=2)
        a, b = scene.objects
        assert a.position != b.position and positions_compatible(a, b)


def test_vocabulary_sizes():
    assert len(vocab.SHAPES) >= 8 and len(vocab.COLORS) >= 8 and len(vocab.BACKGROUNDS) >= 6
    assert len(vocab.BASE_STYLES) >= 2 and set(vocab.SIZES) == {"small", "big"}
    assert set(vocab.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(vocab.BASE_PATTERNS) == {"solid", "striped", "dotted", "checkered"}


def test_pretraining_never_sees_held_out_parts():
    rng = np.random.default_rng(4)
    for _ in range(2000):
        scene = PRETRAINING_WORLD.sample(rng)
        assert scene.style in vocab.BASE_STYLES
        for o in scene.objects:
            assert o.pattern in vocab.BASE_PATTERNS and o.marking == "none"


def test_captions_cover_every_word_and_leave_things_out():
    rng = np.random.default_rng(5)
    texts = []
    for _ in range(3000):
        scene = PRETRAINING_WORLD.sample(rng)
        texts.append((scene, caption(scene, rng)))
    joined = " ".join(t for _, t in texts)
    for word in vocab.SHAPES + vocab.COLOR_NAMES + vocab.SIZES + ("striped", "dotted", "checkered", "cartoon"):
        assert re.search(rf"\b{word}\b", joined), word
    for phrase in ("on the left", "at the top", "in the center", "on grass", "at night", "on a brick wall"):
        assert phrase in joined
    # some captions omit a color or a size the scene has
    missing_color = sum(all(o.color not in t for o in s.objects) for s, t in texts)
    assert 0.02 * len(texts) < missing_color < 0.5 * len(texts)
    assert len({t for _, t in texts}) > 0.9 * len(texts)  # many phrasings


def test_complete_caption_states_every_attribute():
    rng = np.random.default_rng(6)
    for _ in range(200):
        scene = PRETRAINING_WORLD.sample(rng)
        text = caption(scene)
        assert text == caption(scene)  # canonical: deterministic
        for o in scene.objects:
            for word in (o.shape, o.color, o.size):
                assert word in text
            if o.pattern != "solid":
                assert o.pattern[:5] in text


def test_concepts_split_and_references():
    assert len(CONCEPTS) >= 16 and len(DEV_CONCEPTS) == 12 and len(FINAL_CONCEPTS) == 4
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    assert len({(c.shape, c.color, c.accent, c.marking) for c in CONCEPTS}) == len(CONCEPTS)
    for c in CONCEPTS:
        assert c.class_word in vocab.SHAPES and c.marking != "none" and c.accent != c.color
        refs = c.references(5)
        assert refs == c.references(5)  # fixed per concept
        assert len({r.objects[0].position for r in refs}) >= 4
        assert len({r.background for r in refs}) >= 4
        prompt = c.prompt("<v1>", refs[0])
        assert "<v1> " + c.shape in prompt
    with pytest.raises(KeyError):
        get_concept("nope")


def test_attribute_and_domain_datasets():
    for word in ("zigzag", "gradient"):
        data = attribute_dataset(word, n=300)
        assert len(data) == 300
        assert all(word in text for _, text in data)
        assert all(any(o.pattern == word for o in s.objects) for s, _ in data)
    scenes = domain_dataset("retro", n=50)
    assert all(s.style == "retro" for s in scenes)
    plain = Scene(scenes[0].objects, scenes[0].background, "plain", scenes[0].texture_seed)
    assert not np.array_equal(render(scenes[0])[0], render(plain)[0])
