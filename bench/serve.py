#!/usr/bin/env python3
"""Serving benchmark: images/s and time to first image through the gRPC server, beside the in-process pipeline.

For 1, 4 and 16 concurrent clients, each client sends `--requests` Generate
requests of `--images` images one after another over loopback. The baseline is
the same pipeline driven in process, without gRPC, in batches of the size the
server's sampler would see for that load (min(clients * images, num_slots));
"efficiency" is server images/s over in-process images/s at that batch, so 1.0
means serving (gRPC, queueing, per-request streaming, PNG encoding on both
sides) costs nothing beyond the model itself.

    .venv/bin/python bench/serve.py                               # embedded default model set
    .venv/bin/python bench/serve.py --clients 1,4,16 --num-slots 8 --rank
    .venv/bin/python bench/serve.py --config models/x/pipeline.toml --json out.json
    .venv/bin/python bench/serve.py --ray                         # also through Ray Serve, 1 and 2 replicas

With --ray the same load then goes through Ray Serve (a local Ray: its gRPC proxy, the hook, Serve's
router, replicas in their own processes with the same pipeline settings) with 1 and then 2 replicas,
after the plain server has stopped; "ratio" is Ray's images/s over the plain server's at the same
load. On a machine whose cores the replicas share, 2 replicas cannot add throughput: the ratio then
measures what the Ray hop costs, not what scaling out gains.

Figures are printed, never asserted; compare ratios from one run, not seconds across machines.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time

import numpy as np

from palette.client import GeneratedImage, PaletteClient
from palette.server import PaletteServer, ServerConfig
from palette.stages.pipeline import Pipeline, SamplingParams

PROMPT = "a lighthouse on a cliff at sunset"


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def in_process(pipeline: Pipeline, total: int, batch: int, rank: bool) -> tuple[float, float]:
    """(images/s, seconds to the first image) running `total` images in batches of `batch`."""
    engine = pipeline.sampler
    (tokens,) = pipeline.encode_prompt(PROMPT)
    start = time.perf_counter()
    first = None
    done = 0
    while done < total:
        n = min(batch, total - done)
        final: dict[int, np.ndarray] = {}
        for progress in engine.run([tokens] * n, [SamplingParams(seed=done + i + 1) for i in range(n)]):
            final.update({p.slot: p.tokens for p in progress})
        images = pipeline.decode(np.stack([final[s] for s in sorted(final)]))
        if rank:
            pipeline.rank(PROMPT, images)
        for image in images:
            png(image)
        if first is None:
            first = time.perf_counter() - start
        done += n
    return total / (time.perf_counter() - start), first


def through_server(address: str, clients: int, requests: int, images: int, rank: bool) -> tuple[float, list[float]]:
    """(images/s over the whole run, time to first image of every request in seconds)."""
    ttfi: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        try:
            with PaletteClient(address, timeout=600) as client:
                for r in range(requests):
                    sent = time.perf_counter()
                    got = 0
                    for event in client.generate(PROMPT, images, seed=1 + (c * requests + r) * images, rank=rank):
                        if isinstance(event, GeneratedImage):
                            if got == 0:
                                with lock:
                                    ttfi.append(time.perf_counter() - sent)
                            got += 1
        except BaseException as err:  # noqa: BLE001 - reported after the run
            errors.append(err)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return clients * requests * images / elapsed, ttfi


def through_ray(args: argparse.Namespace, counts: list[int], overrides: dict, queue: int) -> dict[int, dict]:
    """{replicas: {clients: (images/s, TTFI list)}} through Ray Serve on a local Ray."""
    import os
    import socket
    import tempfile

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from palette.server.ray_app import APP_NAME, PROXY_LOCATION, ROUTE_PREFIX, SERVICER_FUNCTIONS, build_app

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    port = free_port()
    # Replicas share compiled code (start-up only: nothing timed below compiles).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="palette-bench-jax-"))
    ray.init(address="local", object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    results: dict[int, dict] = {}
    try:
        serve.start(proxy_location=PROXY_LOCATION, http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)))
        for replicas in [int(r) for r in args.ray_replicas.split(",")]:
            t0 = time.perf_counter()
            serve.run(build_app(dict(pipeline=overrides, core=dict(max_queued_requests=queue), replicas=replicas,
                                     log_format="text")), name=APP_NAME, route_prefix=ROUTE_PREFIX)
            print(f"Ray Serve with {replicas} replica(s) ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            address = f"127.0.0.1:{port}"
            with PaletteClient(address) as client:  # warm requests through the whole path, to every replica
                for i in range(2 * replicas):
                    client.generate_images(PROMPT, 1, seed=1 + i)
            results[replicas] = {clients: through_server(address, clients, args.requests, args.images, args.rank)
                                 for clients in counts}
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def print_ray_table(rows: list[dict], ray_results: dict[int, dict]) -> None:
    print("\nThrough Ray Serve (the same load after the plain server stopped; ratio = Ray img/s / plain img/s):")
    header = f"{'clients':>7} | {'plain img/s':>11} {'TTFI p50':>9}"
    for replicas in ray_results:
        header += f" | {f'Ray x{replicas} img/s':>13} {'TTFI p50':>9} {'ratio':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r['clients']:>7} | {r['server_images_per_s']:>11.2f} {r['server_ttfi_p50_s']:>8.3f}s"
        for replicas, by_clients in ray_results.items():
            rate, ttfi = by_clients[r["clients"]]
            r[f"ray{replicas}_images_per_s"], r[f"ray{replicas}_ttfi_p50_s"] = rate, statistics.median(ttfi)
            line += f" | {rate:>13.2f} {statistics.median(ttfi):>8.3f}s {rate / r['server_images_per_s']:>5.2f}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline config (default: the embedded default model set)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent client counts (default %(default)s)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client (default %(default)s)")
    parser.add_argument("--images", type=int, default=1, help="images per request (default %(default)s)")
    parser.add_argument("--num-slots", type=int, help="sampler rows (overrides the config)")
    parser.add_argument("--chunk-steps", type=int, help="tokens per sampler step (overrides the config)")
    parser.add_argument("--rank", action="store_true", help="CLIP-rank too")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--ray", action="store_true", help="also through Ray Serve (needs palette[ray])")
    parser.add_argument("--ray-replicas", default="1,2", help="replica counts for --ray (default %(default)s)")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("num_slots", args.num_slots), ("chunk_steps", args.chunk_steps)) if v}
    pipeline = Pipeline.load(args.config, **overrides)
    queue = max(64, 2 * max(map(int, args.clients.split(","))))
    server = PaletteServer(pipeline, ServerConfig(port=0, metrics_port=None, warmup=False, max_queued_requests=queue))
    t0 = time.perf_counter()
    pipeline.warmup()
    print(f"warm-up (compiling) took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    info = pipeline.info()
    slots = pipeline.sampler.num_slots
    counts = [int(c) for c in args.clients.split(",")]

    # The baseline first: the engine has one driver at a time, and the server's batcher is not running yet.
    baseline = {}
    for clients in counts:
        batch = min(clients * args.images, slots)
        total = clients * args.requests * args.images
        baseline[clients] = (batch, *in_process(pipeline, total, batch, args.rank))

    server.start()
    rows = []
    try:
        with PaletteClient(server.address) as client:  # one warm request through the whole stack
            client.generate_images(PROMPT, 1, seed=1)
        for clients in counts:
            rate, ttfi = through_server(server.address, clients, args.requests, args.images, args.rank)
            batch, base_rate, base_first = baseline[clients]
            rows.append(dict(clients=clients, images=clients * args.requests * args.images, batch=batch,
                             server_images_per_s=rate, server_ttfi_p50_s=statistics.median(ttfi),
                             server_ttfi_max_s=max(ttfi), inproc_images_per_s=base_rate,
                             inproc_first_image_s=base_first, efficiency=rate / base_rate))
    finally:
        server.stop(grace=0)
    ray_results = through_ray(args, counts, overrides, queue) if args.ray else {}

    print(f"\nPalette serving benchmark: devices {', '.join(info['devices'])}; {slots} sampler rows, "
          f"{pipeline.sampler.chunk_steps} tokens/step, {pipeline.limits.image_length} tokens/image, "
          f"{args.requests} request(s) x {args.images} image(s) per client{', ranked' if args.rank else ''}; "
          f"config {info.get('config')}")
    header = (f"{'clients':>7} {'images':>6} {'batch':>5} | {'server img/s':>12} {'TTFI p50':>9} {'TTFI max':>9} | "
              f"{'in-proc img/s':>13} {'first img':>9} | {'efficiency':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['clients']:>7} {r['images']:>6} {r['batch']:>5} | {r['server_images_per_s']:>12.2f} "
              f"{r['server_ttfi_p50_s']:>8.3f}s {r['server_ttfi_max_s']:>8.3f}s | {r['inproc_images_per_s']:>13.2f} "
              f"{r['inproc_first_image_s']:>8.3f}s | {r['efficiency']:>10.2f}")
    if ray_results:
        print_ray_table(rows, ray_results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": info["devices"], "num_slots": slots, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
