"""The CLIP trainer: contrastive on the VQGAN's paintings of the pool, with spoilt paintings as negatives.

Half of every batch is pairs of scenes one attribute apart; every batch adds spoilt paintings
(`negatives.clip_images`) that no caption describes; and attribute heads, shared by both towers
and dropped when the model is saved, read each one-object scene's attributes back from its
image embedding and from its caption's.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.models import clip
from palette.stages.models.clip import CLIP, CLIPConfig

from . import shapes
from .dallebart_trainer import grid_position_embeddings
from .loop import LoopConfig, batch_rng, mark_done, run_loop
from .pool import Pool

#: Share of every batch made of pairs of scenes one attribute apart (both with the full caption).
HARD_PAIR_SHARE = 0.5
#: Share of the other captions in the canonical full phrasing.
CAPTION_FULL_PROB = 0.25
#: Spoilt paintings added to every batch as images no caption describes.
NEGATIVES_PER_BATCH = 64
#: Weight of the attribute heads' cross-entropy, against the contrastive loss's 1.
ATTRIBUTE_WEIGHT = 1.0


#: A one-object scene's attributes and their values.
SCENE_ATTRIBUTES = {"shape": shapes.SHAPES, "colour": shapes.COLOUR_NAMES, "size": shapes.SIZES,
                    "position": shapes.POSITION_NAMES, "background": shapes.BACKGROUNDS}


def scene_attributes(scene: shapes.SceneSpec) -> dict[str, str]:
    """A one-object scene's value of each SCENE_ATTRIBUTES entry."""
    o = scene.objects[0]
    return {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position,
            "background": scene.background}


def one_attribute_neighbours(scenes) -> list[np.ndarray]:
    """Per scene, the pool indices of single-object scenes that differ from it in exactly one
    of shape, colour, size, position or background (empty for two-object scenes)."""
    def key(scene):
        return tuple(scene_attributes(scene).values())

    domains = tuple(SCENE_ATTRIBUTES.values())
    by_key: dict[tuple, list[int]] = {}
    for i, scene in enumerate(scenes):
        if len(scene.objects) == 1:
            by_key.setdefault(key(scene), []).append(i)
    found: dict[tuple, np.ndarray] = {}
    for k in by_key:
        near = [j for f, domain in enumerate(domains) for v in domain if v != k[f]
                for j in by_key.get(k[:f] + (v,) + k[f + 1:], ())]
        found[k] = np.asarray(near, np.int64)
    empty = np.zeros(0, np.int64)
    return [found[key(s)] if len(s.objects) == 1 else empty for s in scenes]


#: The attributes CLIP's attribute heads read, in the order of their heads.
ATTRIBUTE_HEADS = ("colour", "shape", "size", "position", "background")


#: exp of CLIP's initial logit scale (2.6592, the released checkpoints' value): cosines of unit
#: vectors need it to make confident logits.
ATTRIBUTE_LOGIT_SCALE = 14.3


def scene_attribute_labels(scenes) -> np.ndarray:
    """[n, len(ATTRIBUTE_HEADS)] int32: each one-object scene's value index per attribute; -1 elsewhere."""
    out = np.full((len(scenes), len(ATTRIBUTE_HEADS)), -1, np.int32)
    for i, scene in enumerate(scenes):
        if len(scene.objects) == 1:
            values = scene_attributes(scene)
            out[i] = [SCENE_ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTE_HEADS]
    return out


