"""Procedural captioned images: flat-coloured shapes on a flat background.

Every sample is a `SceneSpec` (one or two objects, each with a shape, a colour,
a size and a named position, a background colour and, for two objects, the
relation of the first to the second), rendered by `render` into a uint8 HWC
image and described by `caption` in one of several phrasings. Everything is
derived from a seeded `numpy.random.Generator`, so a seed fixes the whole
stream and the stream is unlimited; nothing is read from disk.

The geometry is resolution-free: positions, sizes and jitter are fractions of
the image side, and shapes are rasterised analytically (pixel centres tested
against the shape, optionally supersampled for mild antialiasing), so the same
scene renders consistently at 64x64 or any other size and the analyser in
`palette.training.analyse` can rebuild the exact templates it is calibrated on.

A fixed list of colour x shape pairs, `HELDOUT`, never appears as any object of
a training sample (`sample_scene(..., exclude_heldout=True)`, the default); the
evaluation prompts of `eval_prompts(kind="heldout")` are built from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

# --------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------

#: Named colours, chosen to stay apart (pairwise RGB distance >= ~100) so that
#: the nearest-colour reading survives blur, noise and lossy reconstruction.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 135, 20),
    "yellow": (250, 230, 50),
    "green": (35, 170, 60),
    "blue": (35, 75, 225),
    "purple": (150, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Background colours: the same named palette (a background never has the
#: colour of one of the scene's objects).
BACKGROUNDS: tuple[str, ...] = COLOUR_NAMES

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES: tuple[str, ...] = ("small", "large")

#: Positions on a 3x3 grid: name -> (column, row), 0 = left/top, 2 = right/bottom.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
_POSITION_AT: dict[tuple[int, int], str] = {v: k for k, v in POSITIONS.items()}

#: Relation of the first object to the second in two-object scenes.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Attribute names scored by the analyser and reported as "mentioned" by captions.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "relation")

#: Colour x shape pairs that never appear in training samples, as any object.
HELDOUT: tuple[tuple[str, str], ...] = (
    ("green", "star"),
    ("purple", "triangle"),
    ("orange", "ring"),
    ("blue", "cross"),
    ("yellow", "square"),
    ("white", "circle"),
)
_HELDOUT_SET = frozenset(HELDOUT)


def is_heldout_pair(colour: str, shape: str) -> bool:
    """Whether an object of this colour and shape is one of the `HELDOUT` pairs."""
    return (colour, shape) in _HELDOUT_SET

# --------------------------------------------------------------------------
# Geometry, as fractions of the image side
# --------------------------------------------------------------------------

#: Centre of grid column/row 0, 1, 2: quarters of the side, so that at 64x64 (16 px apart)
#: every position puts an object at the same offset within a VQGAN f4 code's 4x4 patch. An
#: object then has the same codes wherever it is, shifted by whole codes, and DalleBart learns
#: one spelling per shape rather than one per shape and position.
GRID_CENTRES: tuple[float, float, float] = (0.25, 0.5, 0.75)
#: Half the side of an object's (square) bounding box, per size. At 64x64 a small object
#: is 18 px across and a large one 26 px: smaller, a star's points and a ring's hole are a
#: pixel or two wide and no longer survive a 16x16 grid of codes.
HALF_EXTENT: dict[str, float] = {"small": 0.14, "large": 0.20}
#: Sampled jitter: centre offset (each axis, uniform +-) and scale (uniform 1 +-).
POSITION_JITTER = 0.025
SCALE_JITTER = 0.06

RING_INNER = 0.55  # inner radius of a ring, relative to its outer radius
CROSS_ARM = 1.0 / 3.0  # half-width of a cross's arms, relative to the half extent
STAR_INNER = 0.42  # inner radius of a star, relative to its outer radius


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str
    position: str
    #: Centre offset from the grid position, in fractions of the image side.
    offset: tuple[float, float] = (0.0, 0.0)
    #: Multiplier on the size's nominal extent.
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the centre, in fractions of the image side."""
        col, row = POSITIONS[self.position]
        return GRID_CENTRES[col] + self.offset[0], GRID_CENTRES[row] + self.offset[1]

    @property
    def half_extent(self) -> float:
        return HALF_EXTENT[self.size] * self.scale

    @property
    def is_heldout(self) -> bool:
        return is_heldout_pair(self.colour, self.shape)


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    #: Relation of objects[0] to objects[1]; None for one object.
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two objects")
        if self.background not in COLOURS:
            raise ValueError(f"unknown background {self.background!r}")
        if any(o.colour == self.background for o in self.objects):
            raise ValueError("an object has the background's colour")
        if len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"two objects need a relation, got {self.relation!r}")
            if self.objects[0].colour == self.objects[1].colour:
                raise ValueError("the two objects of a scene have different colours")
        elif self.relation is not None:
            raise ValueError("one object has no relation")

    @property
    def has_heldout(self) -> bool:
        return any(o.is_heldout for o in self.objects)

    def canonical(self) -> "SceneSpec":
        """The same scene without jitter."""
        return replace(self, objects=tuple(replace(o, offset=(0.0, 0.0), scale=1.0) for o in self.objects))


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------

