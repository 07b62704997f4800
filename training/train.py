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

from palette.stages import checkpoint as ckpt
from palette.stages.models import dallebart as DB
from palette.stages.models.clip import CLIP, CLIPConfig, clip_loss
from palette.stages.models.vqgan import VQGAN, VQGANConfig, VQModel

from . import analyse as A
from . import model_set as M
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


def sample_captions(scenes, rng: np.random.Generator, full_prob: float = 0.25) -> list[str]:
    """A caption per scene in a random phrasing (the canonical full one with probability `full_prob`)."""
    return [S.caption(s, rng, full=bool(rng.random() < full_prob)) for s in scenes]


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Captions the tokenizers and the word-frequency file are built from.

    Text only: every colour and shape word is in the training captions anyway, so including
    the held-out pairs here leaks no image of them; it only lets BPE merge whole phrases.
    """
    rng = np.random.default_rng((int(seed), 99))
    scenes = [S.sample_scene(rng, exclude_heldout=False) for _ in range(n)]
    return [S.caption(s, rng, full=bool(i % 4 == 0)) for i, s in enumerate(scenes)] + S.caption_words()


def object_pixels(images: np.ndarray) -> np.ndarray:
    """bool [N, H, W, 1]: pixels unlike the image's corner pixel, which the generator always leaves background."""
    return np.any(images != images[:, :1, :1], axis=-1, keepdims=True)


# --------------------------------------------------------------------------- VQGAN


def _set_codebook(params: dict, codebook) -> dict:
    params = dict(params)
    params["quantize"] = {"embedding": {"embedding": jnp.asarray(codebook, jnp.float32)}}
    return params


