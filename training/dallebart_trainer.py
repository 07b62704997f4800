"""The DalleBart trainer: captions to the pool's patch codes, one cross-entropy per code factor.

While it trains, the decoder's token embeddings and lm_head columns are sums of a mask, a
colour and a background vector (`factor_params`, `factored_table`); the saved model holds the
materialised tables (`materialise`), the released layout that the sampler runs as any DalleBart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from palette.stages.models import dallebart
from palette.stages.models.dallebart import DalleBart, DalleBartConfig

from . import patch_codes
from .loop import LoopConfig, batch_rng, mark_done, run_loop
from .pool import Pool, code_onsets, object_token_mask, sample_captions

#: Share of rows that read the empty prompt (the unconditional row super conditioning uses).
TEXT_DROPOUT = 0.15
#: Share of captions in the canonical phrasing that states every attribute (the rest: shorter phrasings).
CAPTION_FULL_PROB = 0.8
#: Share of captions without the objects' colours (their colour factor goes unscored).
COLOURLESS_PROB = 0.25
#: Extra loss weight of codes whose patch holds object pixels, of the onset, and of the first code.
OBJECT_WEIGHT = 2.0
ONSET_WEIGHT = 20.0
FIRST_WEIGHT = 5.0


def write_dallebart_config(out_dir: str | Path, config: DalleBartConfig) -> None:
    """config.json alone, so the text processor can load the folder before the weights exist."""
    folder = Path(out_dir) / "dallebart"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def grid_position_embeddings(grid: int, d_model: int, std: float, length: int | None = None) -> np.ndarray:
    """[length, d_model] position table whose rows encode (row, column) of a raster-ordered grid.

    Half the features are sinusoids of the row, half of the column (a few frequencies each),
    scaled to the embedding std, so that "top left" is a simple function of the features from
    the first step. DalleBart's decoder position i predicts code i of the grid; CLIP's vision
    tower starts its patch positions from the same table.
    """
    length = grid * grid if length is None else length
    i = np.arange(length)
    row, col = i // grid, i % grid
    half = d_model // 2
    n_freq = half // 2
    freqs = np.pi / grid * np.geomspace(1.0, grid, n_freq)  # lowest: half a period over the grid

    def features(x):
        angles = (x[:, None] + 0.5) * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([features(row), features(col)], axis=1)
    table = np.pad(table, ((0, 0), (0, d_model - table.shape[1])))
    return (table / table.std() * std).astype(np.float32)


def factor_params(params: dict, vocabulary: patch_codes.PatchVocabulary, config: DalleBartConfig,
                  seed: int) -> dict:
    """DalleBart params with the decoder's token table and lm_head replaced by per-factor tables:
    {"model": ... (no decoder embed_tokens), "factors": {"embed": (mask, colour, background),
    "start": [1, D], "head": (mask, colour, background)}}."""
    rng = np.random.default_rng((seed, 11))
    d, std = config.d_model, config.init_std
    table = lambda n: jnp.asarray(rng.normal(0, std, (n, d)), jnp.float32)  # noqa: E731
    sizes = vocabulary.factor_sizes
    decoder = {k: v for k, v in params["model"]["decoder"].items() if k != "embed_tokens"}
    model = {**params["model"], "decoder": decoder}
    return {"model": model, "factors": {
        "embed": tuple(table(n) / math.sqrt(3.0) for n in sizes), "start": table(1),
        "head": tuple(table(n) for n in sizes)}}


def factored_table(tables, vocabulary: patch_codes.PatchVocabulary) -> jax.Array:
    """[V, D]: row c is the sum of code c's mask, colour and background rows of `tables`."""
    picked = [jnp.asarray(x) for x in vocabulary.all_factors()]
    return sum(jnp.take(t, i, axis=0) for t, i in zip(tables, picked))


def materialise(params: dict, vocabulary: patch_codes.PatchVocabulary, head: bool = True) -> dict:
    """Released-layout DalleBart params from `factor_params`-style ones (`head=False` skips lm_head,
    which training does not need: it scores the factors' heads directly). The extra id (decoder
    start) has its own embedding and a zero lm_head column: it is never a target."""
    factors = params["factors"]
    embed = jnp.concatenate([factored_table(factors["embed"], vocabulary), factors["start"]], axis=0)
    decoder = {**params["model"]["decoder"], "embed_tokens": {"embedding": embed}}
    out = {"model": {**params["model"], "decoder": decoder}}
    if head:
        kernel = jnp.concatenate([factored_table(factors["head"], vocabulary), jnp.zeros_like(factors["start"])], axis=0)
        out["lm_head"] = {"kernel": kernel.T}
    return out


