#!/usr/bin/env python3
"""Sampler benchmark: text -> 256 image tokens, Palette vs min-dalle, measured in one run.

Palette's SamplerEngine (KV cache, cond + uncond rows in one batched forward,
the decode loop compiled once) at the DALL·E Mini size (random weights:
d_model 1024, 12+12 layers, 16 heads, GLU 2730, text length 64, super
conditioning on) and at a tiny size, at 1 and 8 images per call. The peer,
min-dalle 0.4.11, runs in its own virtual environment through
../shared/bench/peers.py in the same invocation (it makes 1, 4 or 9 images per
call), and the table prints the ratios.

    .venv/bin/python bench/sampler.py                       # mini + tiny, 1 and 8 per call, with the peer
    .venv/bin/python bench/sampler.py --sizes tiny --no-peer
    .venv/bin/python bench/sampler.py --steps 64            # time 64 steps per call, extrapolate to 256

On a shared machine, pin both to one core so neither is disturbed, with one thread each:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 .venv/bin/python bench/sampler.py --peer-threads 1 --peer-quiet-wait 0

Figures are printed, never asserted: absolute seconds drift between runs and
machines, ratios measured in one run do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.models.dallebart import DalleBart, DalleBartConfig
from palette.stages.sampler import PromptTokens, SamplerEngine, SamplingParams

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO.parent / "shared" / "bench"

SIZES = {
    "mini": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=2730, decoder_ffn_dim=2730,
                 encoder_vocab_size=50264, image_vocab_size=16384, max_text_length=64, image_length=256),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 encoder_vocab_size=256, image_vocab_size=256, max_text_length=64, image_length=256),
    "mega": dict(d_model=2048, encoder_layers=24, decoder_layers=24, encoder_attention_heads=32,
                 decoder_attention_heads=32, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                 encoder_vocab_size=50272, image_vocab_size=16415, max_text_length=64, image_length=256),
}
PEER_SIZE_NAMES = {"mini": "mini", "tiny": "tiny", "mega": "mega"}


def build(size: str, dtype) -> DalleBart:
    cfg = SIZES[size]
    v = cfg["image_vocab_size"]
    config = DalleBartConfig(**cfg, decoder_start_token_id=v, bos_token_id=v + 1, eos_token_id=v + 1,
                             pad_token_id=v + 1, use_scan=True)
    return DalleBart.init_random(config, seed=0, dtype=dtype)


def prompt(config: DalleBartConfig) -> PromptTokens:
    length = config.max_text_length
    ids = np.ones(length, np.int32)
    ids[:12] = [0, *range(5, 15), 2]
    mask = (ids != 1).astype(np.int32)
    uncond = np.ones(length, np.int32)
    uncond[:2] = [0, 2]
    return PromptTokens(ids, mask, uncond, (uncond != 1).astype(np.int32))


def time_call(engine: SamplerEngine, images: int, steps: int, seed: int) -> dict:
    """Admit `images` prompts, decode `steps` tokens in 32-step chunks; extrapolate to the full length."""
    p = prompt(engine.config)
    slots = engine.free_slots()[:images]
    t0 = time.perf_counter()
    engine.admit(slots, [p] * images, [SamplingParams(seed=seed + i, top_k=256, condition_scale=16.0)
                                         for i in range(images)])
    jax.block_until_ready(engine.state["cross_k"][0])
    t_admit = time.perf_counter() - t0
    segments = []
    done = 0
    while done < steps:
        t = time.perf_counter()
        engine.step(32)
        segments.append(time.perf_counter() - t)
        done += 32
    engine.release(slots)
    per_step = statistics.median(segments) / 32
    full = t_admit + per_step * engine.image_length
    return dict(call_s=full, step_ms=1e3 * per_step, admit_ms=1e3 * t_admit)


def bench_palette(size: str, images: int, steps: int, runs: int, dtype) -> dict:
    t = time.perf_counter()
    model = build(size, dtype)
    engine = SamplerEngine(model, num_slots=images, chunk_steps=32)
    time_call(engine, images, engine.image_length, seed=0)  # compile every context bucket + warm up
    build_s = time.perf_counter() - t
    results = [time_call(engine, images, steps, seed=100 * (r + 1)) for r in range(runs)]
    best = min(results, key=lambda r: r["call_s"])
    med = statistics.median(r["call_s"] for r in results)
    return dict(who="palette", size=size, images=images, dtype=str(jnp.dtype(dtype)),
                s_per_image_min=best["call_s"] / images, s_per_image_median=med / images,
                tokens_per_s=images * engine.image_length / best["call_s"], step_ms=best["step_ms"],
                admit_ms=best["admit_ms"], build_s=build_s)


def run_peer(sizes: list[str], images: list[int], steps: int, runs: int, threads: int,
             quiet_wait: float) -> list[dict]:
    """min-dalle through ../shared/bench/peers.py in its own venv (.bench-venv, made by setup.sh)."""
    venv = REPO / ".bench-venv"
    python = subprocess.run(["bash", str(PEER_DIR / "setup.sh"), str(venv)], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    out = Path(tempfile.mkdtemp()) / "peers.json"
    cmd = [python, str(PEER_DIR / "peers.py"), "--models", ",".join(PEER_SIZE_NAMES[s] for s in sizes),
           "--images", ",".join(str(n) for n in images), "--runs", str(runs), "--steps", str(steps),
           "--detok", "", "--json", str(out), "--quiet-wait", str(quiet_wait), "--threads", str(threads)]
    if quiet_wait == 0:  # pinned to a core of its own: other cores' load is not a disturbance
        cmd += ["--max-extra", "0"]
    print("# peer:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=PEER_DIR, check=True, stdout=sys.stderr)
    return json.loads(out.read_text())["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="mini,tiny")
    ap.add_argument("--images", default="1,8", help="Palette images per call")
    ap.add_argument("--peer-images", default="1,4", help="min-dalle images per call (1, 4 or 9)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per call (multiple of 32)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-threads", type=int, default=2, help="torch threads for min-dalle (match XLA's)")
    ap.add_argument("--peer-quiet-wait", type=float, default=60,
                    help="seconds the peer harness waits for a quiet machine (0 when pinned to its own core)")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"# jax {jax.__version__} on {jax.devices()}, {os.cpu_count()} cpus", flush=True)

    rows = []
    for size in sizes:
        for n in [int(x) for x in args.images.split(",")]:
            row = bench_palette(size, n, args.steps, args.runs, dtype)
            rows.append(row)
            print(f"# palette {size} x{n}: {row['s_per_image_min']:.3f} s/image, {row['step_ms']:.1f} ms/step",
                  flush=True)
    peer = [] if args.no_peer else run_peer(sizes, [int(x) for x in args.peer_images.split(",")], args.steps,
                                            args.runs, args.peer_threads, args.peer_quiet_wait)

    print()
    print("| size | who | images/call | s per image (best / median) | image tokens/s | ms per step | vs min-dalle 1/call | vs min-dalle best batch |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        theirs = {r["images"]: r for r in peer if r.get("model") == PEER_SIZE_NAMES[size]}
        base1 = theirs.get(1, {}).get("s_per_image_min")
        best = min((r["s_per_image_min"] for r in theirs.values()), default=None)
        for r in theirs.values():
            print(f"| {size} | min-dalle | {r['images']} | {r['s_per_image_min']:.3f} / {r['s_per_image_median']:.3f} "
                  f"| {r['tokens_per_s_best']:.1f} | {r['step_ms_min']:.1f} | | |")
        for r in (r for r in rows if r["size"] == size):
            ratio1 = f"{base1 / r['s_per_image_min']:.2f}x" if base1 else "-"
            ratio_best = f"{best / r['s_per_image_min']:.2f}x" if best else "-"
            print(f"| {size} | palette ({r['dtype']}) | {r['images']} | {r['s_per_image_min']:.3f} / "
                  f"{r['s_per_image_median']:.3f} | {r['tokens_per_s']:.1f} | {r['step_ms']:.1f} | {ratio1} | {ratio_best} |")


if __name__ == "__main__":
    main()