def train_vqgan(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    loop: LoopConfig,
    config: VQGANConfig | None = None,
    crop: int = 32,
    full_prob: float = 0.25,
    restart_every: int = 50,
    beta: float = 0.25,
    object_weight: float = 4.0,
    init_params: dict | None = None,
    codebook_decay: float | None = 0.9,
) -> VQGAN:
    """VQGAN on the pool's images: L1 + L2 reconstruction + codebook and commitment losses.

    With `codebook_decay` set (the default), the codebook is not a gradient parameter but an
    exponential moving average of the encoder latents each code was picked for (online k-means,
    as in VQ-VAE-2): under Adam a code moves at most about `lr` per step, far slower than the
    encoder's latents drift early on, and most of the first few hundred steps would be spent
    with codes that no longer fit. `None` trains the codebook by its loss instead.

    Most steps see random `crop`-pixel crops (a quarter of a full image's cost; the networks are
    convolutional), a `full_prob` share of steps whole images. The codebook starts from encoder
    outputs, and entries that no latent picked during the last `restart_every` steps move onto
    random latents of the current batch. Object pixels (those that differ from the image's corner
    pixel, which the generator always leaves background) weigh `1 + object_weight` in the
    reconstruction loss: objects cover a few percent of an image, and without the weight the
    codebook spends itself on backgrounds; for the same reason new and restarted codebook entries
    are drawn mostly from latents of patches that hold object pixels. `init_params` starts from
    another run's weights (its codebook is extended with such latents when `config.n_embed` is
    larger). Writes `<out_dir>/vqgan` in the released format.
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    config = config or M.vqgan_config()
    if loop.checkpoint_every % restart_every:
        raise ValueError("checkpoint_every must be a multiple of restart_every (so a resumed run restarts the same codes)")
    vq = VQGAN.init_random(config, loop.seed)
    module = vq.module
    encode_latents = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQModel.encode_latents))
    n, side = pool.images.shape[0], pool.images.shape[1]
    f = config.downsample_factor
    crop = min(max(f, int(crop) // f * f), side)
    last_batch: list = [None, None]

    def make_batch(step: int):
        rng = batch_rng(loop.seed, step, 1)
        idx = rng.integers(0, n, loop.batch_size)
        imgs = pool.images[idx]
        weights = 1.0 + object_weight * object_pixels(imgs)
        if crop < side and rng.random() >= full_prob:
            ys = rng.integers(0, side - crop + 1, loop.batch_size)
            xs = rng.integers(0, side - crop + 1, loop.batch_size)
            imgs = np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(imgs, ys, xs)])
            weights = np.stack([w[y:y + crop, x:x + crop] for w, y, x in zip(weights, ys, xs)])
        last_batch[0] = jnp.asarray(imgs, jnp.float32) / 255.0
        last_batch[1] = weights
        return last_batch[0], jnp.asarray(weights, jnp.float32)

    def pick_latents(params, images, weights, k: int, rng: np.random.Generator) -> np.ndarray:
        """`k` encoder latents of the images, three quarters from patches with object pixels."""
        lat = np.asarray(encode_latents(params, images))
        b, h, w, d = lat.shape
        obj = np.asarray(weights)[..., 0].reshape(b, h, f, w, f).max(axis=(2, 4)).reshape(-1) > 1.0
        lat = lat.reshape(-1, d)
        objects = np.nonzero(obj)[0]
        idx = rng.integers(0, len(lat), k)
        if objects.size:
            idx = np.where(rng.random(k) < 0.75, objects[rng.integers(0, objects.size, k)], idx)
        return (lat[idx] + rng.normal(0, 1e-3, (k, d))).astype(np.float32)

    def full_batch(rng: np.random.Generator, size: int = 64):
        imgs = pool.images[rng.integers(0, n, size)]
        weights = 1.0 + object_weight * object_pixels(imgs)
        return jnp.asarray(imgs, jnp.float32) / 255.0, weights

    ema = codebook_decay is not None

    def loss_fn(params, images, weights):
        rec, aux = module.apply({"params": params}, images, beta, method=VQModel.forward_train)
        l1 = jnp.mean(weights * jnp.abs(rec - images))
        l2 = jnp.mean(weights * (rec - images) ** 2)
        flat = aux["indices"].reshape(-1)
        used = jnp.zeros((config.n_embed,), jnp.int32).at[flat].add(1)
        psnr = -10.0 * jnp.log10(jnp.mean((jnp.clip(rec, 0, 1) - images) ** 2) + 1e-10)
        metrics = {"l1": l1, "l2": l2, "vq": aux["vq_loss"], "psnr": psnr, "usage": used}
        if ema:
            # Only the commitment term: the codebook follows the latents by the hook's average.
            vq_loss = beta * aux["commitment_loss"]
            z = jax.lax.stop_gradient(aux["latents"]).reshape(-1, config.embed_dim)
            metrics["latent_sums"] = jax.ops.segment_sum(z, flat, num_segments=config.n_embed)
        else:
            vq_loss = aux["vq_loss"]
        return l1 + l2 + vq_loss, metrics

    params = vq.params
    if not (run_dir / CHECKPOINT_FILE).is_file():
        # Codebook from encoder outputs: the U(-1/n, 1/n) init sits far from the latents and most
        # entries would never be picked.
        rng = batch_rng(loop.seed, 0, 2)
        if init_params is None:
            params = _set_codebook(params, pick_latents(params, *full_batch(rng), config.n_embed, rng))
        else:
            params = jax.tree_util.tree_map(jnp.asarray, init_params)
            old = np.asarray(params["quantize"]["embedding"]["embedding"])[: config.n_embed]
            extra = config.n_embed - len(old)
            if extra > 0:
                old = np.concatenate([old, pick_latents(params, *full_batch(rng), extra, rng)])
            params = _set_codebook(params, old)
            ckpt.check_tree(VQGAN.param_shapes(config), params, "VQGAN init_params")

    usage = np.zeros((config.n_embed,), np.int64)

    def restart_dead_codes(state: TrainState, metrics: dict) -> TrainState:
        nonlocal usage
        counts = np.asarray(metrics["usage"])
        usage += counts
        if ema:
            codebook = np.array(state.params["quantize"]["embedding"]["embedding"])
            picked = counts > 0
            means = np.asarray(metrics["latent_sums"])[picked] / counts[picked, None]
            codebook[picked] = codebook_decay * codebook[picked] + (1.0 - codebook_decay) * means
            state.params = _set_codebook(state.params, codebook)
        if state.step % restart_every:
            return state
        dead = np.nonzero(usage == 0)[0]
        usage = np.zeros_like(usage)
        if dead.size:
            rng = batch_rng(loop.seed, state.step, 3)
            codebook = np.array(state.params["quantize"]["embedding"]["embedding"])
            codebook[dead] = pick_latents(state.params, last_batch[0], last_batch[1], dead.size, rng)
            state.params = _set_codebook(state.params, codebook)
            state.last_metrics = dict(state.last_metrics, restarted=int(dead.size))
        return state

    state = run_loop("vqgan", run_dir, params, loss_fn, make_batch, loop, restart_dead_codes)
    vq = VQGAN(config, state.params)
    vq.save_pretrained(out_dir / "vqgan")
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return vq


def finetune_vqgan_decoder(
    out_dir: str | Path,
    run_dir: str | Path,
    vq: VQGAN,
    pool: Pool,
    codes: np.ndarray,
    loop: LoopConfig,
    crop_codes: int = 4,
    full_prob: float = 0.5,
    object_weight: float = 4.0,
) -> VQGAN:
    """Train only the decoder side (post_quant_conv + decoder) on fixed codes of the pool.

    The encoder and codebook stay as they are, so every code keeps its meaning; the decoder
    learns to draw these code grids -- the canonical spellings DalleBart is taught, which the
    encoder alone would seldom produce -- as the images they came from. Same loss as
    `train_vqgan` (object-weighted L1 + L2), on whole code grids or `crop_codes`-wide crops of
    them. Writes `<out_dir>/vqgan`.
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    config, module = vq.config, vq.module
    frozen = {k: v for k, v in vq.params.items() if k not in ("decoder", "post_quant_conv")}
    trainable = {k: vq.params[k] for k in ("decoder", "post_quant_conv")}
    n, side = pool.images.shape[0], pool.images.shape[1]
    f, grid = config.downsample_factor, config.latent_size
    codes = np.asarray(codes, np.int32).reshape(n, grid, grid)

    def make_batch(step: int):
        rng = batch_rng(loop.seed, step, 6)
        idx = rng.integers(0, n, loop.batch_size)
        imgs, c = pool.images[idx], codes[idx]
        weights = 1.0 + object_weight * object_pixels(imgs)
        if crop_codes < grid and rng.random() >= full_prob:
            ys = rng.integers(0, grid - crop_codes + 1, loop.batch_size)
            xs = rng.integers(0, grid - crop_codes + 1, loop.batch_size)
            k = crop_codes
            c = np.stack([cc[y:y + k, x:x + k] for cc, y, x in zip(c, ys, xs)])
            imgs = np.stack([im[y * f:(y + k) * f, x * f:(x + k) * f] for im, y, x in zip(imgs, ys, xs)])
            weights = np.stack([w[y * f:(y + k) * f, x * f:(x + k) * f] for w, y, x in zip(weights, ys, xs)])
        return (jnp.asarray(c.reshape(len(c), -1)), jnp.asarray(imgs, jnp.float32) / 255.0,
                jnp.asarray(weights, jnp.float32))

    def loss_fn(params, c, images, weights):
        rec = module.apply({"params": {**frozen, **params}}, c, method=VQModel.decode_code).astype(jnp.float32)
        l1 = jnp.mean(weights * jnp.abs(rec - images))
        l2 = jnp.mean(weights * (rec - images) ** 2)
        psnr = -10.0 * jnp.log10(jnp.mean((jnp.clip(rec, 0, 1) - images) ** 2) + 1e-10)
        return l1 + l2, {"l1": l1, "l2": l2, "psnr": psnr}

    state = run_loop("vqgan-decoder", run_dir, trainable, loss_fn, make_batch, loop)
    vq = VQGAN(config, {**frozen, **state.params})
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