def _pairs(exclude_heldout: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOUR_NAMES for s in SHAPES if not (exclude_heldout and is_heldout_pair(c, s))]


_TRAIN_PAIRS = _pairs(True)
_ALL_PAIRS = _pairs(False)


def _two_object_layouts() -> list[tuple[str, str, str]]:
    """(position of first, position of second, relation): same row or same column, two cells apart."""
    out = []
    for row in range(3):
        a, b = _POSITION_AT[(0, row)], _POSITION_AT[(2, row)]
        out += [(a, b, "left of"), (b, a, "right of")]
    for col in range(3):
        a, b = _POSITION_AT[(col, 0)], _POSITION_AT[(col, 2)]
        out += [(a, b, "above"), (b, a, "below")]
    return out


TWO_OBJECT_LAYOUTS: tuple[tuple[str, str, str], ...] = tuple(_two_object_layouts())


def _jitter(rng: np.random.Generator, jitter: bool) -> tuple[tuple[float, float], float]:
    if not jitter:
        return (0.0, 0.0), 1.0
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scale = rng.uniform(1.0 - SCALE_JITTER, 1.0 + SCALE_JITTER)
    return (round(float(dx), 5), round(float(dy), 5)), round(float(scale), 5)


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    two_objects_prob: float = 0.3,
    exclude_heldout: bool = True,
    jitter: bool = True,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> SceneSpec:
    """One random scene.

    `pairs` restricts the first object's (colour, shape); by default it is any
    pair, less `HELDOUT` when `exclude_heldout`. The second object (with
    probability `two_objects_prob`) always draws from the allowed pairs, with
    a colour different from the first's. The background differs from every
    object's colour.
    """
    allowed = _TRAIN_PAIRS if exclude_heldout else _ALL_PAIRS
    first_pairs = list(pairs) if pairs is not None else allowed
    two = rng.random() < two_objects_prob
    c1, s1 = _pick(rng, first_pairs)
    specs = [(c1, s1)]
    if two:
        c2, s2 = _pick(rng, [p for p in allowed if p[0] != c1])
        specs.append((c2, s2))
        pos1, pos2, relation = _pick(rng, TWO_OBJECT_LAYOUTS)
        positions = [pos1, pos2]
    else:
        relation = None
        positions = [_pick(rng, POSITION_NAMES)]
    objects = []
    for (colour, shape), position in zip(specs, positions):
        size = _pick(rng, SIZES)
        offset, scale = _jitter(rng, jitter)
        objects.append(ObjectSpec(shape, colour, size, position, offset, scale))
    used = {c for c, _ in specs}
    background = _pick(rng, [b for b in BACKGROUNDS if b not in used])
    return SceneSpec(tuple(objects), background, relation)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

