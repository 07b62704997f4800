"""Image codes that say what a patch shows: (mask, object colour, background colour).

A code of the default set's VQGAN is not a free cluster of patches but a triple: the patch's
*mask* (which of its pixels belong to an object, and whether it lies in open background or
deep inside an object), the colour of the object it belongs to (for background patches, the
nearest object's) and the background colour. Code index = (mask * C + object) * C + background
over the C named colours, so the codebook is the full product and every combination has a
code -- including the held-out colour x shape pairs, whose masks occur with other colours and
whose colours occur with other masks in training.

Why: with free codes, the edge of a purple triangle is a token of its own, which no training
image shows, so DalleBart can never write it and the VQGAN never learns to paint it. With
product codes, each factor of every code a held-out prompt needs has been seen, and both
DalleBart (`dallebart_trainer`, one softmax per factor) and the VQGAN
(`vqgan_trainer`, one codebook part per factor) are built to combine factors freely. The
exported files are the ordinary released layout: the product codebook and DalleBart tables are
materialised over all codes.

Masks come from the generator's geometry: positions sit on the code grid (`GRID_CENTRES`),
so every shape, size and position spells its mask with a small fixed set of patch masks
(`mask_vocabulary`). Patches unlike any of them (a jittered image) take the nearest mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shapes

N_COLOURS = len(shapes.COLOUR_NAMES)
_COLOUR_INDEX = {name: i for i, name in enumerate(shapes.COLOUR_NAMES)}


def patch_pixels(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool [N, side, side] -> bool [N, grid*grid, f*f] in raster order."""
    n, side = mask.shape[:2]
    f = side // grid
    return mask.reshape(n, grid, f, grid, f).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, f * f)


def _calm(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool [N, grid*grid]: patches all background or all object whose 8 neighbours are the same
    (outside the image counts as background): open background or deep inside an object."""
    p = patch_pixels(mask, grid)
    full, empty = p.all(-1), ~p.any(-1)
    state = np.where(full, 1, np.where(empty, 0, -1)).reshape(-1, grid, grid)
    padded = np.pad(state, ((0, 0), (1, 1), (1, 1)), constant_values=0)
    calm = state >= 0
    for dy in range(3):
        for dx in range(3):
            calm &= padded[:, dy:dy + grid, dx:dx + grid] == state
    return calm.reshape(-1, grid * grid)


def mask_keys(mask: np.ndarray, grid: int) -> np.ndarray:
    """int64 [N, grid*grid]: each patch's object pixels as bits, times two, plus its calmness."""
    p = patch_pixels(np.asarray(mask, bool), grid)
    if p.shape[-1] > 62:
        raise ValueError(f"patches of {p.shape[-1]} pixels do not fit a 64-bit mask key")
    bits = (p.astype(np.int64) << np.arange(p.shape[-1], dtype=np.int64)).sum(-1)
    return bits * 2 + _calm(mask, grid)


def object_mask(images: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: pixels unlike the image's corner pixel, which the generator always leaves background."""
    images = np.asarray(images)
    return np.any(images != images[:, :1, :1], axis=-1)


def mask_vocabulary(size: int, grid: int) -> np.ndarray:
    """Sorted int64 mask keys of every shape, size and position the generator draws (no jitter).

    Pure geometry: one colour pair stands for all, so no colour x shape pair is involved.
    Two-object layouts keep their objects two cells apart, so they add no mask of their own.
    """
    scenes = [shapes.SceneSpec((shapes.ObjectSpec(shape, shapes.COLOUR_NAMES[0], s, position),), shapes.COLOUR_NAMES[1])
              for shape in shapes.SHAPES for s in shapes.SIZES for position in shapes.POSITION_NAMES]
    images = np.stack([shapes.render(scene, size) for scene in scenes])
    return np.unique(mask_keys(object_mask(images), grid))


@dataclass(frozen=True)
class PatchVocabulary:
    """The code space: `masks` (sorted mask keys) x object colour x background colour."""

    masks: np.ndarray  # int64 [M]
    grid: int

    @classmethod
    def for_images(cls, size: int, grid: int) -> "PatchVocabulary":
        return cls(mask_vocabulary(size, grid), grid)

    @property
    def num_masks(self) -> int:
        return len(self.masks)

    @property
    def factor_sizes(self) -> tuple[int, int, int]:
        return self.num_masks, N_COLOURS, N_COLOURS

    @property
    def size(self) -> int:
        return self.num_masks * N_COLOURS * N_COLOURS

    def code(self, mask: np.ndarray, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
        return ((np.asarray(mask) * N_COLOURS + colour) * N_COLOURS + background).astype(np.int32)

    def factors(self, codes) -> tuple:
        """codes -> (mask, colour, background) indices; works on numpy and jax arrays alike."""
        rest, background = divmod(codes, N_COLOURS)
        mask, colour = divmod(rest, N_COLOURS)
        return mask, colour, background

    def all_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask, colour, background) of every code 0..size-1."""
        return self.factors(np.arange(self.size))

    def mask_index(self, keys: np.ndarray) -> np.ndarray:
        """Index into `masks` of each key; a key not in the vocabulary takes the nearest mask
        (fewest differing pixels, then calmness)."""
        keys = np.asarray(keys, np.int64)
        idx = np.clip(np.searchsorted(self.masks, keys), 0, len(self.masks) - 1)
        unknown = self.masks[idx] != keys
        if unknown.any():
            odd = np.unique(keys[unknown])
            diff = (odd[:, None] >> 1) ^ (self.masks[None, :] >> 1)
            pixels = np.vectorize(lambda x: bin(int(x)).count("1"))(diff)
            calm = (odd[:, None] & 1) != (self.masks[None, :] & 1)
            nearest = np.argmin(pixels * 2 + calm, axis=1)
            idx[unknown] = nearest[np.searchsorted(odd, keys[unknown])]
        return idx


def patch_colours(scenes, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(object colour int [N, grid*grid], background colour int [N]) of each patch: the colour of
    the object whose centre is nearest the patch's centre, and the scene's background."""
    centres = (np.arange(grid) + 0.5) / grid
    py, px = np.meshgrid(centres, centres, indexing="ij")
    colours = np.empty((len(scenes), grid * grid), np.int64)
    for i, scene in enumerate(scenes):
        dist = [np.hypot(px - o.centre[0], py - o.centre[1]).reshape(-1) for o in scene.objects]
        nearest = np.argmin(np.stack(dist), axis=0)
        colours[i] = np.asarray([_COLOUR_INDEX[o.colour] for o in scene.objects])[nearest]
    background = np.asarray([_COLOUR_INDEX[s.background] for s in scenes], np.int64)
    return colours, background


def patch_codes(images: np.ndarray, scenes, vocabulary: PatchVocabulary) -> np.ndarray:
    """int32 [N, grid*grid]: the code of every patch of the generator's images, from their scenes."""
    grid = vocabulary.grid
    masks = vocabulary.mask_index(mask_keys(object_mask(images), grid))
    colours, background = patch_colours(scenes, grid)
    return vocabulary.code(masks, colours, np.broadcast_to(background[:, None], colours.shape))


def colour_table() -> np.ndarray:
    """float32 [C, 3]: the named colours in [0, 1], in code order (starts the colour parts of the codebook)."""
    return np.asarray([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], np.float32) / 255.0