def _patch_pixels(images: np.ndarray, grid: int) -> np.ndarray:
    """[N, grid*grid, f*f, C]: each code's patch of the images, in raster order."""
    n, side = images.shape[:2]
    f = side // grid
    return images.reshape(n, grid, f, grid, f, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, f * f, -1)


def calm_patches(images: np.ndarray, grid: int) -> np.ndarray:
    """bool [N, grid*grid]: patches that are flat in one colour, as are their 8 neighbours
    (outside the image counts as the same colour) -- open background, not the edge of anything."""
    images = np.asarray(images)
    n = images.shape[0]
    patches = _patch_pixels(images, grid)
    first = patches[..., 0, :]
    flat = np.all(patches == first[..., None, :], axis=(-1, -2)).reshape(n, grid, grid)
    key = np.where(flat, (first.astype(np.int64) @ np.asarray([1 << 16, 1 << 8, 1], np.int64)).reshape(n, grid, grid), -1)
    padded = np.pad(key, ((0, 0), (1, 1), (1, 1)), mode="edge")
    calm = flat.copy()
    for dy in range(3):
        for dx in range(3):
            calm &= padded[:, dy:dy + grid, dx:dx + grid] == key
    return calm.reshape(n, grid * grid)


def patch_contents(images: np.ndarray, grid: int) -> np.ndarray:
    """[N, grid*grid] keys (numpy void scalars): each code's patch as its exact pixels, and whether it is calm.

    Calmness is part of the key so that open background and the flat inside of an object (or the
    background right next to it) stay apart even in the same colour: DalleBart reads "am I in the
    object yet?" from them.
    """
    images = np.asarray(images)
    n = images.shape[0]
    patches = _patch_pixels(images, grid).reshape(n * grid * grid, -1)
    calm = calm_patches(images, grid).reshape(-1, 1).astype(images.dtype)  # last byte of the key
    keyed = np.ascontiguousarray(np.concatenate([patches, calm], axis=1))
    return keyed.view(np.dtype((np.void, keyed.shape[1] * keyed.itemsize))).reshape(n, grid * grid)


