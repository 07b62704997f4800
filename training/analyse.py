"""Deterministic reading of a scene back from an image of the `shapes` world.

`analyse(image)` takes a uint8 HWC image (any size; square is what the
generator makes) and returns an `Analysis`: the background colour and the
detected objects, each with colour, shape, size and position named in the
generator's vocabulary. `score(analysis, scene)` compares it with a ground-truth
`SceneSpec`, attribute by attribute.

How it reads an image:

1. every pixel gets its nearest named colour; the most common one is the
   background;
2. the other pixels form 8-connected components; components smaller than a
   fraction of the smallest object the generator draws are dropped as specks;
   a component in which a thick patch of pixels is best explained by another
   colour is split (two objects of different colours that touch);
3. a component's colour is the named colour (background excluded) whose
   segment from the background colour lies nearest, on average, to the
   component's interior pixels: blur mixes an object's colour with the
   background's, and the mixed pixels lie on that segment whatever named colour
   they happen to be nearest to;
4. its mask is then re-cut at the half-way point between background and object
   colour (pixels whose projection onto the background->object segment is at
   least 1/2), which puts the edge where a blurred edge really is, whatever
   third colour the mixed pixels happen to be nearest to;
5. shape by the nearest of templates rasterised by the generator itself at
   this image size (both sizes, a few scales and sub-pixel phases, sharp and
   blurred), compared as box-normalised masks; size from the area, as the box
   side the detected shape would need to cover it (the generator sizes objects
   by their box; blur eats a star's points and so its box, but hardly its
   area), split half-way between the two nominal sizes; position from the box
   centre on the 3x3 grid;
6. for two objects, the relation from the centres' larger displacement.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from . import shapes

_PALETTE = np.asarray([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], dtype=np.float32)
_TEMPLATE_SIDE = 20
#: Components smaller than this fraction of the image are specks, not objects.
#: (The smallest object the generator draws, a small star, covers ~1.7 %.)
MIN_AREA_FRACTION = 0.004
#: Box side (fraction of the image side) between the two sizes.
SIZE_THRESHOLD = shapes.HALF_EXTENT["small"] + shapes.HALF_EXTENT["large"]
#: Grid cell boundaries: half-way between neighbouring grid centres.
_CELL_EDGES = tuple((a + b) / 2 for a, b in zip(shapes.GRID_CENTRES[:-1], shapes.GRID_CENTRES[1:]))


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    #: Box centre (x, y), in fractions of the image width/height.
    centre: tuple[float, float]
    #: Largest side of the bounding box, in fractions of the image side.
    extent: float
    #: Box side of the detected shape that would have this area (what the size is read from).
    equivalent_extent: float
    #: Pixels in the object's mask.
    area: int
    #: Median RGB of the object's interior.
    rgb: tuple[float, float, float]
    #: Template distance of the chosen shape (0 = perfect match, ~0.5 = unrelated).
    shape_distance: float
    #: Mean RGB distance of the object's pixels from the mix of background and object colour
    #: (0 on a clean render, ~10 after mild blur and noise, ~60 for a patch of random noise).
    colour_distance: float = 0.0


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[DetectedObject, ...]
    image_size: tuple[int, int]  # (H, W)
    background_fraction: float = 1.0

    @property
    def relation(self) -> str | None:
        """Relation of objects[0] to objects[1] when exactly two objects were found (objects are largest first)."""
        if len(self.objects) != 2:
            return None
        return relation_between(self.objects[0], self.objects[1])

    def as_scene(self) -> shapes.SceneSpec | None:
        """The analysis as a SceneSpec, or None if it is not one the generator could make."""
        try:
            objs = tuple(shapes.ObjectSpec(o.shape, o.colour, o.size, o.position) for o in self.objects)
            return shapes.SceneSpec(objs, self.background, self.relation)
        except ValueError:
            return None


def relation_between(a: DetectedObject, b: DetectedObject) -> str:
    """Where `a` is relative to `b`: "left of", "right of", "above" or "below"."""
    dx = a.centre[0] - b.centre[0]
    dy = a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# --------------------------------------------------------------------------
# Masks (scipy.ndimage)
# --------------------------------------------------------------------------

_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (int32 labels with 0 = outside, 1..n in raster order, n)."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_NEIGHBOURS)
    return labels.astype(np.int32), int(n)


def _erode(mask: np.ndarray) -> np.ndarray:
    """`mask` less every cell with a 4-neighbour outside it (outside the image counts as outside)."""
    return ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """`mask` grown by `steps` cells in all 8 directions over its last two axes (nothing enters from
    outside); leading axes are a batch."""
    mask = np.asarray(mask, dtype=bool)
    if steps == 0:
        return mask.copy()
    square = np.ones((1,) * (mask.ndim - 2) + (2 * steps + 1, 2 * steps + 1), bool)
    return ndimage.binary_dilation(mask, structure=square)


# --------------------------------------------------------------------------
# Shape templates, rasterised by the generator
# --------------------------------------------------------------------------

def _normalise(mask: np.ndarray) -> np.ndarray | None:
    """Crop a mask to its bounding box and resample it to a square template."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    img = Image.fromarray(crop).resize((_TEMPLATE_SIDE, _TEMPLATE_SIDE), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D float array over max(1, ceil(3 sigma)) pixels each side (edges replicated)."""
    return ndimage.gaussian_filter(x, sigma, mode="nearest", radius=max(1, int(np.ceil(3 * sigma))))


