"""Trainers for Palette's own model set: VQGAN, then DalleBart on its codes, then CLIP.

Each trainer is an optax optimiser around a jit-compiled step, driven by one
loop (`run_loop`) that gives every model the same guarantees:

* deterministic given a seed: batch `i` is drawn from `numpy.random.default_rng((seed, i))`,
  so a run that stops and resumes sees exactly the batches an uninterrupted run sees;
* resumable: params, optimiser state and step go to `<run_dir>/checkpoint.msgpack`
  every `checkpoint_every` steps (atomically) and are picked up on the next start;
* a tqdm bar with loss and throughput, and metrics appended as JSON lines to
  `<run_dir>/metrics.jsonl`;
* stops after `steps` steps or `minutes` of wall time, whichever comes first (with a time
  limit, the learning-rate schedule is fitted, and re-fitted as the speed drifts, to the number
  of steps the measured speed allows).

The results are written in the released formats (`save_pretrained`) into the
model-set folder laid out by `model_set`: `vqgan/`, `dallebart/`, `clip/`, `pipeline.toml`.
`train_default(out_dir, minutes, seed)` runs all three within one time budget.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from palette.stages.models import clip as clip_model
from palette.stages.models import dallebart as DB
from palette.stages.models import vqgan as vqgan_model
from palette.stages.models.clip import CLIP, CLIPConfig
from palette.stages.models.vqgan import VQGAN, VQGANConfig

from . import analyse as A
from . import model_set as M
from . import patch_codes as PC
from . import shapes as S

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.msgpack"
REFIT_EVERY = 100  # steps between re-fits of a time-limited schedule
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "done.json"


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopConfig:
    """How long and how fast one model trains."""

    steps: int = 1000  # upper bound on optimiser steps
    minutes: float | None = None  # wall-time limit (None: steps only)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    final_lr_fraction: float = 0.1  # cosine decay from lr to lr * this at the last step
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True


def learning_rate(step: int, total: int, cfg: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction * lr` at step `total`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, total - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(cfg: LoopConfig) -> optax.GradientTransformation:
    """Clipped Adam without the learning rate: the step scales the updates by -lr (given per step)."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.scale_by_adam(b1=0.9, b2=0.99))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """jit((params, opt_state, lr, *batch) -> (params, opt_state, metrics)) for `loss_fn(params, *batch) -> (loss, aux)`."""

    def step(params, opt_state, lr, *batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
        return params, opt_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

    return jax.jit(step)


def batch_rng(seed: int, step: int, salt: int = 0) -> np.random.Generator:
    """The generator batch `step` of a run is drawn from: a pure function of (seed, salt, step)."""
    return np.random.default_rng((int(seed), int(salt), int(step)))


@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: int = 0
    total_steps: int = 0  # schedule length (fitted once to the time limit, then kept across resumes)
    last_metrics: dict = dataclasses.field(default_factory=dict)


def save_checkpoint(run_dir: str | Path, state: TrainState) -> Path:
    """params + optimiser state + step, atomically, to `<run_dir>/checkpoint.msgpack`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize({
        "params": serialization.to_state_dict(jax.device_get(state.params)),
        "opt_state": serialization.to_state_dict(jax.device_get(state.opt_state)),
        "step": int(state.step),
        "total_steps": int(state.total_steps),
    })
    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path, template: TrainState) -> TrainState | None:
    """The run's checkpoint restored into the structure of `template`, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    raw = serialization.msgpack_restore(path.read_bytes())
    params = serialization.from_state_dict(template.params, raw["params"])
    opt_state = serialization.from_state_dict(template.opt_state, raw["opt_state"])
    to_dev = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    return TrainState(to_dev(params), to_dev(opt_state), int(raw["step"]), int(raw["total_steps"]))


def run_loop(
    name: str,
    run_dir: str | Path,
    params: Any,
    loss_fn: Callable,
    make_batch: Callable[[int], tuple],
    cfg: LoopConfig,
    hook: Callable[[TrainState, dict], TrainState] | None = None,
) -> TrainState:
    """Train `params` on `loss_fn(params, *make_batch(step)) -> (loss, aux)`, resuming from `run_dir`.

    `hook(state, metrics)` runs on the host after every step (metrics still on the device) and may
    return a changed state (the VQGAN's dead-code restarts). Returns the final state, which is
    also checkpointed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg)
    state = TrainState(params, optimizer.init(params), 0, cfg.steps)
    resumed = load_checkpoint(run_dir, state)
    if resumed is not None:
        state = resumed
        log.info("%s: resuming at step %d of %d", name, state.step, state.total_steps)
    train_step = make_train_step(loss_fn, optimizer)
    metrics_path = run_dir / METRICS_FILE
    start, start_step = time.monotonic(), state.step
    deadline = None if cfg.minutes is None else start + 60.0 * cfg.minutes
    probe_step = probe_t = None
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=state.total_steps, initial=state.step, desc=name, dynamic_ncols=True, mininterval=2.0)
    window_t, window_n = time.monotonic(), 0
    while state.step < state.total_steps:
        if deadline is not None and time.monotonic() >= deadline:
            log.info("%s: time limit reached at step %d", name, state.step)
            break
        batch = make_batch(state.step)
        lr = learning_rate(state.step, state.total_steps, cfg)
        params, opt_state, metrics = train_step(state.params, state.opt_state, jnp.float32(lr), *batch)
        state = TrainState(params, opt_state, state.step + 1, state.total_steps, state.last_metrics)
        if hook is not None:
            state = hook(state, metrics)
        window_n += 1
        if deadline is not None:
            # Fit the schedule to the steps the measured speed allows: first after a few compiled
            # steps, then every `REFIT_EVERY` steps on the recent speed (the machine is shared, so
            # the speed drifts), so the learning rate has decayed when time runs out.
            done_here = state.step - start_step
            if done_here == 5:
                jax.block_until_ready(state.params)
                probe_step, probe_t = state.step, time.monotonic()
            elif probe_step is not None and state.step - probe_step >= (15 if done_here < REFIT_EVERY else REFIT_EVERY):
                jax.block_until_ready(state.params)
                now = time.monotonic()
                per_step = (now - probe_t) / (state.step - probe_step)
                left = max(0.0, deadline - now)
                total = max(state.step + 1, min(cfg.steps, state.step + int(0.97 * left / per_step)))
                if total != state.total_steps:
                    state.total_steps = total
                    if bar is not None:
                        bar.total = total
                        bar.refresh()
                    log.info("%s: %.2f s/step, schedule fitted to %d steps", name, per_step, total)
                probe_step, probe_t = state.step, now
        if state.step % cfg.log_every == 0 or state.step == state.total_steps:
            host = jax.device_get(metrics)
            last = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
            now = time.monotonic()
            rate = window_n * cfg.batch_size / max(1e-9, now - window_t)
            window_t, window_n = now, 0
            state.last_metrics = last
            record = {"model": name, "step": state.step, "total_steps": state.total_steps, "lr": round(lr, 7),
                      "samples_per_s": round(rate, 2), "elapsed_s": round(now - start, 1),
                      **{k: round(v, 5) for k, v in last.items()}}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", ips=f"{rate:.1f}/s", refresh=False)
        if bar is not None:
            bar.update(1)
        if state.step % cfg.checkpoint_every == 0:
            save_checkpoint(run_dir, state)
    if bar is not None:
        bar.close()
    save_checkpoint(run_dir, state)
    return state