def content_code_table(images: np.ndarray, codes: np.ndarray) -> dict[bytes, int]:
    """{patch key (`patch_contents`): the code the VQGAN most often gives such a patch} over `images`.

    Other patches never take a code that open background is spelt with (their most used other
    code, if they have one), so the inside of an object never reads as background. Ties go to the
    lower code: the table is deterministic.
    """
    codes = np.asarray(codes, np.int64)
    grid = math.isqrt(codes.shape[1])
    contents, content_of = np.unique(patch_contents(images, grid).ravel(), return_inverse=True)
    content_is_calm = np.asarray([c.tobytes()[-1] for c in contents], bool)  # see patch_contents
    radix = int(codes.max()) + 1
    pairs, counts = np.unique(content_of.astype(np.int64) * radix + codes.ravel(), return_counts=True)
    content, code = np.divmod(pairs, radix)

    def usual(reserved: np.ndarray) -> np.ndarray:
        order = np.lexsort((code, -counts, reserved, content))  # per content: allowed, most used, lowest
        first = np.ones(len(order), bool)
        first[1:] = content[order][1:] != content[order][:-1]
        return order[first]

    plain = usual(np.zeros(len(code), bool))
    open_background = np.unique(code[plain][content_is_calm[content[plain]]])
    best = usual(~content_is_calm[content] & np.isin(code, open_background))
    return {contents[content[i]].tobytes(): int(code[i]) for i in best}


