"""The training pool: a fixed, seeded set of the generator's scenes, their images and captions.

Every trainer draws its batches from one `Pool`: the first `n` scenes of the seeded
stream, jitter-free (every object exactly at its named position and size, so a full caption
fixes its image), never a held-out colour x shape pair. Captions are drawn per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import analyse, patch_codes, shapes
from .model_set import IMAGE_SIZE

#: The share of two-object scenes in the default set's pool.
TWO_OBJECTS_PROB = 0.1


@dataclasses.dataclass
class Pool:
    """A fixed pool of training samples: images and their scenes (captions are drawn per step)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    scenes: list

    def __len__(self) -> int:
        return len(self.scenes)


def make_pool(seed: int, n: int, size: int = IMAGE_SIZE, two_objects_prob: float = TWO_OBJECTS_PROB) -> Pool:
    """The first `n` jitter-free samples of the seeded stream (held-out colour x shape pairs never appear)."""
    images, _, scenes = shapes.batch(int(seed), int(n), size=size, jitter=False, two_objects_prob=two_objects_prob)
    return Pool(images, scenes)


def sample_captions(scenes, rng: np.random.Generator, full_prob: float, colourless: np.ndarray) -> list[str]:
    """A caption per scene in a random phrasing: the canonical full one with probability `full_prob`,
    without colours where `colourless` (a bool per scene) says so."""
    return [shapes.caption(s, rng, full=bool(rng.random() < full_prob), colourless=bool(c))
            for s, c in zip(scenes, colourless)]


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Captions the tokenizers and the word-frequency file are built from.

    Text only: every colour and shape word is in the training captions anyway, so including
    the held-out pairs here leaks no image of them; it only lets BPE merge whole phrases.
    """
    rng = np.random.default_rng((int(seed), 99))
    scenes = [shapes.sample_scene(rng, exclude_heldout=False) for _ in range(n)]
    return [shapes.caption(s, rng, full=bool(i % 4 == 0)) for i, s in enumerate(scenes)] + shapes.caption_words()


def near_object_pixels(images: np.ndarray, radius: int) -> np.ndarray:
    """bool [N, H, W, 1]: object pixels (`patch_codes.object_mask`) and the pixels within `radius`
    of one (a square neighbourhood), with a channel axis, to weigh pixel losses."""
    return analyse.dilate(patch_codes.object_mask(images), radius)[..., None]


def object_token_mask(images: np.ndarray, grid: int) -> np.ndarray:
    """bool [N, grid*grid]: codes whose image patch holds object pixels (pixels unlike the corner)."""
    return patch_codes.patch_pixels(patch_codes.object_mask(images), grid).any(-1)


def code_onsets(codes: np.ndarray) -> np.ndarray:
    """int [N]: per code sequence, the index of the first code unlike its most common code (0 if none)."""
    codes = np.asarray(codes)
    modes = np.asarray([np.bincount(row).argmax() for row in codes])
    return np.argmax(codes != modes[:, None], axis=1).astype(np.int32)