def attribute_loss(heads: dict, embeds: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over attributes of the mean cross-entropy of `labels` (-1: skipped) read from unit
    `embeds` by the `heads` (one [D, values] matrix per ATTRIBUTE_HEADS entry): cosine to each
    value's column, scaled like CLIP's own logits."""
    total = jnp.float32(0.0)
    for k, name in enumerate(ATTRIBUTE_HEADS):
        w = heads[name] / jnp.linalg.norm(heads[name], axis=0, keepdims=True)
        logits = ATTRIBUTE_LOGIT_SCALE * (embeds.astype(jnp.float32) @ w)
        y = labels[:, k]
        valid = y >= 0
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.maximum(y, 0)[:, None], -1)[:, 0]
        total = total - jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return total


def clip_loss(logits_per_text: jax.Array) -> jax.Array:
    """Mean of the text->image and image->text cross-entropies with the diagonal as targets.

    Logits may be [B, B + K]: the last K columns are then images no text describes (negatives).
    Each text's cross-entropy runs over all B + K images; the image->text term over the B
    described images only, since the K others have no right text.
    """
    logits = logits_per_text.astype(jnp.float32)
    n = logits.shape[0]
    labels = jnp.arange(n)

    def cross_entropy(x: jax.Array) -> jax.Array:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), labels[:, None], axis=-1))

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits[:, :n].T))


def train_clip(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    paintings: np.ndarray,
    negatives: np.ndarray,
    loop: LoopConfig,
    config: CLIPConfig,
) -> CLIP:
    """CLIP, contrastively on (painting, caption) pairs of the pool.

    `paintings` and `negatives` (uint8, aligned with the pool; `negatives.clip_images`) are the
    VQGAN's paintings of the pool's codes and of its codes spoilt: the ranker ranks paintings, so
    it learns on paintings only.

    A `HARD_PAIR_SHARE` of every batch is pairs of scenes one attribute apart, both with the full
    caption: in a batch of random scenes, colour and background alone tell the pairs apart, and
    the ranker's job is to tell a right shape or position from a wrong one. The rest are random
    scenes whose captions are the full one with probability `CAPTION_FULL_PROB`. The vision
    position table starts from 2-D sinusoids of the patch grid (`grid_position_embeddings`).

    Every batch adds `NEGATIVES_PER_BATCH` spoilt paintings -- those of the batch's own samples
    first -- as images that no caption describes (extra columns of `clip_loss`), so each caption
    must score its clean painting above its spoilt one. That is the ranker's real job: the
    candidates it ranks mostly share colour and place, and differ in how cleanly the shape came out.

    At `ATTRIBUTE_WEIGHT`, a cross-entropy of each one-object scene's attributes (colour, shape,
    size, position, background) read from its image embedding and from its caption's embedding
    (the attributes the caption mentions) by one head per attribute (a vector per value, scored
    by cosine) shared by both towers and dropped after training. Every caption names a colour and
    a shape together, so nothing else asks the embeddings to hold "green" and "star" apart -- and
    a held-out pair is exactly a known colour with a known shape never seen together.
    Needs the tokenizer and preprocessor_config.json in `<out_dir>/clip`; writes the weights there.
    """
    from palette.stages.clip_processing import CLIPTextTokenizer, image_processor, pixel_values

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    folder = out_dir / "clip"
    tokenizer = CLIPTextTokenizer.from_pretrained(folder, max_length=config.text_config.max_position_embeddings)
    preprocessor = image_processor(folder, image_size=config.vision_config.image_size)
    params = CLIP.init_random(config, loop.seed).params
    vcfg = config.vision_config
    side = vcfg.image_size // vcfg.patch_hw[0]
    table = grid_position_embeddings(side, vcfg.hidden_size, vcfg.initializer_range * vcfg.initializer_factor)
    emb = params["vision_model"]["embeddings"]["position_embedding"]
    emb["embedding"] = emb["embedding"].at[1:].set(jnp.asarray(table))  # row 0: the class token
    n, b = len(pool), loop.batch_size
    neighbours = one_attribute_neighbours(pool.scenes)
    anchors = np.flatnonzero([len(x) > 0 for x in neighbours])
    n_pairs = min(b // 2, int(b * HARD_PAIR_SHARE) // 2) if len(anchors) else 0
    labels = scene_attribute_labels(pool.scenes)  # [n, len(ATTRIBUTE_HEADS)], -1: not a one-object scene

    def make_batch(step: int):
        rng = batch_rng(loop.seed, step, 5)
        first = rng.choice(anchors, n_pairs, replace=False) if n_pairs else np.zeros(0, np.int64)
        second = np.asarray([rng.choice(neighbours[i]) for i in first], np.int64)
        rest = rng.choice(n, b - 2 * n_pairs, replace=False)
        idx = np.concatenate([first, second, rest])
        full = np.concatenate([np.ones(2 * n_pairs, bool), rng.random(len(rest)) < CAPTION_FULL_PROB])
        rng.random(b)  # unused; drawn so that the stream, and so the trained weights, stay those of the shipped set
        said = [shapes.caption_and_mentions(pool.scenes[i], rng, full=bool(f)) for i, f in zip(idx, full)]
        text = tokenizer([c for c, _ in said], pad_to_max_length=True)
        image_labels = labels[idx]
        text_labels = np.where([[a in m for a in ATTRIBUTE_HEADS] for _, m in said], image_labels, -1)
        own = rng.permutation(idx)[:NEGATIVES_PER_BATCH]
        spoilt = np.concatenate([own, rng.integers(0, n, NEGATIVES_PER_BATCH - len(own))])
        images = np.concatenate([paintings[idx], negatives[spoilt]])
        return (jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]),
                jnp.asarray(pixel_values(preprocessor, images)), jnp.asarray(image_labels), jnp.asarray(text_labels))

    def loss_fn(params, ids, mask, pixels, image_labels, text_labels):
        out = clip.forward(params["clip"], ids, mask, pixels, config)
        logits = out["logits_per_text"]  # [b, b + negatives]: the extra columns match no caption
        acc = jnp.mean(jnp.argmax(logits, -1) == jnp.arange(logits.shape[0]))
        read = attribute_loss(params["heads"], out["image_embeds"][: len(image_labels)], image_labels)
        read = read + attribute_loss(params["heads"], out["text_embeds"], text_labels)
        return clip_loss(logits) + ATTRIBUTE_WEIGHT * read, {
            "batch_accuracy": acc, "logit_scale": params["clip"]["logit_scale"], "attribute_loss": read}

    heads_rng = np.random.default_rng((loop.seed, 13))
    heads = {name: jnp.asarray(heads_rng.normal(0, 0.02, (config.projection_dim, len(SCENE_ATTRIBUTES[name]))),
                               jnp.float32)
             for name in ATTRIBUTE_HEADS}
    state = run_loop("clip", run_dir, {"clip": params, "heads": heads}, loss_fn, make_batch, loop)
    model = CLIP(config, state.params["clip"])
    model.save_pretrained(folder)
    mark_done(run_dir, state)
    return model