def _mark_done(run_dir: Path, info: dict) -> None:
    (Path(run_dir) / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def is_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Pool:
    """A fixed pool of training samples: images and their scenes (captions are drawn per step)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    scenes: list

    def __len__(self) -> int:
        return len(self.scenes)


def make_pool(seed: int, n: int, size: int = M.IMAGE_SIZE, *, jitter: bool = True,
              two_objects_prob: float = 0.3) -> Pool:
    """The first `n` samples of the seeded stream (held-out colour x shape pairs never appear)."""
    images, _, scenes = S.batch(int(seed), int(n), size=size, jitter=jitter, two_objects_prob=two_objects_prob)
    return Pool(images, scenes)


def sample_captions(scenes, rng: np.random.Generator, full_prob: float = 0.25, colourless=None) -> list[str]:
    """A caption per scene in a random phrasing (the canonical full one with probability `full_prob`;
    without colours where `colourless`, a bool per scene, says so)."""
    colourless = np.zeros(len(scenes), bool) if colourless is None else colourless
    return [S.caption(s, rng, full=bool(rng.random() < full_prob), colourless=bool(c)) for s, c in zip(scenes, colourless)]


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Captions the tokenizers and the word-frequency file are built from.

    Text only: every colour and shape word is in the training captions anyway, so including
    the held-out pairs here leaks no image of them; it only lets BPE merge whole phrases.
    """
    rng = np.random.default_rng((int(seed), 99))
    scenes = [S.sample_scene(rng, exclude_heldout=False) for _ in range(n)]
    return [S.caption(s, rng, full=bool(i % 4 == 0)) for i, s in enumerate(scenes)] + S.caption_words()


def near_object_pixels(images: np.ndarray, radius: int = 2) -> np.ndarray:
    """bool [N, H, W, 1]: object pixels (`patch_codes.object_mask`) and the pixels within `radius`
    of one (a square neighbourhood), with a channel axis, to weigh pixel losses."""
    return A.dilate(PC.object_mask(images), radius)[..., None]


# --------------------------------------------------------------------------- VQGAN


#: Input channels from which a convolution's kernel gradient is taken as one matmul (`matmul_wgrad_conv`).
MATMUL_WGRAD_MIN_CHANNELS = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_wgrad(x, kernel, strides, padding):
    """A plain NHWC/HWIO convolution whose kernel gradient is an im2col matmul.

    The forward pass is `lax.conv_general_dilated` itself. Only the backward pass differs:
    XLA:CPU's own kernel gradient of a 64-channel 3x3 conv runs about 3x slower than the same
    contraction written as [k*k*C_in, N] @ [N, C_out], and that gradient dominates a VQGAN
    training step on the CPU. Same numbers up to float rounding.
    """
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_matmul_wgrad_fwd(x, kernel, strides, padding):
    return _conv_matmul_wgrad(x, kernel, strides, padding), (x, kernel)


def _conv_matmul_wgrad_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    conv_of_x = lambda x_: jax.lax.conv_general_dilated(  # noqa: E731
        x_, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    (dx,) = jax.vjp(conv_of_x, x)[1](g)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    sh, sw = strides
    cols = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    dk = jnp.dot(cols.reshape(-1, kh * kw * cin).T, g.reshape(-1, cout))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


def matmul_wgrad_conv(x, kernel, strides, padding, dimension_numbers):
    """The VQGAN's `conv_op` in training: convolutions of `MATMUL_WGRAD_MIN_CHANNELS` or more input
    channels take their kernel gradient as one matmul (`_conv_matmul_wgrad`), the rest are XLA's own."""
    if kernel.shape[2] >= MATMUL_WGRAD_MIN_CHANNELS:
        return _conv_matmul_wgrad(x, kernel, tuple(strides), tuple(tuple(int(v) for v in p) for p in padding))
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dimension_numbers)


#: Codebook part widths (mask, object colour, background colour): embed_dim is their sum.
PART_DIMS = (16, 4, 4)


def product_codebook(parts: dict, vocabulary: PC.PatchVocabulary):
    """[vocabulary.size, sum(PART_DIMS)]: each code's vector, its mask, colour and background parts side by side.

    The squared distance to such a vector is the sum of the distances of its parts, so the
    nearest code of a latent is the nearest mask part, colour part and background part
    taken together: the released quantizer's plain nearest-code search picks factors one by one.
    """
    mask, colour, background = (jnp.asarray(x) for x in vocabulary.all_factors())
    return jnp.concatenate([jnp.take(parts["mask"], mask, axis=0), jnp.take(parts["colour"], colour, axis=0),
                            jnp.take(parts["background"], background, axis=0)], axis=-1)


def train_vqgan(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    codes: np.ndarray,
    vocabulary: PC.PatchVocabulary,
    loop: LoopConfig,
    config: VQGANConfig | None = None,
    object_weight: float = 4.0,
    object_radius: int = 2,
    code_weight: float = 0.1,
) -> VQGAN:
    """VQGAN on the pool's images, with each patch's code given (`patch_codes`) rather than clustered.

    The codebook is the product of three learned parts -- a vector per mask, per object colour
    and per background colour (`product_codebook`) -- and the decoder learns to paint each
    patch from its code's vector: weighted L1 + L2 reconstruction of the pool's images from their
    codes. Pixels on or within `object_radius` of an object (object pixels are those unlike the
    image's corner pixel) weigh `1 + object_weight`: objects cover a few percent of an image. The
    ring of background around an object weighs as much as the object itself: weighted less, the
    decoder bleeds object colour into it and fills a small star's notches, so a small star reads
    back as large. Since a code's parts are separate inputs, the decoder paints a mask in a
    colour it never saw it in -- a held-out pair.
    The encoder learns to land nearest its patches' codes: per part, cross-entropy over negative
    squared distances to the part's vectors (held fixed for it, so it cannot win by spreading
    them), weighted `code_weight`, plus the usual commitment term. Whole images only: the
    colour of a background patch is that of the nearest object, which a crop may not show.
    Writes `<out_dir>/vqgan` in the released format, the codebook materialised over all codes.
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    config = config or M.vqgan_config(vocabulary.size, sum(PART_DIMS))
    if config.n_embed != vocabulary.size or config.embed_dim != sum(PART_DIMS):
        raise ValueError(f"VQGAN config needs n_embed={vocabulary.size} and embed_dim={sum(PART_DIMS)}")
    vq = VQGAN.init_random(config, loop.seed)
    n = len(pool)
    grid = config.latent_size
    codes = np.asarray(codes, np.int32).reshape(n, grid, grid)
    rng = np.random.default_rng((loop.seed, 5))
    dm, dc, db = PART_DIMS
    colours = PC.colour_table() * 2.0 - 1.0  # colour parts start from the colours themselves
    net = {k: v for k, v in vq.params.items() if k != "quantize"}
    params = {"net": net, "parts": {
        "mask": jnp.asarray(rng.normal(0, 1.0, (vocabulary.num_masks, dm)), jnp.float32),
        "colour": jnp.asarray(np.pad(colours, ((0, 0), (0, dc - 3))), jnp.float32),
        "background": jnp.asarray(np.pad(colours, ((0, 0), (0, db - 3))), jnp.float32)}}

    def make_batch(step: int):
        idx = batch_rng(loop.seed, step, 1).integers(0, n, loop.batch_size)
        imgs = pool.images[idx]
        weights = 1.0 + object_weight * near_object_pixels(imgs, object_radius)
        return jnp.asarray(imgs, jnp.float32) / 255.0, jnp.asarray(codes[idx]), jnp.asarray(weights, jnp.float32)

    def loss_fn(p, images, target, weights):
        table = product_codebook(p["parts"], vocabulary)
        full = {**p["net"], "quantize": {"embedding": {"embedding": table}}}
        z = vqgan_model.encode_latents(full, images, config, matmul_wgrad_conv).astype(jnp.float32)
        e = jnp.take(table, target, axis=0)
        rec = vqgan_model.decode(full, e, config, matmul_wgrad_conv).astype(jnp.float32)
        l1 = jnp.mean(weights * jnp.abs(rec - images))
        l2 = jnp.mean(weights * (rec - images) ** 2)
        code_ce, hits = 0.0, 1.0
        start = 0
        for name, factor, width in zip(("mask", "colour", "background"), vocabulary.factors(target), PART_DIMS):
            zk = z[..., start:start + width]
            start += width
            vecs = jax.lax.stop_gradient(p["parts"][name])
            logits = -jnp.sum((zk[..., None, :] - vecs) ** 2, axis=-1)
            code_ce = code_ce + optax.softmax_cross_entropy_with_integer_labels(logits, factor).mean()
            hits = hits * (jnp.argmax(logits, -1) == factor)
        commitment = jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        psnr = -10.0 * jnp.log10(jnp.mean((jnp.clip(rec, 0, 1) - images) ** 2) + 1e-10)
        loss = l1 + l2 + code_weight * code_ce + 0.25 * commitment
        return loss, {"l1": l1, "l2": l2, "code_ce": code_ce, "code_accuracy": jnp.mean(hits), "psnr": psnr}

    state = run_loop("vqgan", run_dir, params, loss_fn, make_batch, loop)
    table = product_codebook(state.params["parts"], vocabulary)
    vq = VQGAN(config, {**state.params["net"], "quantize": {"embedding": {"embedding": table}}})
    vq.save_pretrained(out_dir / "vqgan")
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return vq


def _map_padded(fn, arr: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches of arr, the last one zero-padded so fn compiles once."""
    out = []
    for i in range(0, len(arr), batch_size):
        chunk = arr[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(out)


def encode_pool(vq: VQGAN, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int32 [N, latent_size**2] VQGAN codes of uint8 images."""
    codes = _map_padded(lambda c: vq.encode(jnp.asarray(c, jnp.float32) / 255.0)[1], images, batch_size)
    return codes.astype(np.int32)


def decode_codes(vq: VQGAN, codes: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] images of VQGAN codes."""
    return _map_padded(lambda c: vq.decode_images(jnp.asarray(c)), codes, batch_size)


# --------------------------------------------------------------------------- DalleBart


def write_dallebart_config(out_dir: str | Path, config: DB.DalleBartConfig) -> None:
    """config.json alone, so the text processor can load the folder before the weights exist."""
    folder = Path(out_dir) / "dallebart"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def grid_position_embeddings(grid: int, d_model: int, std: float, length: int | None = None) -> np.ndarray:
    """[length, d_model] decoder position table whose rows encode (row, column) of the code they predict.

    Decoder position i predicts code i of the raster-ordered grid. Half the features are
    sinusoids of its row, half of its column (a few frequencies each), scaled to the embedding
    std. A randomly initialised table has to discover that position 37 sits below position 21
    one token at a time; with this start, "top left" is a simple function of the features from the first step.
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


def object_token_mask(images: np.ndarray, grid: int) -> np.ndarray:
    """bool [N, grid*grid]: codes whose image patch holds object pixels (pixels unlike the corner)."""
    return PC.patch_pixels(PC.object_mask(images), grid).any(-1)


def code_onsets(codes: np.ndarray) -> np.ndarray:
    """int [N]: per code sequence, the index of the first code unlike its most common code (0 if none)."""
    codes = np.asarray(codes)
    modes = np.asarray([np.bincount(row).argmax() for row in codes])
    return np.argmax(codes != modes[:, None], axis=1).astype(np.int32)


def corrupt_codes(codes: np.ndarray, is_object: np.ndarray, rng: np.random.Generator,
                  share: tuple[float, float] = (0.15, 0.45), specks: tuple[int, int] = (1, 6)) -> np.ndarray:
    """Code grids spoilt the ways a sampled image goes wrong: the CLIP ranker's negative images.

    Per grid, one or more of: holes (a `share` of the object's codes become the background's
    code: a fragmented or eaten-away object), misplaced pieces (a `share` of them become other
    codes of the same object: a blob instead of the shape) and specks (a few background codes
    near the object become object codes: stray pieces, a second object); at least one code
    changes. `is_object` marks the codes whose patch holds object pixels (`object_token_mask`).
    Grids without object codes are returned as they are.
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
            k = max(1, int(round(rng.uniform(*share) * obj.size)))
            picked = rng.choice(obj, min(k, obj.size), replace=False)
            if kinds[0] and kinds[1]:
                holes = rng.random(picked.size) < 0.5
            else:
                holes = np.full(picked.size, bool(kinds[0]))
            codes[i, picked[holes]] = background
            codes[i, picked[~holes]] = source[rng.choice(obj, int((~holes).sum()))]
        if kinds[2]:
            near = A.dilate(is_object[i].reshape(grid, grid), 3).reshape(-1) & ~is_object[i]
            spots = np.flatnonzero(near)
            if spots.size:
                k = min(spots.size, int(rng.integers(specks[0], specks[1] + 1)))
                codes[i, rng.choice(spots, k, replace=False)] = source[rng.choice(obj, k)]
        if np.array_equal(codes[i], source):  # pieces swapped for like pieces: make one hole at least
            codes[i, rng.choice(obj)] = background
    return codes


def drift_colours(codes: np.ndarray, is_object: np.ndarray, vocabulary: PC.PatchVocabulary,
                  rng: np.random.Generator, share: float = 0.25, *, allowed: np.ndarray) -> np.ndarray:
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
    return np.asarray([[not any(S.is_heldout_pair(c, o.shape) for o in s.objects) for c in S.COLOUR_NAMES]
                       for s in scenes])


def factor_params(params: dict, vocabulary: PC.PatchVocabulary, config: DB.DalleBartConfig, seed: int) -> dict:
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


def factored_table(tables, vocabulary: PC.PatchVocabulary) -> jax.Array:
    """[V, D]: row c is the sum of code c's mask, colour and background rows of `tables`."""
    picked = [jnp.asarray(x) for x in vocabulary.all_factors()]
    return sum(jnp.take(t, i, axis=0) for t, i in zip(tables, picked))


def materialise(params: dict, vocabulary: PC.PatchVocabulary, config: DB.DalleBartConfig, head: bool = True) -> dict:
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
    loop: LoopConfig,
    config: DB.DalleBartConfig,
    text_dropout: float = 0.15,
    init_params: Any = None,
    caption_full_prob: float = 0.25,
    grid_positions: bool = True,
    object_weight: float = 0.0,
    onset_weight: float = 0.0,
    first_weight: float = 0.0,
    colourless_prob: float = 0.0,
    vocabulary: PC.PatchVocabulary | None = None,
) -> DB.DalleBart:
    """DalleBart on (caption, VQGAN codes): the dalle-mini recipe.

    The encoder reads the caption (normalised + BPE by the shipped text processor, so training
    sees exactly what serving feeds it), the decoder predicts the image codes from
    [decoder_start] + codes[:-1] with cross-entropy. A `text_dropout` share of the rows get
    the empty prompt instead (the unconditional row super conditioning uses). A
    `caption_full_prob` share of captions is the canonical phrasing that states every
    attribute; the rest are drawn from the shorter phrasings.
    `grid_positions` starts the decoder's position table from `grid_position_embeddings`.
    Codes of patches that hold object pixels weigh `1 + object_weight` in the loss: they are a
    small share of every image and carry its shape and position. The onset -- the first code
    that differs from the image's most common one, where the background first gives way to the
    object -- weighs `1 + onset_weight`: it is the one token that says where the object is;
    unweighted it is a few percent of the loss, and the model learns shapes long before places.
    The first code weighs `1 + first_weight`: every later code can copy the colours of the one
    before it, so the first is where the caption's colours are decided (with product codes,
    even a background code carries the object's colour).
    With a `vocabulary` (product codes, `patch_codes`), the decoder's token embeddings and
    lm_head columns are sums of a mask, a colour and a background vector
    (`factored_table`), and the loss is one cross-entropy per factor: with additive logits
    over the full product of factors the softmax over codes is exactly the product of the
    three factor softmaxes, so this is the same likelihood, and a code no training image used
    (a held-out colour on a seen mask) gets the probability its factors earn. The saved files
    hold the materialised tables: the released layout, sampled as any other DalleBart.
    A `colourless_prob` share of captions leaves the objects' colours out (factored only; the
    colour factor goes unscored on those rows), so the shape's codes are learnt from the shape
    words alone: a colour never seen with a shape should not bend the shape.
    Needs `<out_dir>/dallebart` to hold the tokenizer; writes the weights there. `init_params`
    (run-time layout, e.g. `DalleBart.from_pretrained(...).params`) continues from another run.
    """
    from palette.stages.text import DalleBartTextProcessor

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    write_dallebart_config(out_dir, config)
    processor = DalleBartTextProcessor.from_pretrained(out_dir / "dallebart")
    params = DB.init_params(config, loop.seed) if init_params is None else init_params
    n, b = len(pool), loop.batch_size
    codes = np.asarray(codes, np.int32)
    grid = math.isqrt(codes.shape[1])
    if init_params is None and grid_positions and config.use_absolute_position_embeddings:
        table = grid_position_embeddings(grid, config.d_model, config.init_std, config.image_length)
        params["model"]["decoder"]["embed_positions"]["embedding"] = jnp.asarray(table)
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
        colourless = rng.random(b) < colourless_prob
        ids, mask = tokens(sample_captions([pool.scenes[i] for i in idx], rng, caption_full_prob, colourless))
        drop = rng.random(b) < text_dropout
        ids = np.where(drop[:, None], uncond_ids[None], ids)
        mask = np.where(drop[:, None], uncond_mask[None], mask)
        labels = codes[idx]
        dec_in = np.concatenate([start, labels[:, :-1]], axis=1)
        return (*(jnp.asarray(x, jnp.int32) for x in (ids, mask, dec_in, labels)), jnp.asarray(object_tokens[idx]),
                jnp.asarray(onsets[idx]), jnp.asarray(colourless & ~drop))

    if vocabulary is not None:
        if config.image_vocab_size != vocabulary.size or config.tie_word_embeddings:
            raise ValueError(f"factored codes need image_vocab_size={vocabulary.size} and an untied lm_head")
        if init_params is None:
            params = factor_params(params, vocabulary, config, loop.seed)
    elif colourless_prob:
        raise ValueError("colourless captions need factored codes (a vocabulary)")

    def code_loss(params, ids, mask, dec_in, labels, colourless):
        """(per-token cross-entropy, per-token hit) of the codes given the caption; the colour
        factor is not scored on `colourless` rows (their captions leave the colours out)."""
        if vocabulary is None:
            logits, _ = DB.forward(params, ids, mask, dec_in, config)
            logits = logits.astype(jnp.float32)
            return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                    jnp.argmax(logits, -1) == labels)
        model = materialise(params, vocabulary, config, head=False)
        enc = DB.encode(model, ids, mask, config)
        h = DB.final_norm(model, DB.decoder_states(model, dec_in, enc, mask, config), config).astype(jnp.float32)
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
        weights = 1.0 + object_weight * is_object + onset_weight * at_onset + first_weight * first
        object_acc = jnp.sum(hit * is_object) / jnp.maximum(1, jnp.sum(is_object))
        return jnp.sum(ce * weights) / jnp.sum(weights), {
            "token_accuracy": jnp.mean(hit), "ce": ce.mean(), "object_token_accuracy": object_acc,
            "onset_ce": jnp.sum(ce * at_onset) / labels.shape[0], "first_ce": ce[:, 0].mean()}

    state = run_loop("dallebart", run_dir, params, loss_fn, make_batch, loop)
    final = state.params if vocabulary is None else materialise(state.params, vocabulary, config)
    model = DB.DalleBart(config, final)
    model.save_pretrained(out_dir / "dallebart")
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return model


# --------------------------------------------------------------------------- CLIP


#: A one-object scene's attributes and their values.
SCENE_ATTRIBUTES = {"shape": S.SHAPES, "colour": S.COLOUR_NAMES, "size": S.SIZES, "position": S.POSITION_NAMES,
                    "background": S.BACKGROUNDS}


def scene_attributes(scene: S.SceneSpec) -> dict[str, str]:
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


def train_clip(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    loop: LoopConfig,
    config: CLIPConfig,
    reconstructions: np.ndarray | None = None,
    recon_prob: float = 0.5,
    hard_pair_share: float = 0.5,
    caption_full_prob: float = 0.25,
    grid_positions: bool = True,
    negatives: np.ndarray | None = None,
    negatives_per_batch: int = 0,
    attribute_weight: float = 0.0,
) -> CLIP:
    """CLIP, contrastively on (image, caption) pairs of the pool.

    `reconstructions` (uint8, aligned with the first len(reconstructions) pool samples) are the
    VQGAN's versions of those images: a `recon_prob` share of them in every batch is used
    instead, so the ranker learns on the kind of image it will rank.

    A `hard_pair_share` of every batch is pairs of scenes one attribute apart, both with the
    full caption: in a batch of random scenes, colour and background alone tell the pairs apart,
    and the ranker's job is to tell a right shape or position from a wrong one. The rest are
    random scenes whose captions are the full one with probability `caption_full_prob`.
    `grid_positions` starts the vision position table from 2-D sinusoids of the patch grid.

    `negatives` (uint8, aligned with the first len(negatives) pool samples like
    `reconstructions`) are spoilt versions of those images (`corrupt_codes`): holes, blobs,
    specks. Every batch adds `negatives_per_batch` of them -- those of the batch's own samples
    first -- as images that no caption describes (extra columns of `clip_loss`), so each caption
    must score its clean image above its spoilt one. That is the ranker's real job: the
    candidates it ranks mostly share colour and place, and differ in how cleanly the shape came out.

    `attribute_weight` > 0 adds, at that weight, a cross-entropy of each one-object scene's
    attributes (colour, shape, size, position, background) read from its image embedding and from
    its caption's embedding (the attributes the caption mentions) by one head per attribute (a vector
    per value, scored by cosine) shared by both towers, dropped after training. Every caption names a colour and a shape
    together, so nothing else asks the embeddings to hold "green" and "star" apart -- and a
    held-out pair is exactly a known colour with a known shape never seen together (the README's
    "Attribute heads" has the figures).
    Needs the tokenizer and preprocessor_config.json in `<out_dir>/clip`; writes the weights there.
    """
    from palette.stages.clip_processing import CLIPTextTokenizer, image_processor, pixel_values

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    folder = out_dir / "clip"
    tokenizer = CLIPTextTokenizer.from_pretrained(folder, max_length=config.text_config.max_position_embeddings)
    preprocessor = image_processor(folder, image_size=config.vision_config.image_size)
    clip = CLIP.init_random(config, loop.seed)
    if grid_positions:
        vcfg = config.vision_config
        side = vcfg.image_size // vcfg.patch_hw[0]
        table = grid_position_embeddings(side, vcfg.hidden_size, vcfg.initializer_range * vcfg.initializer_factor)
        emb = clip.params["vision_model"]["embeddings"]["position_embedding"]
        emb["embedding"] = emb["embedding"].at[1:].set(jnp.asarray(table))  # row 0: the class token
    n, b = len(pool), loop.batch_size
    n_recon = 0 if reconstructions is None else len(reconstructions)
    neighbours = one_attribute_neighbours(pool.scenes)
    anchors = np.flatnonzero([len(x) > 0 for x in neighbours])
    n_pairs = min(b // 2, int(b * hard_pair_share) // 2) if len(anchors) else 0
    n_neg = 0 if negatives is None else len(negatives)
    k_neg = int(negatives_per_batch) if n_neg else 0
    labels = scene_attribute_labels(pool.scenes)  # [n, len(ATTRIBUTE_HEADS)], -1: not a one-object scene

    def make_batch(step: int):
        rng = batch_rng(loop.seed, step, 5)
        first = rng.choice(anchors, n_pairs, replace=False) if n_pairs else np.zeros(0, np.int64)
        second = np.asarray([rng.choice(neighbours[i]) for i in first], np.int64)
        rest = rng.choice(n, b - 2 * n_pairs, replace=False)
        idx = np.concatenate([first, second, rest])
        full = np.concatenate([np.ones(2 * n_pairs, bool), rng.random(len(rest)) < caption_full_prob])
        images = pool.images[idx].copy()
        if n_recon:
            swap = (rng.random(b) < recon_prob) & (idx < n_recon)
            images[swap] = reconstructions[idx[swap]]
        said = [S.caption_and_mentions(pool.scenes[i], rng, full=bool(f)) for i, f in zip(idx, full)]
        text = tokenizer([c for c, _ in said], pad_to_max_length=True)
        image_labels = labels[idx]
        text_labels = np.where([[a in m for a in ATTRIBUTE_HEADS] for _, m in said], image_labels, -1)
        if k_neg:
            own = rng.permutation(idx[idx < n_neg])[:k_neg]
            spoilt = np.concatenate([own, rng.integers(0, n_neg, k_neg - len(own))])
            images = np.concatenate([images, negatives[spoilt]])
        return (jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]),
                jnp.asarray(pixel_values(preprocessor, images)), jnp.asarray(image_labels), jnp.asarray(text_labels))

    def loss_fn(params, ids, mask, pixels, image_labels, text_labels):
        weights = params["clip"] if attribute_weight else params
        out = clip_model.forward(weights, ids, mask, pixels, config)
        logits = out["logits_per_text"]  # [b, b + negatives]: the extra columns match no caption
        acc = jnp.mean(jnp.argmax(logits, -1) == jnp.arange(logits.shape[0]))
        loss, metrics = clip_loss(logits), {"batch_accuracy": acc, "logit_scale": weights["logit_scale"]}
        if attribute_weight:
            read = attribute_loss(params["heads"], out["image_embeds"][: len(image_labels)], image_labels)
            read = read + attribute_loss(params["heads"], out["text_embeds"], text_labels)
            loss, metrics["attribute_loss"] = loss + attribute_weight * read, read
        return loss, metrics

    params = clip.params
    if attribute_weight:
        heads_rng = np.random.default_rng((loop.seed, 13))
        params = {"clip": params, "heads": {
            name: jnp.asarray(heads_rng.normal(0, 0.02, (config.projection_dim, len(SCENE_ATTRIBUTES[name]))),
                              jnp.float32)
            for name in ATTRIBUTE_HEADS}}
    state = run_loop("clip", run_dir, params, loss_fn, make_batch, loop)
    clip = CLIP(config, state.params["clip"] if attribute_weight else state.params)
    clip.save_pretrained(folder)
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return clip