def _star_polygon() -> np.ndarray:
    """Ten vertices of an upright five-pointed star, scaled and shifted so its bounding box is [-1, 1]^2."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2) * (2.0 / (hi - lo))


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the normalised points (u, v) lie inside `shape`, whose bounding box is [-1, 1]^2."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= RING_INNER**2)
    if shape == "cross":
        box = (au <= 1.0) & (av <= 1.0)
        return box & ((av <= CROSS_ARM) | (au <= CROSS_ARM))
    if shape == "star":
        box = (au <= 1.0) & (av <= 1.0)
        return box & _inside_polygon(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, centre_px: tuple[float, float], half_px: float, size: int | tuple[int, int], supersample: int = 1) -> np.ndarray:
    """Float32 (H, W) coverage in [0, 1] of `shape` centred at `centre_px` (x, y in pixels) with half extent `half_px`."""
    h, w = (size, size) if isinstance(size, int) else size
    ss = max(1, int(supersample))
    sub = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    u = (xs[None, :] - centre_px[0]) / half_px
    v = (ys[:, None] - centre_px[1]) / half_px
    m = shape_mask(shape, np.broadcast_to(u, (len(ys), len(xs))), np.broadcast_to(v, (len(ys), len(xs))))
    m = m.astype(np.float32)
    if ss > 1:
        m = m.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return m


def render(scene: SceneSpec, size: int = 64, *, supersample: int = 1) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image. `supersample` > 1 gives mild antialiasing (off by default)."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = COLOURS[scene.background]
    for obj in scene.objects:
        cx, cy = obj.centre
        cov = coverage(obj.shape, (cx * size, cy * size), obj.half_extent * size, size, supersample)[..., None]
        img = img * (1.0 - cov) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the top left", "at the top left"),
    "top right": ("in the top right corner", "in the top right", "at the top right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right"),
    "top": ("at the top", "at the top centre"),
    "bottom": ("at the bottom", "at the bottom centre"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "centre": ("in the centre", "in the middle"),
}
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# Single-object templates: (template, mentioned attributes). Fields: {z} size,
# {c} colour, {s} shape, {p} position phrase, {q} short position, {b} background.
_ONE = (
    ("{a_c} {s} on {a_b} background", {"colour", "shape", "background"}),
    ("{a_z} {c} {s} {p}", {"colour", "shape", "size", "position"}),
    ("{c} {s}, {q}, {b} background", {"colour", "shape", "position", "background"}),
    ("{a_z} {c} {s} {p} on {a_b} background", {"colour", "shape", "size", "position", "background"}),
    ("{a_c} {s} {p}, {b} background", {"colour", "shape", "position", "background"}),
    ("{b} background with {a_z} {c} {s} {p}", {"colour", "shape", "size", "position", "background"}),
    ("{z} {c} {s}, {q}, on {b}", {"colour", "shape", "size", "position", "background"}),
    ("{a_z} {c} {s} on {b}", {"colour", "shape", "size", "background"}),
    ("{a_c} {s}", {"colour", "shape"}),
    ("{c} {s} on {b}", {"colour", "shape", "background"}),
    ("a picture of {a_z} {c} {s} {p} on {b}", {"colour", "shape", "size", "position", "background"}),
)
_ONE_FULL = "{a_z} {c} {s} {p} on {a_b} background"

# Two-object templates; {r} the relation phrase; 1/2 the first/second object.
_TWO = (
    ("{a_c1} {s1} {r} {a_c2} {s2} on {b}", {"colour", "shape", "relation", "background"}),
    ("{a_z1} {c1} {s1} {r} {a_z2} {c2} {s2}, {b} background", {"colour", "shape", "size", "relation", "background"}),
    ("{a_c1} {s1} {p1} and {a_c2} {s2} {p2} on {a_b} background",
     {"colour", "shape", "position", "relation", "background"}),
    ("{a_z1} {c1} {s1} {p1} and {a_z2} {c2} {s2} {p2} on {a_b} background",
     {"colour", "shape", "size", "position", "relation", "background"}),
    ("{c1} {s1} {r} {c2} {s2}, {b} background", {"colour", "shape", "relation", "background"}),
    ("{a_c1} {s1} {r} {a_c2} {s2}", {"colour", "shape", "relation"}),
    ("{b} background, {a_z1} {c1} {s1} {r} {a_z2} {c2} {s2}", {"colour", "shape", "size", "relation", "background"}),
)
_TWO_FULL = "{a_z1} {c1} {s1} {p1} and {a_z2} {c2} {s2} {p2} on {a_b} background"


def _fields(scene: SceneSpec, rng: np.random.Generator | None, colourless: bool = False) -> dict[str, str]:
    def choose(options: Sequence[str]) -> str:
        return options[0] if rng is None else _pick(rng, options)

    f = {"b": scene.background, "a_b": _a(scene.background)}
    for i, o in enumerate(scene.objects):
        k = "" if len(scene.objects) == 1 else str(i + 1)
        f.update({
            f"c{k}": "" if colourless else o.colour, f"s{k}": o.shape, f"z{k}": o.size,
            f"a_c{k}": _a(o.shape).split()[0] if colourless else _a(o.colour), f"a_z{k}": _a(o.size),
            f"p{k}": choose(_POSITION_PHRASES[o.position]), f"q{k}": o.position,
        })
    if scene.relation is not None:
        f["r"] = choose(_RELATION_PHRASES[scene.relation])
    return f


def caption_and_mentions(scene: SceneSpec, rng: np.random.Generator | None = None, *, full: bool = False,
                         colourless: bool = False) -> tuple[str, frozenset[str]]:
    """A caption and the attributes it mentions. `full` (or no rng) gives the canonical phrasing that
    mentions all; `colourless` leaves out the objects' colours ("a large ring in the centre ...")."""
    two = len(scene.objects) == 2
    if full or rng is None:
        template = _TWO_FULL if two else _ONE_FULL
        mentioned = set(ATTRIBUTES) if two else set(ATTRIBUTES) - {"relation"}
    else:
        template, mentioned = _pick(rng, _TWO if two else _ONE)
    text = template.format(**_fields(scene, None if full else rng, colourless))
    if colourless:
        text, mentioned = " ".join(text.split()), set(mentioned) - {"colour"}
    return text, frozenset(mentioned)