def canonical_codes(images: np.ndarray, codes: np.ndarray, table: dict[bytes, int] | None = None) -> np.ndarray:
    """The codes with every patch replaced by the usual code of its exact pixels (`content_code_table`;
    open background and patches near an object are told apart, see `patch_contents`).

    The VQGAN's encoder sees the whole image (its middle block attends globally) and its codebook
    holds near-copies, so the same patch -- a flat background, or the same piece of a star's
    edge -- is spelt with different codes depending on what else is in the picture: only ~20 %
    of a pool's tokens are their patch's usual code. DalleBart would have to guess which copy
    comes next, noise that swamps the few tokens that carry the object's shape and place. After
    this, a token is a function of its patch alone. The table comes from the training images
    (`table`; by default `images` themselves); a patch it lacks keeps its code. The decoder paints
    the copies nearly alike, and `finetune_vqgan_decoder` on the canonical codes closes the rest.
    """
    images, codes = np.asarray(images), np.asarray(codes)
    table = content_code_table(images, codes) if table is None else table
    contents, content_of = np.unique(patch_contents(images, math.isqrt(codes.shape[1])).ravel(),
                                     return_inverse=True)
    usual = np.asarray([table.get(c.tobytes(), -1) for c in contents], np.int64)[content_of]
    return np.where(usual >= 0, usual, codes.ravel()).reshape(codes.shape).astype(codes.dtype)


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
    n, side = images.shape[:2]
    f = side // grid
    obj = object_pixels(images)[..., 0]
    return obj.reshape(n, grid, f, grid, f).any(axis=(2, 4)).reshape(n, grid * grid)


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
        ids, mask = tokens(sample_captions([pool.scenes[i] for i in idx], rng, caption_full_prob))
        drop = rng.random(b) < text_dropout
        ids = np.where(drop[:, None], uncond_ids[None], ids)
        mask = np.where(drop[:, None], uncond_mask[None], mask)
        labels = codes[idx]
        dec_in = np.concatenate([start, labels[:, :-1]], axis=1)
        return (*(jnp.asarray(x, jnp.int32) for x in (ids, mask, dec_in, labels)), jnp.asarray(object_tokens[idx]), jnp.asarray(onsets[idx]))

    def loss_fn(params, ids, mask, dec_in, labels, is_object, onset):
        logits, _ = DB.forward(params, ids, mask, dec_in, config)
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        hit = jnp.argmax(logits, -1) == labels
        at_onset = jnp.arange(labels.shape[1])[None, :] == onset[:, None]
        weights = 1.0 + object_weight * is_object + onset_weight * at_onset
        object_acc = jnp.sum(hit * is_object) / jnp.maximum(1, jnp.sum(is_object))
        return jnp.sum(ce * weights) / jnp.sum(weights), {
            "token_accuracy": jnp.mean(hit), "ce": ce.mean(), "object_token_accuracy": object_acc,
            "onset_ce": jnp.sum(ce * at_onset) / labels.shape[0]}

    state = run_loop("dallebart", run_dir, params, loss_fn, make_batch, loop)
    model = DB.DalleBart(config, state.params)
    model.save_pretrained(out_dir / "dallebart")
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return model


# --------------------------------------------------------------------------- CLIP