# --------------------------------------------------------------------------- the default set

#: Shares of the time budget, in order: VQGAN, DalleBart, CLIP (the rest is data and saving).
#: DalleBart gets the most: it has 256 codes per caption to learn.
BUDGET_SHARES = (0.36, 0.48, 0.12)
#: CLIP's recipe in the default set (`train_clip` keywords, with `clip_images`' paintings): every
#: image a painting, 64 spoilt paintings (`clip_images`: a quarter with a drifting colour) added to
#: each batch of 128 as negatives, and the attribute heads at weight 1.
CLIP_RECIPE = {"recon_prob": 1.0, "negatives_per_batch": 64, "attribute_weight": 1.0}
#: The default set's optimiser settings per phase; `palette train <model>` uses them too.
PHASE_LOOPS = {"vqgan": {"batch_size": 16, "lr": 2e-3, "warmup": 50},
               "dallebart": {"batch_size": 16, "lr": 2e-3, "warmup": 100},
               "clip": {"batch_size": 128, "lr": 1e-3, "warmup": 50}}
#: DalleBart's recipe in the default set (`train_dallebart` keywords).
DALLEBART_RECIPE = {"caption_full_prob": 0.8, "object_weight": 2.0, "onset_weight": 20.0, "first_weight": 5.0,
                    "colourless_prob": 0.25}
