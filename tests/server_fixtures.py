"""Helpers for the server tests: one pipeline per test process, real servers on free loopback ports.

The embedded default model set is tiny, so the tests use it as it is, with few
sampler rows so that batching, queueing and cancellation all happen quickly. The
SamplerEngine may be driven by one batcher at a time, so at most one server runs
at once (servers are cheap to start once the pipeline is compiled).
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import time
import urllib.request
from typing import Iterator

import numpy as np
from PIL import Image

NUM_SLOTS = 4
CHUNK_STEPS = 8

_running = threading.Lock()


@functools.lru_cache(maxsize=1)
def pipeline():
    from palette.stages.pipeline import Pipeline

    return Pipeline.load(None, num_slots=NUM_SLOTS, chunk_steps=CHUNK_STEPS)


@contextlib.contextmanager
def running_server(**config) -> Iterator["PaletteServer"]:  # noqa: F821
    """A started PaletteServer on a free loopback port (metrics on a free port too); stopped on exit."""
    from palette.server import PaletteServer, ServerConfig

    if not _running.acquire(blocking=False):
        raise RuntimeError("another test server is still running on the shared pipeline")
    try:
        options = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **config}
        server = PaletteServer(pipeline(), ServerConfig(**options)).start()
        try:
            yield server
        finally:
            server.stop(grace=0)
    finally:
        _running.release()


def metrics_text(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(server, name: str, **labels) -> float:
    """The value of one sample from the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def png_bytes(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def slow_steps(server, delay: float = 0.05):
    """Make every sampler step take `delay` seconds longer, so timing-dependent behaviour
    (streaming while sampling, cancelling mid-request, a full queue) is deterministic in tests."""
    engine = server.pipeline.sampler
    real_step = engine.step

    def step(*args, **kwargs):
        time.sleep(delay)
        return real_step(*args, **kwargs)

    engine.step = step
    try:
        yield
    finally:
        del engine.step