def train_dallebart(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    codes: np.ndarray,
    vocabulary: patch_codes.PatchVocabulary,
    loop: LoopConfig,
    config: DalleBartConfig,
) -> DalleBart:
    """DalleBart on (caption, patch codes), factored: the dalle-mini recipe with one softmax per code factor.

    The encoder reads the caption (normalised + BPE by the shipped text processor, so training
    sees exactly what serving feeds it), the decoder predicts the image codes from
    [decoder_start] + codes[:-1]. A `TEXT_DROPOUT` share of the rows get the empty prompt
    instead; a `CAPTION_FULL_PROB` share of captions is the canonical phrasing that states every
    attribute, the rest are drawn from the shorter phrasings; a `COLOURLESS_PROB` share leaves the
    objects' colours out and their colour factor unscored, so the shape's codes are learnt from
    the shape words alone. The decoder's position table starts as `grid_position_embeddings`.
    Codes of patches that hold object pixels weigh `1 + OBJECT_WEIGHT` in the loss: they are a
    small share of every image and carry its shape and position. The onset -- the first code
    that differs from the image's most common one, where the background first gives way to the
    object -- weighs `1 + ONSET_WEIGHT`: it is the one token that says where the object is. The
    first code weighs `1 + FIRST_WEIGHT`: every later code can copy the colours of the one before
    it, so the first is where the caption's colours are decided (with product codes, even a
    background code carries the object's colour).
    The token embeddings and lm_head columns are sums of a mask, a colour and a background vector
    (`factored_table`), and the loss is one cross-entropy per factor: with additive logits over
    the full product of factors the softmax over codes is exactly the product of the three factor
    softmaxes, so this is the same likelihood, and a code no training image used (a held-out
    colour on a seen mask) gets the probability its factors earn.
    Needs `<out_dir>/dallebart` to hold the tokenizer; writes the weights there.
    """
    from palette.stages.text import DalleBartTextProcessor

    if config.image_vocab_size != vocabulary.size or config.tie_word_embeddings:
        raise ValueError(f"factored codes need image_vocab_size={vocabulary.size} and an untied lm_head")
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    write_dallebart_config(out_dir, config)
    processor = DalleBartTextProcessor.from_pretrained(out_dir / "dallebart")
    params = dallebart.init_params(config, loop.seed)
    n, b = len(pool), loop.batch_size
    codes = np.asarray(codes, np.int32)
    grid = math.isqrt(codes.shape[1])
    if config.use_absolute_position_embeddings:
        table = grid_position_embeddings(grid, config.d_model, config.init_std, config.image_length)
        params["model"]["decoder"]["embed_positions"]["embedding"] = jnp.asarray(table)
    params = factor_params(params, vocabulary, config, loop.seed)
    object_tokens = object_token_mask(pool.images, grid)
    onsets = code_onsets(codes)
    start = np.full((b, 1), config.decoder_start_token_id, np.int32)
    # Normalising + tokenising a caption is pure: cache it (captions repeat a lot).
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def tokens(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = [c for c in dict.fromkeys(captions) if c not in cache]
        if missing:
            enc = processor(missing)
            for i, c in enumerate(missing):
                cache[c] = (enc["input_ids"][i], enc["attention_mask"][i])
        return np.stack([cache[c][0] for c in captions]), np.stack([cache[c][1] for c in captions])

    uncond = processor([""])
    uncond_ids, uncond_mask = uncond["input_ids_uncond"][0], uncond["attention_mask_uncond"][0]

    def make_batch(step: int):
        rng = batch_rng(loop.seed, step, 4)
        idx = rng.integers(0, n, b)
        colourless = rng.random(b) < COLOURLESS_PROB
        ids, mask = tokens(sample_captions([pool.scenes[i] for i in idx], rng, CAPTION_FULL_PROB, colourless))
        drop = rng.random(b) < TEXT_DROPOUT
        ids = np.where(drop[:, None], uncond_ids[None], ids)
        mask = np.where(drop[:, None], uncond_mask[None], mask)
        labels = codes[idx]
        dec_in = np.concatenate([start, labels[:, :-1]], axis=1)
        return (*(jnp.asarray(x, jnp.int32) for x in (ids, mask, dec_in, labels)), jnp.asarray(object_tokens[idx]),
                jnp.asarray(onsets[idx]), jnp.asarray(colourless & ~drop))

    def code_loss(params, ids, mask, dec_in, labels, colourless):
        """(per-token cross-entropy, per-token hit) of the codes given the caption; the colour
        factor is not scored on `colourless` rows (their captions leave the colours out)."""
        model = materialise(params, vocabulary, head=False)
        enc = dallebart.encode(model, ids, mask, config)
        h = dallebart.decoder_states(model, dec_in, enc, mask, config)
        h = dallebart.final_norm(model, h, config).astype(jnp.float32)
        ce, hit = 0.0, True
        scored = (1.0, 1.0 - colourless[:, None], 1.0)  # mask, colour, background
        for head, factor, weight in zip(params["factors"]["head"], vocabulary.factors(labels), scored):
            logits = h @ head.T
            ce = ce + weight * optax.softmax_cross_entropy_with_integer_labels(logits, factor)
            hit = hit & (jnp.argmax(logits, -1) == factor)
        return ce, hit

    def loss_fn(params, ids, mask, dec_in, labels, is_object, onset, colourless):
        ce, hit = code_loss(params, ids, mask, dec_in, labels, colourless)
        at_onset = jnp.arange(labels.shape[1])[None, :] == onset[:, None]
        first = jnp.arange(labels.shape[1])[None, :] == 0
        weights = 1.0 + OBJECT_WEIGHT * is_object + ONSET_WEIGHT * at_onset + FIRST_WEIGHT * first
        object_acc = jnp.sum(hit * is_object) / jnp.maximum(1, jnp.sum(is_object))
        return jnp.sum(ce * weights) / jnp.sum(weights), {
            "token_accuracy": jnp.mean(hit), "ce": ce.mean(), "object_token_accuracy": object_acc,
            "onset_ce": jnp.sum(ce * at_onset) / labels.shape[0], "first_ce": ce[:, 0].mean()}

    state = run_loop("dallebart", run_dir, params, loss_fn, make_batch, loop)
    model = DalleBart(config, materialise(state.params, vocabulary))
    model.save_pretrained(out_dir / "dallebart")
    mark_done(run_dir, state)
    return model
