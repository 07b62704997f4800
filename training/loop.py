"""The training loop every trainer runs: an optax optimiser around a jit-compiled step.

`run_loop` gives every model the same guarantees:

* deterministic given a seed: batch `i` is drawn from `batch_rng(seed, i, salt)`, so a run that
  stops and resumes sees exactly the batches an uninterrupted run sees;
* resumable: params, optimiser state and step go to `<run_dir>/checkpoint.msgpack` every
  `checkpoint_every` steps (atomically) and are picked up on the next start;
* a tqdm bar with loss and throughput, and metrics appended as JSON lines to
  `<run_dir>/metrics.jsonl`;
* stops after `steps` steps or `minutes` of wall time, whichever comes first (with a time
  limit, the learning-rate schedule is fitted, and re-fitted as the speed drifts, to the number
  of steps the measured speed allows).

A trainer that finishes writes `<run_dir>/done.json` (`mark_done`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.msgpack"
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "done.json"
REFIT_EVERY = 100  # steps between re-fits of a time-limited schedule
FINAL_LR_FRACTION = 0.1  # the cosine decay ends at lr * this
CLIP_NORM = 1.0  # gradients are clipped to this global norm


@dataclasses.dataclass
class LoopConfig:
    """How long and how fast one model trains."""

    steps: int = 1000  # upper bound on optimiser steps
    minutes: float | None = None  # wall-time limit (None: steps only)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True


def learning_rate_schedule(cfg: LoopConfig, total: int) -> optax.Schedule:
    """Linear warm-up to `lr` at step `warmup - 1`, then cosine decay to `FINAL_LR_FRACTION * lr` at step `total`."""
    rise = optax.linear_schedule(cfg.lr / cfg.warmup, cfg.lr, cfg.warmup - 1)
    decay = optax.cosine_decay_schedule(cfg.lr, max(1, total - cfg.warmup), alpha=FINAL_LR_FRACTION)
    return optax.join_schedules([rise, decay], [cfg.warmup])


def learning_rate(step: int, total: int, cfg: LoopConfig) -> float:
    """The schedule at `step`, evaluated on the host in float64 (the step takes it as a float32 argument,
    so a re-fitted schedule needs no new compilation)."""
    with jax.enable_x64(True):
        return float(learning_rate_schedule(cfg, total)(np.float64(step)))


def make_optimizer() -> optax.GradientTransformation:
    """Clipped Adam without the learning rate: the step scales the updates by -lr (given per step)."""
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.scale_by_adam(b1=0.9, b2=0.99))


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
) -> TrainState:
    """Train `params` on `loss_fn(params, *make_batch(step)) -> (loss, aux)`, resuming from `run_dir`.

    Returns the final state, which is also checkpointed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer()
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


def mark_done(run_dir: str | Path, state: TrainState) -> None:
    """Record a finished run: its step count and last metrics, in `<run_dir>/done.json`."""
    info = {"step": state.step, "total_steps": state.total_steps, **state.last_metrics}
    (Path(run_dir) / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def is_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()
