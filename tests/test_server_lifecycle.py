"""Admission and lifecycle: a full queue says when to retry; a drain finishes in-flight work, then stops."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from palette.client import Done, GeneratedImage, PaletteClient, PaletteError, Progress
from server_fixtures import metric, running_server, slow_steps, wait_until


def test_queue_overflow_is_resource_exhausted_with_a_retry_hint():
    with running_server(max_queued_requests=2) as server, PaletteClient(server.address, timeout=60) as client, \
            slow_steps(server, 0.05):
        hog = client.generate("a request with many images", 16, seed=1)  # keeps images waiting for rows
        hog_events = iter(hog)
        assert isinstance(next(hog_events), Progress)
        second = client.generate("a second request", 1, seed=2)
        second_events = iter(second)
        assert isinstance(next(second_events), Progress)
        with pytest.raises(PaletteError) as err:
            client.generate_images("one too many", 1, seed=3)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2" in err.value.details and "retry in about" in err.value.details
        assert err.value.retry_after_s is not None and 0.5 <= err.value.retry_after_s <= 60
        assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate",
                                         code="RESOURCE_EXHAUSTED") == 1)
        assert metric(server, "palette_queue_depth") == 2
        # The queued requests are still served.
        assert isinstance(list(second_events)[-1], Done)
        hog.cancel()
        assert wait_until(lambda: server.batcher.idle(), timeout=5)
        assert len(client.generate_images("room again", 1, seed=4).images) == 1


def test_graceful_drain_finishes_in_flight_work_and_refuses_new():
    with running_server() as server, PaletteClient(server.address, timeout=60) as client, slow_steps(server, 0.02):
        call = client.generate("in flight when the drain starts", 8, seed=1)
        events = iter(call)
        assert isinstance(next(events), Progress)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 30})
        stopper.start()
        assert wait_until(lambda: not server.batcher.accepting, timeout=5)
        with pytest.raises(PaletteError) as err:
            client.generate_images("arrives during the drain", 1, seed=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        rest = list(events)
        assert isinstance(rest[-1], Done)
        assert sum(isinstance(e, GeneratedImage) for e in rest) == 8
        stopper.join(30)
        assert not stopper.is_alive()


def test_drain_grace_period_ends_leftover_work():
    with running_server() as server, PaletteClient(server.address, timeout=60) as client, slow_steps(server, 0.05):
        call = client.generate("too long for the grace period", 16, seed=1)
        events = iter(call)
        assert isinstance(next(events), Progress)
        started = time.monotonic()
        server.stop(grace=0.3)
        assert time.monotonic() - started < 10
        with pytest.raises(PaletteError) as err:
            list(events)
        assert err.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert server.batcher.idle()