def clip_pixels(preprocessor, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the preprocessor's float32 NCHW pixels.

    When the images already have the preprocessor's output size, resize and crop are
    identities and this is the same arithmetic without PIL (checked by the trainer).
    """
    hw = preprocessor.output_hw
    if hw != images.shape[1:3]:
        from PIL import Image

        return preprocessor([Image.fromarray(im) for im in images])
    out = images.astype(np.float64) * preprocessor.rescale_factor if preprocessor.do_rescale else images
    out = out.astype(np.float32).transpose(0, 3, 1, 2)
    if preprocessor.do_normalize:
        mean = np.asarray(preprocessor.image_mean, np.float32)[None, :, None, None]
        std = np.asarray(preprocessor.image_std, np.float32)[None, :, None, None]
        out = (out - mean) / std
    return out.astype(np.float32)


_SCENE_FIELDS = ("shape", "colour", "size", "position")


def one_attribute_neighbours(scenes) -> list[np.ndarray]:
    """Per scene, the pool indices of single-object scenes that differ from it in exactly one
    of shape, colour, size, position or background (empty for two-object scenes)."""
    def key(scene):
        o = scene.objects[0]
        return (o.shape, o.colour, o.size, o.position, scene.background)

    domains = (S.SHAPES, S.COLOUR_NAMES, S.SIZES, S.POSITION_NAMES, S.BACKGROUNDS)
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
    Needs the tokenizer and preprocessor_config.json in `<out_dir>/clip`; writes the weights there.
    """
    from PIL import Image

    from palette.stages.clip_processing import CLIPImagePreprocessor, CLIPTextTokenizer

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    folder = out_dir / "clip"
    tokenizer = CLIPTextTokenizer.from_pretrained(folder, max_length=config.text_config.max_position_embeddings)
    preprocessor = CLIPImagePreprocessor.from_pretrained(folder, image_size=config.vision_config.image_size)
    probe = pool.images[:2]
    if not np.allclose(clip_pixels(preprocessor, probe), preprocessor([Image.fromarray(im) for im in probe]),
                       atol=1e-5):
        raise AssertionError("clip_pixels disagrees with the CLIP preprocessor")
    clip = CLIP.init_random(config, loop.seed)
    if grid_positions:
        vcfg = config.vision_config
        side = vcfg.image_size // vcfg.patch_hw[0]
        table = grid_position_embeddings(side, vcfg.hidden_size, vcfg.initializer_range * vcfg.initializer_factor)
        emb = clip.params["vision_model"]["embeddings"]["position_embedding"]
        emb["embedding"] = emb["embedding"].at[1:].set(jnp.asarray(table))  # row 0: the class token
    module = clip.module
    n, b = len(pool), loop.batch_size
    n_recon = 0 if reconstructions is None else len(reconstructions)
    neighbours = one_attribute_neighbours(pool.scenes)
    anchors = np.flatnonzero([len(x) > 0 for x in neighbours])
    n_pairs = min(b // 2, int(b * hard_pair_share) // 2) if len(anchors) else 0
    n_neg = 0 if negatives is None else len(negatives)
    k_neg = int(negatives_per_batch) if n_neg else 0

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
        captions = [S.caption(pool.scenes[i], rng, full=bool(f)) for i, f in zip(idx, full)]
        text = tokenizer(captions, pad_to_max_length=True)
        if k_neg:
            own = rng.permutation(idx[idx < n_neg])[:k_neg]
            spoilt = np.concatenate([own, rng.integers(0, n_neg, k_neg - len(own))])
            images = np.concatenate([images, negatives[spoilt]])
        return (jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]),
                jnp.asarray(clip_pixels(preprocessor, images)))

    def loss_fn(params, ids, mask, pixels):
        out = module.apply({"params": params}, ids, mask, pixels)
        logits = out["logits_per_text"]  # [b, b + negatives]: the extra columns match no caption
        acc = jnp.mean(jnp.argmax(logits, -1) == jnp.arange(logits.shape[0]))
        return clip_loss(logits), {"batch_accuracy": acc, "logit_scale": params["logit_scale"]}

    state = run_loop("clip", run_dir, clip.params, loss_fn, make_batch, loop)
    clip = CLIP(config, state.params)
    clip.save_pretrained(folder)
    _mark_done(run_dir, {"step": state.step, "total_steps": state.total_steps, **state.last_metrics})
    return clip


# --------------------------------------------------------------------------- the default set

#: Shares of the time budget, in order: VQGAN, VQGAN decoder fine-tuning (0 skips it), DalleBart,
#: CLIP (the rest is data, encoding and saving). DalleBart gets the most: it has 256 codes per
#: caption to learn and was still improving at the end. The decoder fine-tuning teaches it the
#: canonical spellings of patches (`canonical_codes`), which the encoder alone seldom writes:
#: 8 minutes of it took the analyser's all-correct on decoded canonical codes of the eval
#: prompts from 65 % to 75 % (held-out and seen together).
BUDGET_SHARES = (0.22, 0.14, 0.50, 0.10)
#: Spoilt images (`corrupt_codes`) added to each CLIP batch of 128 as negatives.
CLIP_NEGATIVES = 32


def _minutes_until(t: float) -> float:
    return max(0.1, (t - time.monotonic()) / 60.0)


