"""Product codes (mask x object colour x background colour): what makes a held-out colour x shape
pair spellable from codes that training shows."""

from __future__ import annotations

import numpy as np
import pytest

from palette.training import patch_codes, shapes


@pytest.fixture(scope="module")
def vocabulary():
    return patch_codes.PatchVocabulary.for_images(64, 16)


def _scene(shape="triangle", colour="red", size="large", position="centre", background="blue"):
    return shapes.SceneSpec((shapes.ObjectSpec(shape, colour, size, position),), background)


def _codes(vocabulary, scenes):
    images = np.stack([shapes.render(s) for s in scenes])
    return patch_codes.patch_codes(images, scenes, vocabulary)


def test_codes_and_factors_round_trip(vocabulary):
    codes = np.arange(vocabulary.size)
    mask, colour, background = vocabulary.factors(codes)
    assert mask.max() == vocabulary.num_masks - 1 and colour.max() == background.max() == patch_codes.N_COLOURS - 1
    np.testing.assert_array_equal(vocabulary.code(mask, colour, background), codes)


def test_a_heldout_pair_is_spelt_with_the_masks_of_its_shape_and_the_codes_of_its_colour(vocabulary):
    purple_triangle, red_triangle = _scene(colour="purple"), _scene(colour="red")
    assert purple_triangle.has_heldout and not red_triangle.has_heldout
    held, seen = _codes(vocabulary, [purple_triangle, red_triangle])
    h_mask, h_colour, h_bg = vocabulary.factors(held)
    s_mask, s_colour, _ = vocabulary.factors(seen)
    np.testing.assert_array_equal(h_mask, s_mask)  # the same shape, mask for mask
    assert set(h_colour.tolist()) == {shapes.COLOUR_NAMES.index("purple")}
    assert set(s_colour.tolist()) == {shapes.COLOUR_NAMES.index("red")}
    assert set(h_bg.tolist()) == {shapes.COLOUR_NAMES.index("blue")}
    # Every mask of every held-out scene is in the vocabulary built from geometry alone.
    images = np.stack([shapes.render(_scene(shape=s, colour=c, size=z, position=p, background="black" if c != "black" else "red"))
                       for c, s in shapes.HELDOUT for z in shapes.SIZES for p in shapes.POSITION_NAMES])
    keys = patch_codes.mask_keys(patch_codes.object_mask(images), 16)
    assert np.isin(keys, vocabulary.masks).all()


def test_masks_tell_open_background_and_object_insides_from_edges(vocabulary):
    codes = _codes(vocabulary, [_scene(shape="square", size="large", position="centre")])[0].reshape(16, 16)
    mask = vocabulary.masks[vocabulary.factors(codes)[0]]
    bits, calm = mask >> 1, mask & 1
    assert calm[0, 0] and bits[0, 0] == 0  # a corner: open background
    assert calm[8, 8] and bits[8, 8] == 0xFFFF  # the middle of a large square: deep inside
    edge = np.flatnonzero((bits.reshape(-1) == 0) & (calm.reshape(-1) == 0))
    assert edge.size  # background next to the square is not open background
    assert len(np.unique(mask)) < len(vocabulary.masks)


def test_background_patches_take_the_colour_of_the_nearest_object(vocabulary):
    scene = shapes.SceneSpec((shapes.ObjectSpec("circle", "red", "small", "left"), shapes.ObjectSpec("star", "green", "small", "right")),
                        "white", "left of")
    colour = vocabulary.factors(_codes(vocabulary, [scene])[0])[1].reshape(16, 16)
    assert (colour[:, :7] == shapes.COLOUR_NAMES.index("red")).all()
    assert (colour[:, 9:] == shapes.COLOUR_NAMES.index("green")).all()


def test_a_mask_the_geometry_never_makes_takes_the_nearest_one(vocabulary):
    keys = vocabulary.masks[[3, 10]]
    flipped = keys ^ (1 << 1)  # one pixel changed
    flipped = flipped[~np.isin(flipped, vocabulary.masks)]
    assert flipped.size
    idx = vocabulary.mask_index(flipped)
    diff = [bin(int(a >> 1) ^ int(b >> 1)).count("1") for a, b in zip(flipped, vocabulary.masks[idx])]
    assert max(diff) <= 1
    jittered = shapes.SceneSpec((shapes.ObjectSpec("star", "red", "large", "centre", (0.01, 0.013), 1.04),), "blue")
    image = shapes.render(jittered)[None]
    keys = patch_codes.mask_keys(patch_codes.object_mask(image), 16)
    assert not np.isin(keys, vocabulary.masks).all()  # jitter makes masks of its own...
    codes = patch_codes.patch_codes(image, [jittered], vocabulary)
    assert codes.min() >= 0 and codes.max() < vocabulary.size  # ...which still get codes
