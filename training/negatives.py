"""The CLIP ranker's negative images: code grids spoilt the ways a sampled image goes wrong.

`clip_images` gives CLIP's images of a pool: the VQGAN's paintings of the pool's codes, and
of the same codes spoilt -- holes, blobs and specks (`corrupt_codes`) or a colour that drifts
partway through the raster order (`drift_colours`), never into a held-out colour x shape pair.
"""

from __future__ import annotations

import math

import numpy as np

from palette.stages.models.vqgan import VQGAN

from . import analyse, patch_codes, shapes
from .loop import batch_rng
from .pool import Pool, object_token_mask
from .vqgan_trainer import decode_codes

#: Share of an object's codes a hole or a misplaced piece takes, and how many specks a grid gets.
SPOILT_SHARE = (0.15, 0.45)
SPECKS = (1, 6)
#: Share of the grids whose object or background colour drifts.
DRIFT_SHARE = 0.25


def clip_images(vq: VQGAN, pool: Pool, codes: np.ndarray, seed: int,
                vocabulary: patch_codes.PatchVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """CLIP's images of every pool scene, uint8 and aligned with the pool: the VQGAN's paintings of
    its codes, and of its codes spoilt (the ranker's negatives): a `DRIFT_SHARE` with a colour that
    drifts partway (`drift_colours`), the rest by `corrupt_codes`."""
    codes = np.asarray(codes)
    is_object = object_token_mask(pool.images, math.isqrt(codes.shape[1]))
    spoilt = corrupt_codes(codes, is_object, batch_rng(seed, 0, 7))
    drifted = drift_colours(codes, is_object, vocabulary, batch_rng(seed, 0, 8), allowed=allowed_colours(pool.scenes))
    spoilt = np.where((drifted != codes).any(axis=1, keepdims=True), drifted, spoilt)
    return decode_codes(vq, codes), decode_codes(vq, spoilt)


def corrupt_codes(codes: np.ndarray, is_object: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Code grids spoilt the ways a sampled image goes wrong: the CLIP ranker's negative images.

    Per grid, one or more of: holes (a share in `SPOILT_SHARE` of the object's codes become the
    background's code: a fragmented or eaten-away object), misplaced pieces (such a share of them
    become other codes of the same object: a blob instead of the shape) and specks (`SPECKS`
    background codes within 3 codes of the object become object codes: stray pieces, a second
    object); at least one code changes. `is_object` marks the codes whose patch holds object
    pixels (`object_token_mask`). Grids without object codes are returned as they are.
    """
    codes = np.array(codes, copy=True)
    n, length = codes.shape
    grid = math.isqrt(length)
    for i in range(n):
        obj = np.flatnonzero(is_object[i])
        if obj.size == 0:
            continue
        background = np.bincount(codes[i]).argmax()
        kinds = rng.random(3) < 0.5
        if not kinds.any():
            kinds[rng.integers(3)] = True
        source = codes[i].copy()
        if kinds[0] or kinds[1]:
            k = max(1, int(round(rng.uniform(*SPOILT_SHARE) * obj.size)))
            picked = rng.choice(obj, min(k, obj.size), replace=False)
            if kinds[0] and kinds[1]:
                holes = rng.random(picked.size) < 0.5
            else:
                holes = np.full(picked.size, bool(kinds[0]))
            codes[i, picked[holes]] = background
            codes[i, picked[~holes]] = source[rng.choice(obj, int((~holes).sum()))]
        if kinds[2]:
            near = analyse.dilate(is_object[i].reshape(grid, grid), 3).reshape(-1) & ~is_object[i]
            spots = np.flatnonzero(near)
            if spots.size:
                k = min(spots.size, int(rng.integers(SPECKS[0], SPECKS[1] + 1)))
                codes[i, rng.choice(spots, k, replace=False)] = source[rng.choice(obj, k)]
        if np.array_equal(codes[i], source):  # pieces swapped for like pieces: make one hole at least
            codes[i, rng.choice(obj)] = background
    return codes


def drift_colours(codes: np.ndarray, is_object: np.ndarray, vocabulary: patch_codes.PatchVocabulary,
                  rng: np.random.Generator, share: float = DRIFT_SHARE, *, allowed: np.ndarray) -> np.ndarray:
    """Code grids whose object colour or background colour switches to another colour partway
    through the raster order, as a sampled image drifts (half each way): more of the CLIP ranker's
    negative images. A `share` of the grids with object codes changes; the rest are returned as they are.
    An object only drifts to a colour its row of `allowed` (bool [N, C], `allowed_colours`) permits,
    so that not even a spoilt image shows a held-out colour x shape pair.
    """
    codes = np.array(codes, copy=True)
    n_colours = vocabulary.factor_sizes[1]
    length = codes.shape[1]
    for i in range(len(codes)):
        if rng.random() >= share or not is_object[i].any():
            continue
        mask, colour, background = vocabulary.factors(codes[i].astype(np.int64))
        own = int(np.bincount(colour[is_object[i]]).argmax())
        ground = int(np.bincount(background).argmax())
        cut = int(rng.integers(length // 4, 3 * length // 4))
        switch_object = rng.random() < 0.5
        other = int(rng.choice([k for k in range(n_colours) if k not in (own, ground)
                                and (not switch_object or allowed[i, k])]))
        if switch_object:
            colour[cut:] = other
        else:
            background[cut:] = other
        codes[i] = vocabulary.code(mask, colour, background)
    return codes


def allowed_colours(scenes) -> np.ndarray:
    """bool [N, C]: the colours each scene's objects may take without making a held-out pair."""
    return np.asarray([[not any(shapes.is_heldout_pair(c, o.shape) for o in s.objects) for c in shapes.COLOUR_NAMES]
                       for s in scenes])