def caption(scene: SceneSpec, rng: np.random.Generator | None = None, *, full: bool = False,
            colourless: bool = False) -> str:
    """A caption of the scene in a phrasing drawn from `rng` (canonical and complete when `full` or no rng;
    without the objects' colours when `colourless`)."""
    return caption_and_mentions(scene, rng, full=full, colourless=colourless)[0]


def caption_words() -> list[str]:
    """Every word any caption can use (sorted), e.g. for building vocabularies."""
    words: set[str] = set()
    texts = [t for t, _ in _ONE + _TWO]
    texts += [p for ps in _POSITION_PHRASES.values() for p in ps]
    texts += [p for ps in _RELATION_PHRASES.values() for p in ps]
    texts += list(COLOURS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + ["a", "an"]
    for t in texts:
        for w in t.replace(",", " ").split():
            if not w.startswith("{"):
                words.add(w)
    return sorted(words)


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------

def iterate_dataset(
    seed: int,
    *,
    size: int = 64,
    two_objects_prob: float = 0.3,
    exclude_heldout: bool = True,
    jitter: bool = True,
    supersample: int = 1,
) -> Iterator[tuple[np.ndarray, str, SceneSpec]]:
    """Unlimited stream of (uint8 image, caption, scene), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    while True:
        scene = sample_scene(rng, two_objects_prob=two_objects_prob, exclude_heldout=exclude_heldout, jitter=jitter)
        text = caption(scene, rng)
        yield render(scene, size, supersample=supersample), text, scene


def batch(seed: int, n: int, **kwargs) -> tuple[np.ndarray, list[str], list[SceneSpec]]:
    """The first `n` samples of `iterate_dataset(seed, **kwargs)`: (uint8 (n, H, W, 3), captions, scenes)."""
    it = iterate_dataset(seed, **kwargs)
    images, captions, scenes = [], [], []
    for _ in range(n):
        img, text, scene = next(it)
        images.append(img)
        captions.append(text)
        scenes.append(scene)
    size = kwargs.get("size", 64)
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return arr, captions, scenes


# --------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    scene: SceneSpec
    #: Attributes the prompt states (the ones an image can be scored on).
    mentioned: frozenset[str] = field(default_factory=lambda: frozenset(ATTRIBUTES))
    #: The phrasing it was written in, when not the canonical one (`OPEN_PHRASINGS`).
    phrasing: str | None = None


#: Seeds of the fixed evaluation lists (distinct from any training seed a caller is likely to use).
EVAL_SEED_HELDOUT = 7_000_001
EVAL_SEED_SEEN = 7_000_002


def heldout_scenes(n: int, seed: int = EVAL_SEED_HELDOUT, *, two_objects_prob: float = 0.0) -> list[SceneSpec]:
    """`n` jitter-free scenes whose first object cycles through the `HELDOUT` pairs (the rest is random)."""
    rng = np.random.default_rng(seed)
    return [
        sample_scene(rng, two_objects_prob=two_objects_prob, exclude_heldout=True, jitter=False,
                     pairs=[HELDOUT[i % len(HELDOUT)]])
        for i in range(n)
    ]


def seen_scenes(n: int, seed: int = EVAL_SEED_SEEN, *, two_objects_prob: float = 0.0) -> list[SceneSpec]:
    """`n` jitter-free scenes drawn like training scenes (no held-out pair)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, two_objects_prob=two_objects_prob, exclude_heldout=True, jitter=False) for _ in range(n)]