#: Blur levels (Gaussian sigma, in pixels of the analysed image) the templates are rendered at: sharp,
#: and as soft as mild to strong reconstruction blur leaves an edge.
TEMPLATE_BLURS = (0.0, 1.0, 1.5, 2.0)
#: Templates are rasterised at most this many pixels across: above it pixelation no longer matters.
_TEMPLATE_MAX_SIDE = 96


@functools.lru_cache(maxsize=16)
def _templates(side: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, T, T) normalised template masks and their shape names, for images of `side` pixels."""
    masks, names = [], []
    canvas = min(side, _TEMPLATE_MAX_SIDE)
    # Antialiased, and hard-edged as the generator renders by default (pixel centres tested).
    rasters = (1, 4) if canvas <= 64 else (2,)
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            for scale in (1.0 - shapes.SCALE_JITTER, 1.0, 1.0 + shapes.SCALE_JITTER):
                for phase, ss in itertools.product((0.0, 0.25, 0.5), rasters):
                    half = shapes.HALF_EXTENT[size] * scale * canvas
                    c = canvas / 2 + phase
                    cov = shapes.coverage(shape, (c, c + phase / 2), half, canvas, supersample=ss)
                    for blur in TEMPLATE_BLURS:
                        soft = _blur(cov, blur * canvas / side) if blur > 0 else cov
                        t = _normalise(soft >= 0.5)
                        if t is not None:
                            masks.append(t)
                            names.append(shape)
    return np.stack(masks), tuple(names)


@functools.lru_cache(maxsize=None)
def shape_fill(shape: str) -> float:
    """Fraction of its bounding box that `shape` covers."""
    return float(shapes.coverage(shape, (128.0, 128.0), 100.0, 256).sum() / 200.0**2)


def classify_shape(mask: np.ndarray, side: int) -> tuple[str, float]:
    """Nearest template shape of a binary object mask, with its mean absolute distance."""
    t = _normalise(mask)
    if t is None:
        return shapes.SHAPES[0], 1.0
    temps, names = _templates(int(side))
    d = np.abs(temps - t[None]).mean(axis=(1, 2))
    best = {}
    for name, dist in zip(names, d):
        if dist < best.get(name, np.inf):
            best[name] = float(dist)
    shape = min(best, key=best.get)
    return shape, best[shape]


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------

def _position(cx: float, cy: float) -> str:
    col = int(np.searchsorted(_CELL_EDGES, cx))
    row = int(np.searchsorted(_CELL_EDGES, cy))
    return shapes._POSITION_AT[(col, row)]


def _object_colour(pixels: np.ndarray, bg: int) -> int:
    """The named colour whose segment from the background colour best explains the pixels.

    Blur mixes an object's colour with the background's, so a thin object's pixels
    lie along the segment between the two rather than around the object's colour
    (the mix of red and yellow is orange-ish, say); the mean distance to each
    candidate segment picks the colour that was mixed, not the colour of the mix.
    """
    return int(_segment_costs(pixels, bg).mean(axis=0).argmin())


def _segment_costs(pixels: np.ndarray, bg: int) -> np.ndarray:
    """(N, K) distance of each pixel to the segment from the background colour to each named colour (inf for bg)."""
    a = _PALETTE[bg]
    out = np.full((len(pixels), len(_PALETTE)), np.inf, dtype=np.float32)
    for k in range(len(_PALETTE)):
        if k == bg:
            continue
        d = _PALETTE[k] - a
        t = np.clip(((pixels - a) @ d) / float(d @ d), 0.0, 1.0)
        out[:, k] = np.sqrt((((pixels - a) - t[:, None] * d) ** 2).sum(-1))
    return out


def _split(comp: np.ndarray, img: np.ndarray, bg: int, min_area: int) -> list[tuple[np.ndarray, int]]:
    """A component as (mask, colour index) parts: one, or one per touching object of another colour.

    Each pixel votes for the colour whose segment from the background lies
    nearest; a colour other than the component's own that holds a thick
    connected patch of at least an object's minimum area is a separate object.
    """
    interior = _erode(comp)
    core = interior if interior.sum() >= 4 else comp
    k0 = _object_colour(img[core], bg)
    area = int(comp.sum())
    need = min_area
    if area < 2 * need:
        return [(comp, k0)]
    votes = np.full(comp.shape, -1, dtype=np.int64)
    votes[comp] = _segment_costs(img[comp], bg).argmin(-1)
    parts, taken = [], np.zeros_like(comp)
    for k in np.unique(votes[comp]):
        if k == k0 or int((votes == k).sum()) < need:
            continue
        sub, n = label_components(votes == k)
        for j in range(1, n + 1):
            m = sub == j
            # A real object is thick: a fringe of mixed pixels along an edge erodes away.
            if int(m.sum()) >= need and int(_erode(m).sum()) >= need // 2:
                parts.append((m, int(k)))
                taken |= m
    if not parts:
        return [(comp, k0)]
    rest = comp & ~dilate(taken, 1)
    if int(rest.sum()) >= min_area:
        parts.insert(0, (rest, k0))
    # Re-read each part's colour from its own pixels.
    out = []
    for m, _ in parts:
        inner = _erode(m)
        out.append((m, _object_colour(img[inner if inner.sum() >= 4 else m], bg)))
    return out


def analyse(image: np.ndarray, *, max_objects: int = 8) -> Analysis:
    """Read background and objects from a uint8 (H, W, 3) image (RGBA and grey are accepted too)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"expected an HWC image, got shape {arr.shape}")
    img = arr[..., :3].astype(np.float32)
    h, w = img.shape[:2]
    side = min(h, w)

    d2 = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    counts = np.bincount(nearest.reshape(-1), minlength=len(_PALETTE))
    bg = int(counts.argmax())
    bg_rgb = _PALETTE[bg]

    comps, n = label_components(nearest != bg)
    min_area = max(3, int(round(MIN_AREA_FRACTION * h * w)))
    areas = np.bincount(comps.reshape(-1), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_area]

    # Split components where two objects of different colours touch, then read each part.
    parts: list[tuple[np.ndarray, int]] = []
    for i in sorted(keep, key=lambda i: -areas[i]):
        parts += _split(comps == i, img, bg, min_area)
    parts.sort(key=lambda p: -int(p[0].sum()))

    objects = []
    claimed = np.zeros((h, w), dtype=bool)
    for part, k in parts:
        # Re-cut the edge half-way between background and object colour.
        axis = _PALETTE[k] - bg_rgb
        alpha = ((img - bg_rgb) @ axis) / float(axis @ axis)
        mask = (alpha >= 0.5) & dilate(part, 2) & ~claimed
        if len(parts) > 1:
            # Keep to pixels no other part holds (a neighbour's colour can project past 1/2 on this axis).
            others = np.zeros_like(part)
            for q, _ in parts:
                if q is not part:
                    others |= q
            mask &= ~others
        if mask.sum() < min_area:
            mask = part & ~claimed
            if mask.sum() < min_area:
                continue
        claimed |= mask
        interior = _erode(part)
        rgb = np.median(img[interior if interior.sum() >= 4 else part], axis=0)
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        extent = max((x1 - x0) / w, (y1 - y0) / h)
        shape, dist = classify_shape(mask, side)
        # Size from area: blur eats a star's points (and its box) but hardly its area.
        equivalent = float(np.sqrt(mask.sum() / shape_fill(shape) / (h * w)))
        objects.append(DetectedObject(
            colour=shapes.COLOUR_NAMES[k],
            shape=shape,
            size="large" if equivalent >= SIZE_THRESHOLD else "small",
            position=_position(cx, cy),
            centre=(float(cx), float(cy)),
            extent=float(extent),
            equivalent_extent=equivalent,
            area=int(mask.sum()),
            rgb=tuple(float(x) for x in rgb),
            shape_distance=dist,
            colour_distance=float(_segment_costs(img[mask], bg)[:, k].mean()),
        ))
        if len(objects) >= max_objects:
            break
    return Analysis(shapes.COLOUR_NAMES[bg], tuple(objects), (h, w), float(counts[bg] / (h * w)))


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

