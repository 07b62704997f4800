"""`palette serve --ray` end to end: it starts a local Ray, serves the contract through Serve's gRPC ingress
(with a token file), and drains on SIGTERM: in-flight calls finish, then it exits 0 and takes Ray down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from palette.client import Done, GeneratedImage, PaletteClient, PaletteError, Progress
from ray_fixtures import free_port, health_status, jax_cache_env
from server_fixtures import CHUNK_STEPS, NUM_SLOTS

pytest.importorskip("ray.serve", reason="the ray extra (palette[ray]) is not installed")

pytestmark = pytest.mark.ray

PALETTE = str(Path(sys.executable).with_name("palette"))
TOKEN = "carol-token-0123456789"


def test_palette_serve_ray_serves_authenticates_and_drains(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"carol:{TOKEN}\n")
    port = free_port()
    proc = subprocess.Popen(
        [PALETTE, "serve", "--ray", "--insecure", "--port", str(port), "--ray-http-port", str(free_port()),
         "--num-slots", str(NUM_SLOTS), "--chunk-steps", str(CHUNK_STEPS), "--auth-tokens", str(tokens),
         "--grace-s", "30"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path,
        env={**os.environ, **jax_cache_env()})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"serving on \S+:\d+ through Ray Serve", line):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(300):
            pytest.fail("palette serve --ray did not come up:\n" + "".join(lines[-40:]))
        address = f"127.0.0.1:{port}"
        assert health_status(address) == 1  # SERVING
        with PaletteClient(address, timeout=60) as anonymous, pytest.raises(PaletteError) as err:
            anonymous.info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details == "missing token: send metadata 'authorization: Bearer <token>'"
        with PaletteClient(address, timeout=120, token=TOKEN) as client:
            assert client.info().limits.num_slots == NUM_SLOTS
            call = client.generate("a red circle", 2, seed=4)
            result = call.collect()
            assert [im.seed for im in result.images] == [4, 5] and call.request_id
            # SIGTERM while a call streams: it finishes, new calls are refused, then the process exits.
            streaming = iter(client.generate("a long one", 8, seed=9))
            assert isinstance(next(streaming), Progress)
            proc.send_signal(signal.SIGTERM)
            rest = list(streaming)
            assert isinstance(rest[-1], Done) and sum(isinstance(e, GeneratedImage) for e in rest) == 8
        assert proc.wait(120) == 0, "".join(lines[-40:])
        text = "".join(lines)
        assert "draining" in text and '"stopped"' in text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