#: The default set's pool: jitter-free, a tenth of it two-object scenes.
TWO_OBJECTS_PROB = 0.1


def clip_images(vq: VQGAN, pool: Pool, codes: np.ndarray, seed: int,
                vocabulary: PC.PatchVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """CLIP's images of every pool scene: the VQGAN's paintings of its codes, and of its codes
    spoilt (the ranker's negatives): a quarter with a colour that drifts partway (`drift_colours`),
    the rest by `corrupt_codes`. The ranker ranks paintings, so it learns on paintings only; with
    half the pool shown as drawn and without negatives, it picked an all-correct candidate for fewer
    held-out validation prompts (85.9 / 87.0 % against 89.6 / 87.0 %, seeds 0 / 1)."""
    codes = np.asarray(codes)
    is_object = object_token_mask(pool.images, math.isqrt(codes.shape[1]))
    spoilt = corrupt_codes(codes, is_object, batch_rng(seed, 0, 7))
    drifted = drift_colours(codes, is_object, vocabulary, batch_rng(seed, 0, 8), allowed=allowed_colours(pool.scenes))
    spoilt = np.where((drifted != codes).any(axis=1, keepdims=True), drifted, spoilt)
    return decode_codes(vq, codes), decode_codes(vq, spoilt)


def _minutes_until(t: float) -> float:
    return max(0.1, (t - time.monotonic()) / 60.0)


def train_default(
    out_dir: str | Path,
    time_budget_minutes: float = 56.0,
    seed: int = 0,
    run_dir: str | Path | None = None,
    pool_size: int = 8000,
    two_objects_prob: float = TWO_OBJECTS_PROB,
    max_steps: tuple[int, int, int] = (100_000, 100_000, 100_000),
    progress: bool = True,
    shares: tuple[float, float, float] = BUDGET_SHARES,
) -> dict:
    """Train the whole default set into `out_dir` within about `time_budget_minutes`.

    The pool's patch codes (`patch_codes`: mask x object colour x background colour); the
    VQGAN on them; DalleBart on them, factored (the object's codes and its onset weighted up,
    `DALLEBART_RECIPE`); CLIP on the VQGAN's paintings of the pool's codes, with spoilt ones as
    negatives (`clip_images`) and attribute heads (`CLIP_RECIPE`). Each phase stops at the end of
    its share of the budget (`shares`, cumulative from the start) or at its step cap.

    The pool is jitter-free (every object exactly at its named position and size), so a full
    caption fixes its image and DalleBart learns one target per caption rather than an average
    of nudged ones; `two_objects_prob` of it are two-object scenes.
    Resumable: a finished phase (its run folder holds done.json) is skipped, an unfinished one
    continues from its checkpoint. The set is assembled in `<run_dir>/out` and copied to
    `out_dir` only when complete, so `out_dir` never holds a half-trained mix.
    Returns a summary (also written to `<run_dir>/summary.json`).
    """
    t0 = time.monotonic()
    final_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"train-{final_dir.name}"
    out_dir = run_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = 60.0 * float(time_budget_minutes)
    ends = np.cumsum(shares) * budget + t0
    summary: dict[str, Any] = {"seed": seed, "budget_minutes": time_budget_minutes, "pool_size": pool_size,
                               "max_steps": list(max_steps)}

    bart_vocab, clip_vocab = M.write_tokenizers(out_dir, tokenizer_corpus(seed))
    M.write_clip_preprocessor(out_dir)
    pool = make_pool(seed, pool_size, jitter=False, two_objects_prob=two_objects_prob)
    vocabulary = PC.PatchVocabulary.for_images(M.IMAGE_SIZE, M.GRID)
    codes = PC.patch_codes(pool.images, pool.scenes, vocabulary)
    summary["codes"] = {"masks": vocabulary.num_masks, "codebook": vocabulary.size, "used": int(len(np.unique(codes)))}
    log.info("pool of %d samples ready after %.1f s", len(pool), time.monotonic() - t0)

    def loop(i: int) -> LoopConfig:
        return LoopConfig(steps=max_steps[i], minutes=_minutes_until(ends[i]), seed=seed, progress=progress,
                          **PHASE_LOOPS[("vqgan", "dallebart", "clip")[i]])

    def phase(name: str, run: Path, train: Callable[[], Any]) -> None:
        t = time.monotonic()
        if not is_done(run):
            train()
        summary[name] = {**json.loads((run / DONE_FILE).read_text()), "minutes": round((time.monotonic() - t) / 60, 2)}

    # 1. VQGAN: learns to paint the codes, and to read them off images
    phase("vqgan", run_dir / "vqgan",
          lambda: train_vqgan(out_dir, run_dir / "vqgan", pool, codes, vocabulary, loop(0)))
    vq = VQGAN.from_pretrained(out_dir / "vqgan")

    # 2. DalleBart on the codes
    phase("dallebart", run_dir / "dallebart",
          lambda: train_dallebart(out_dir, run_dir / "dallebart", pool, codes, loop(1),
                                  M.dallebart_config(bart_vocab, vocabulary.size), vocabulary=vocabulary,
                                  **DALLEBART_RECIPE))

    # 3. CLIP, on the VQGAN's paintings of the codes
    def clip_phase():
        recon, negatives = clip_images(vq, pool, codes, seed, vocabulary)
        train_clip(out_dir, run_dir / "clip", pool, loop(2), M.clip_config(clip_vocab), recon,
                   negatives=negatives, **CLIP_RECIPE)

    phase("clip", run_dir / "clip", clip_phase)

    summary["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    description = (f"trained by `palette train default` (seed {seed}, {summary['total_minutes']} min on this machine; "
                   f"VQGAN f4 with {vocabulary.size} product codes {summary['vqgan']['step']} steps, "
                   f"DalleBart {summary['dallebart']['step']} steps, "
                   f"CLIP {summary['clip']['step']} steps)")
    M.write_pipeline_config(out_dir, description)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    publish_model_set(out_dir, final_dir)
    summary["out"] = str(final_dir)
    return summary


MODEL_SET_ENTRIES = ("dallebart", "vqgan", "clip", "pipeline.toml")


def publish_model_set(src: str | Path, dst: str | Path) -> Path:
    """Replace the model-set entries of `dst` by those of `src` (other files in `dst` are kept)."""
    import shutil

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SET_ENTRIES:
        new, target = dst / f".{name}.new", dst / name
        if new.is_dir():
            shutil.rmtree(new)
        if (src / name).is_dir():
            shutil.copytree(src / name, new)
            if target.is_dir():
                shutil.rmtree(target)
        else:
            shutil.copy2(src / name, new)
        os.replace(new, target)
    return dst