_OBJECT_ATTRS = ("colour", "shape", "size", "position")


def _match(detected: Sequence[DetectedObject], expected: Sequence[shapes.ObjectSpec]) -> list[int | None]:
    """For each expected object, the index of its detected object (or None), maximising agreement."""
    cand = list(range(min(len(detected), 6)))
    k = min(len(cand), len(expected))
    best, best_key = [None] * len(expected), None
    for perm in itertools.permutations(cand, k):
        colours = sum(detected[j].colour == expected[i].colour for i, j in enumerate(perm))
        agree = sum(getattr(detected[j], a) == getattr(expected[i], a) for i, j in enumerate(perm) for a in _OBJECT_ATTRS)
        key = (colours, agree, -sum(perm))
        if best_key is None or key > best_key:
            best_key, best = key, list(perm) + [None] * (len(expected) - k)
    return best


def score(analysis: Analysis, scene: shapes.SceneSpec,
          attributes: Iterable[str] | None = None) -> dict[str, bool | None]:
    """Per-attribute correctness of an analysis against the scene it should show.

    Keys: "count" (as many objects found as the scene has), "background",
    "colour", "shape", "size", "position" (every scene object matched by a
    detected object with that attribute right), "relation" (None for one-object
    scenes) and "all_correct": count and every applicable attribute among
    `attributes` (default: all of `shapes.ATTRIBUTES`; pass an `EvalPrompt.mentioned`
    to score only what a prompt states).
    """
    wanted = set(shapes.ATTRIBUTES if attributes is None else attributes)
    unknown = wanted - set(shapes.ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    det = analysis.objects
    match = _match(det, scene.objects)
    out: dict[str, bool | None] = {
        "count": len(det) == len(scene.objects),
        "background": analysis.background == scene.background,
    }
    for a in _OBJECT_ATTRS:
        out[a] = all(j is not None and getattr(det[j], a) == getattr(o, a) for o, j in zip(scene.objects, match))
    if scene.relation is None:
        out["relation"] = None
    else:
        j0, j1 = match
        out["relation"] = j0 is not None and j1 is not None and relation_between(det[j0], det[j1]) == scene.relation
    out["all_correct"] = bool(out["count"]) and all(out[a] for a in wanted if out.get(a) is not None)
    return out


def accuracy(results: Iterable[dict[str, bool | None]]) -> dict[str, float]:
    """Mean of each key over score() results, skipping None (relation on one-object scenes)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r.items():
            if v is None:
                continue
            sums[k] = sums.get(k, 0.0) + float(bool(v))
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def degrade(image: np.ndarray, rng: np.random.Generator, *, blur: float = 1.0, noise: float = 8.0) -> np.ndarray:
    """Gaussian blur (PIL radius `blur`) then Gaussian noise (std `noise`), as a stand-in for a lossy reconstruction."""
    from PIL import ImageFilter

    out = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(radius=blur))
    arr = np.asarray(out, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


__all__ = [
    "Analysis", "DetectedObject", "MIN_AREA_FRACTION", "SIZE_THRESHOLD", "accuracy", "analyse", "classify_shape",
    "degrade", "label_components", "relation_between", "score",
]