def train_default(
    out_dir: str | Path,
    time_budget_minutes: float = 56.0,
    seed: int = 0,
    run_dir: str | Path | None = None,
    pool_size: int = 8000,
    two_objects_prob: float = 0.1,
    caption_full_prob: float = 0.8,
    max_steps: tuple[int, int, int, int] = (100_000, 100_000, 100_000, 100_000),
    batch_sizes: tuple[int, int, int, int] = (16, 16, 16, 128),
    progress: bool = True,
    shares: tuple[float, float, float, float] = BUDGET_SHARES,
) -> dict:
    """Train the whole default set into `out_dir` within about `time_budget_minutes`.

    VQGAN; its codes of the pool, each distinct patch spelt with one code (`canonical_codes`);
    the VQGAN decoder fine-tuned on those fixed codes; DalleBart on the codes (the
    object's codes and its onset weighted up); CLIP on pool images and their VQGAN reconstructions. Each phase
    stops at the end of its share of the budget (`shares`, cumulative from the start; a zero
    share skips the phase) or at its step cap.

    The pool is jitter-free (every object exactly at its named position and size), so a full
    caption fixes its image and DalleBart learns one target per caption rather than an average
    of nudged ones; `two_objects_prob` of it are two-object scenes, and `caption_full_prob`
    of DalleBart's captions are the full phrasing (the rest are the shorter ones).
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
    summary: dict[str, Any] = {"seed": seed, "budget_minutes": time_budget_minutes, "pool_size": pool_size}

    bart_vocab, clip_vocab = M.write_tokenizers(out_dir, tokenizer_corpus(seed))
    M.write_clip_preprocessor(out_dir)
    pool = make_pool(seed, pool_size, jitter=False, two_objects_prob=two_objects_prob)
    log.info("pool of %d samples ready after %.1f s", len(pool), time.monotonic() - t0)

    def loop(i: int, **kw) -> LoopConfig:
        base = dict(steps=max_steps[i], minutes=_minutes_until(ends[i]), batch_size=batch_sizes[i], seed=seed,
                    progress=progress)
        base.update(kw)
        return LoopConfig(**base)

    def phase(name: str, run: Path, train: Callable[[], Any], share: float = 1.0) -> None:
        t = time.monotonic()
        if share <= 0:
            summary[name] = {"step": 0, "skipped": True}
            return
        if not is_done(run):
            train()
        summary[name] = {**json.loads((run / DONE_FILE).read_text()), "minutes": round((time.monotonic() - t) / 60, 2)}

    # 1. VQGAN
    phase("vqgan", run_dir / "vqgan",
          lambda: train_vqgan(out_dir, run_dir / "vqgan", pool, loop(0, lr=2e-3, warmup=50), full_prob=0.5))
    vq = VQGAN.from_pretrained(out_dir / "vqgan")

    # 2. its codes of the pool, and the decoder fine-tuned on them (codes unchanged)
    codes_path = run_dir / "codes.npy"
    if codes_path.is_file():
        codes = np.load(codes_path)
    else:
        codes = encode_pool(vq, pool.images)
        np.save(codes_path, codes)
    summary["codes_used"] = int(len(np.unique(codes)))
    # DalleBart learns (and CLIP sees reconstructions of) the codes with each patch spelt one way;
    # the decoder then learns to paint exactly those spellings.
    codes = canonical_codes(pool.images, codes)
    summary["codes_used_canonical"] = int(len(np.unique(codes)))
    phase("vqgan_decoder", run_dir / "vqgan-decoder",
          lambda: finetune_vqgan_decoder(out_dir, run_dir / "vqgan-decoder", vq, pool, codes,
                                         loop(1, lr=5e-4, warmup=20)), shares[1])
    vq = VQGAN.from_pretrained(out_dir / "vqgan")

    # 3. DalleBart on the codes
    phase("dallebart", run_dir / "dallebart",
          lambda: train_dallebart(out_dir, run_dir / "dallebart", pool, codes, loop(2, lr=2e-3, warmup=100),
                                  M.dallebart_config(bart_vocab), caption_full_prob=caption_full_prob,
                                  object_weight=2.0, onset_weight=20.0))

    # 4. CLIP, on originals and VQGAN reconstructions
    def clip_phase():
        shown = codes[: min(len(pool), 4000)]
        recon = decode_codes(vq, shown)
        spoilt = corrupt_codes(shown, object_token_mask(pool.images[: len(shown)], math.isqrt(shown.shape[1])),
                               batch_rng(seed, 0, 7))
        train_clip(out_dir, run_dir / "clip", pool, loop(3, lr=1e-3, warmup=50), M.clip_config(clip_vocab), recon,
                   recon_prob=1.0, negatives=decode_codes(vq, spoilt), negatives_per_batch=CLIP_NEGATIVES)

    phase("clip", run_dir / "clip", clip_phase)

    summary["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    decoder = "" if summary["vqgan_decoder"].get("skipped") else f" + decoder {summary['vqgan_decoder']['step']} steps"
    description = (f"trained by `palette train default` (seed {seed}, {summary['total_minutes']} min on this machine; "
                   f"VQGAN f4 {summary['vqgan']['step']} steps{decoder}, "
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