def eval_prompts(kind: str = "heldout", n: int = 48, seed: int | None = None, *, two_objects_prob: float = 0.0) -> list[EvalPrompt]:
    """Fixed evaluation prompts with their ground-truth scenes, in the canonical phrasing that states every attribute.

    kind "heldout": the first object is a `HELDOUT` pair (cycling through them);
    kind "seen": scenes like the training ones. Deterministic given (kind, n, seed, two_objects_prob).
    """
    if kind == "heldout":
        scenes = heldout_scenes(n, EVAL_SEED_HELDOUT if seed is None else seed, two_objects_prob=two_objects_prob)
    elif kind == "seen":
        scenes = seen_scenes(n, EVAL_SEED_SEEN if seed is None else seed, two_objects_prob=two_objects_prob)
    else:
        raise ValueError(f"kind must be 'heldout' or 'seen', got {kind!r}")
    out = []
    for s in scenes:
        text, mentioned = caption_and_mentions(s, full=True)
        out.append(EvalPrompt(text, s, mentioned))
    return out


#: Phrasings that leave attributes open, by object count, each with the attributes it states (and the object count,
#: always): what `open_prompts` asks. The two-object ones are not training phrasings; a user's prompt need not be one.
OPEN_PHRASINGS: dict[int, dict[str, frozenset[str]]] = {
    1: {"{a_c} {s}": frozenset({"colour", "shape"}),
        "{a_c} {s} on {a_b} background": frozenset({"colour", "shape", "background"})},
    2: {"{a_c1} {s1} and {a_c2} {s2}": frozenset({"colour", "shape"}),
        "two shapes on {a_b} background": frozenset({"background"})},
}
EVAL_SEED_OPEN = 7_000_003


def open_prompts(n_per_phrasing: int = 8, seed: int | None = None) -> list[EvalPrompt]:
    """Prompts in the `OPEN_PHRASINGS` (seen colour x shape pairs), `n_per_phrasing` each, with the scene they were
    written from: only its `mentioned` attributes (and the object count) are asked for, the rest is free."""
    rng = np.random.default_rng(EVAL_SEED_OPEN if seed is None else seed)
    out = []
    for count, phrasings in OPEN_PHRASINGS.items():
        for template, mentioned in phrasings.items():
            for _ in range(n_per_phrasing):
                scene = sample_scene(rng, two_objects_prob=float(count == 2), exclude_heldout=True, jitter=False)
                out.append(EvalPrompt(template.format(**_fields(scene, None)), scene, mentioned, template))
    return out


def phrasing_label(template: str) -> str:
    """A phrasing with its fields as words: "a [colour] [shape] on a [colour] background"."""
    words = {"a_c": "a [colour]", "s": "[shape]", "a_b": "a [colour]"}
    return template.format(**words, **{f"{k}{i}": v for k, v in words.items() for i in (1, 2)})


__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLOURS", "COLOUR_NAMES", "EvalPrompt", "GRID_CENTRES", "HALF_EXTENT", "HELDOUT",
    "ObjectSpec", "POSITIONS", "POSITION_NAMES", "RELATIONS", "SHAPES", "SIZES", "SceneSpec", "TWO_OBJECT_LAYOUTS",
    "batch", "caption", "caption_and_mentions", "caption_words", "coverage", "eval_prompts", "heldout_scenes", "is_heldout_pair",
    "iterate_dataset", "open_prompts", "phrasing_label", "render", "sample_scene", "seen_scenes", "shape_mask",
]
