"""The client's opt-in resubmission: a Generate that fails UNAVAILABLE before its first image is sent
again (seeds make that safe), so a caller loses nothing while a server or replica comes back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest

from palette.client import AsyncPaletteClient, PaletteClient, PaletteError
from server_fixtures import pipeline, running_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_later(port: int, delay: float, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        with running_server(port=port, warmup=False):
            stop.wait(120)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_resubmission_rides_out_a_server_that_is_not_there_yet():
    pipeline()  # loaded before the clock starts: the server then comes up within a second
    port = free_port()
    with PaletteClient(f"127.0.0.1:{port}", timeout=60) as client, pytest.raises(PaletteError) as err:
        client.generate_images("a red circle", 1, seed=3)  # without resubmission: UNAVAILABLE at once
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    stop = threading.Event()
    thread = serve_later(port, 0.5, stop)
    try:
        with PaletteClient(f"127.0.0.1:{port}", timeout=60, resubmit_unavailable=8) as client:
            result = client.generate_images("a red circle", 2, seed=3)
            assert [im.seed for im in result.images] == [3, 4]
            again = client.generate_images("a red circle", 2, seed=3)
            assert [im.data for im in again.images] == [im.data for im in result.images]

            async def via_asyncio():
                async with AsyncPaletteClient(f"127.0.0.1:{port}", timeout=60, resubmit_unavailable=2) as aclient:
                    return await aclient.generate_images("a red circle", 2, seed=3)

            assert [im.data for im in asyncio.run(via_asyncio()).images] == [im.data for im in result.images]
    finally:
        stop.set()
        thread.join(60)
