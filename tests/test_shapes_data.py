"""The procedural captioned-image generator: determinism, held-out exclusion, captions, images."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from palette.training import shapes


def test_same_seed_same_samples():
    a_img, a_cap, a_sc = shapes.batch(123, 40)
    b_img, b_cap, b_sc = shapes.batch(123, 40)
    assert np.array_equal(a_img, b_img)
    assert a_cap == b_cap
    assert a_sc == b_sc


def test_batch_is_the_start_of_the_stream():
    imgs, caps, scenes = shapes.batch(5, 10)
    it = shapes.iterate_dataset(5)
    for i in range(10):
        img, cap, scene = next(it)
        assert np.array_equal(img, imgs[i]) and cap == caps[i] and scene == scenes[i]


def test_different_seeds_differ():
    a_img, a_cap, a_sc = shapes.batch(1, 40)
    b_img, b_cap, b_sc = shapes.batch(2, 40)
    assert not np.array_equal(a_img, b_img)
    assert a_cap != b_cap
    assert sum(x != y for x, y in zip(a_sc, b_sc)) > 30


@pytest.mark.parametrize("size", [64, 32, 96])
def test_images_are_uint8_of_the_requested_size(size):
    imgs, caps, scenes = shapes.batch(7, 8, size=size)
    assert imgs.dtype == np.uint8 and imgs.shape == (8, size, size, 3)
    for img, scene in zip(imgs, scenes):
        one = shapes.render(scene, size)
        assert one.dtype == np.uint8 and one.shape == (size, size, 3)
        assert np.array_equal(one, img)


def test_images_are_flat_named_colours():
    imgs, _, scenes = shapes.batch(11, 60, two_objects_prob=0.5)
    for img, scene in zip(imgs, scenes):
        colours = {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}
        expected = {shapes.COLOURS[scene.background]} | {shapes.COLOURS[o.colour] for o in scene.objects}
        assert colours == expected  # no antialiasing by default: only the scene's colours, each present
        flat = img.reshape(-1, 3)
        bg_share = np.all(flat == shapes.COLOURS[scene.background], axis=1).mean()
        assert bg_share > 0.6


def test_supersampling_softens_edges_only():
    scene = shapes.SceneSpec((shapes.ObjectSpec("star", "red", "large", "centre"),), "blue")
    sharp = shapes.render(scene)
    soft = shapes.render(scene, supersample=4)
    assert len({tuple(c) for c in soft.reshape(-1, 3)}) > 2
    assert np.array_equal(sharp[0], soft[0])  # the background is untouched
    assert np.abs(sharp.astype(int) - soft.astype(int)).mean() < 8


def test_heldout_pairs_never_appear_in_training_samples():
    heldout = set(shapes.HELDOUT)
    pairs = Counter()
    it = shapes.iterate_dataset(2024, two_objects_prob=0.4)
    for _ in range(5000):
        _, _, scene = next(it)
        for o in scene.objects:
            assert (o.colour, o.shape) not in heldout
            pairs[(o.colour, o.shape)] += 1
        assert not scene.has_heldout
    # Every other pair is trained on; every colour and shape of a held-out pair appears in other pairs.
    allowed = {(c, s) for c in shapes.COLOUR_NAMES for s in shapes.SHAPES} - heldout
    assert set(pairs) == allowed
    # Without the exclusion the held-out pairs do appear.
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        seen |= {(o.colour, o.shape) for o in shapes.sample_scene(rng, exclude_heldout=False).objects}
    assert heldout <= seen


def test_scene_statistics_cover_the_vocabulary():
    rng = np.random.default_rng(3)
    scenes = [shapes.sample_scene(rng, two_objects_prob=0.5) for _ in range(3000)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.size for o in objects} == set(shapes.SIZES)
    assert {o.position for o in objects} == set(shapes.POSITION_NAMES)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)
    assert {s.relation for s in scenes if s.relation} == set(shapes.RELATIONS)
    n_two = sum(len(s.objects) == 2 for s in scenes)
    assert 0.4 < n_two / len(scenes) < 0.6
    for s in scenes:
        assert all(o.colour != s.background for o in s.objects)
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.colour != b.colour
            (ax, ay), (bx, by) = a.centre, b.centre
            expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[s.relation]
            assert expected


_POSITION_WORDS = {
    "top left": ("top left",), "top right": ("top right",), "bottom left": ("bottom left",),
    "bottom right": ("bottom right",), "top": ("top",), "bottom": ("bottom",), "left": ("left",),
    "right": ("right",), "centre": ("centre", "middle"),
}
_RELATION_WORDS = {"left of": ("left of",), "right of": ("right of",), "above": ("above",), "below": ("below", "under")}


def _check_mentions(text: str, scene: shapes.SceneSpec, mentioned: frozenset[str]) -> None:
    def has(phrase: str) -> bool:
        return re.search(rf"\b{re.escape(phrase)}\b", text) is not None

    for o in scene.objects:
        assert has(o.shape), (text, o)
        if "colour" in mentioned:
            assert has(o.colour), (text, o)
        if "size" in mentioned:
            assert has(o.size), (text, o)
        if "position" in mentioned:
            assert any(has(p) for p in _POSITION_WORDS[o.position]), (text, o)
    if "background" in mentioned:
        assert has(scene.background), text
    if "relation" in mentioned and not {"position"} <= mentioned:
        assert any(has(p) for p in _RELATION_WORDS[scene.relation]), text
    # Nothing that is not in the scene: no other colour, shape or size word.
    words = set(re.findall(r"[a-z]+", text))
    assert words & set(shapes.COLOUR_NAMES) <= {o.colour for o in scene.objects} | {scene.background}, text
    assert words & set(shapes.SHAPES) <= {o.shape for o in scene.objects}, text
    assert words & set(shapes.SIZES) <= {o.size for o in scene.objects}, text


def test_captions_mention_the_scene():
    rng = np.random.default_rng(17)
    phrasings = set()
    for _ in range(1500):
        scene = shapes.sample_scene(rng, two_objects_prob=0.4)
        text, mentioned = shapes.caption_and_mentions(scene, rng)
        assert {"colour", "shape"} <= mentioned
        assert ("relation" in mentioned) == (len(scene.objects) == 2)
        _check_mentions(text, scene, mentioned)
        assert set(text.replace(",", " ").split()) <= set(shapes.caption_words())
        phrasings.add(re.sub(r"[a-z]+", "w", text))
    assert len(phrasings) >= 10  # varied phrasings


def test_colourless_captions_leave_out_the_objects_colours_and_only_them():
    rng = np.random.default_rng(23)
    for _ in range(500):
        scene = shapes.sample_scene(rng, two_objects_prob=0.4)
        text, mentioned = shapes.caption_and_mentions(scene, rng, colourless=True)
        assert "colour" not in mentioned and "shape" in mentioned
        _check_mentions(text, scene, mentioned)
        words = text.replace(",", " ").split()
        assert not set(words) & {o.colour for o in scene.objects}, text
        assert "  " not in text and not re.search(r"\ban [^aeiou]|\ba [aeiou]", text), text  # articles still fit
    one = shapes.SceneSpec((shapes.ObjectSpec("circle", "red", "large", "top left"),), "blue")
    assert shapes.caption(one, colourless=True) == "a large circle in the top left corner on a blue background"


def test_dataset_captions_describe_their_images():
    it = shapes.iterate_dataset(99, two_objects_prob=0.5)
    for _ in range(200):
        _, text, scene = next(it)
        for o in scene.objects:
            assert o.colour in text and o.shape in text


def test_full_caption_examples():
    one = shapes.SceneSpec((shapes.ObjectSpec("circle", "red", "large", "top left"),), "blue")
    assert shapes.caption(one) == "a large red circle in the top left corner on a blue background"
    two = shapes.SceneSpec(
        (shapes.ObjectSpec("square", "blue", "small", "left"), shapes.ObjectSpec("star", "orange", "large", "right")),
        "white", "left of",
    )
    assert shapes.caption(two, full=True) == "a small blue square on the left and a large orange star on the right on a white background"


def test_eval_prompts_are_fixed_and_split_by_heldout():
    held = shapes.eval_prompts("heldout", 24)
    assert held == shapes.eval_prompts("heldout", 24)
    assert len(held) == 24
    assert Counter((p.scene.objects[0].colour, p.scene.objects[0].shape) for p in held) == Counter(
        {pair: 4 for pair in shapes.HELDOUT}
    )
    seen = shapes.eval_prompts("seen", 24)
    assert all(not p.scene.has_heldout for p in seen)
    two = shapes.eval_prompts("heldout", 12, two_objects_prob=1.0)
    assert all(len(p.scene.objects) == 2 and p.scene.has_heldout for p in two)
    for p in held + seen + two:
        assert p.prompt == shapes.caption(p.scene, full=True)
        _check_mentions(p.prompt, p.scene, p.mentioned)
        assert p.mentioned == frozenset(a for a in shapes.ATTRIBUTES if a != "relation" or p.scene.relation)
        assert p.scene == p.scene.canonical()
    assert shapes.eval_prompts("seen", 8, seed=1) != shapes.eval_prompts("seen", 8, seed=2)
    with pytest.raises(ValueError):
        shapes.eval_prompts("other", 4)


def test_scene_validation():
    with pytest.raises(ValueError):
        shapes.ObjectSpec("hexagon", "red", "large", "centre")
    with pytest.raises(ValueError):
        shapes.SceneSpec((shapes.ObjectSpec("circle", "red", "large", "centre"),), "red")
    red = shapes.ObjectSpec("circle", "red", "small", "left")
    with pytest.raises(ValueError):
        shapes.SceneSpec((red, shapes.ObjectSpec("star", "red", "small", "right")), "blue", "left of")
    with pytest.raises(ValueError):
        shapes.SceneSpec((red, shapes.ObjectSpec("star", "green", "small", "right")), "blue")


def test_every_position_puts_an_object_at_the_same_offset_in_its_codes():
    # At 64x64 (VQGAN f4) an object looks the same in its 4x4 patches wherever it is, only shifted
    # by whole patches: DalleBart then learns one spelling per shape, not one per shape and place.
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            crops = []
            for position in shapes.POSITION_NAMES:
                image = shapes.render(shapes.SceneSpec((shapes.ObjectSpec(shape, "red", size, position),), "blue"))
                ys, xs = np.nonzero((image != image[0, 0]).any(axis=-1))
                y0, x0 = ys.min() // 4 * 4, xs.min() // 4 * 4
                crops.append(np.pad(image, ((0, 32), (0, 32), (0, 0)), mode="edge")[y0:y0 + 32, x0:x0 + 32])
            assert all(np.array_equal(c, crops[0]) for c in crops), (shape, size)
