"""Fair sharing between callers: free sampler rows go round-robin over identities, by weight, and
each caller may have its own queue limit."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from palette.client import PaletteClient, PaletteError, Progress
from palette.server.fair_queue import FairQueue
from palette.server.jobs import GenerateJob
from palette.server.validation import GenerateSpec
from server_fixtures import NUM_SLOTS, running_server, slow_steps

TOKENS = "alice:alice-token-0123456789\nbob:bob-token-9876543210\n"


@pytest.fixture()
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


def test_a_flooding_caller_cannot_starve_one_that_asks_once(token_file):
    with running_server(auth_tokens=str(token_file), warmup=False) as server, \
            PaletteClient(server.address, token="alice-token-0123456789", timeout=300) as alice, \
            PaletteClient(server.address, token="bob-token-9876543210", timeout=300) as bob, \
            slow_steps(server, 0.01):
        finished: dict[str, float] = {}
        lock = threading.Lock()

        def run(name: str, client: PaletteClient, seed: int, images: int) -> None:
            client.generate_images(f"a flood of circles {seed}", images, seed=seed)
            with lock:
                finished[name] = time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            flood = [pool.submit(run, f"flood-{i}", alice, 100 + 10 * i, 4) for i in range(24)]
            time.sleep(0.5)
            single = pool.submit(run, "single", bob, 7, 1)
            for future in (*flood, single):
                future.result()
    flood_times = sorted(t for name, t in finished.items() if name.startswith("flood"))
    after_single = sum(t > finished["single"] for t in flood_times)
    assert after_single >= 12, f"the single request finished after {24 - after_single} of 24 flood requests"


def test_each_caller_has_its_own_queue_limit(token_file):
    with running_server(auth_tokens=str(token_file), max_queued_per_caller=2, warmup=False) as server, \
            PaletteClient(server.address, token="alice-token-0123456789", timeout=120) as alice, \
            PaletteClient(server.address, token="bob-token-9876543210", timeout=120) as bob, \
            slow_steps(server, 0.05):
        big = iter(alice.generate("keeps rows busy", 4 * NUM_SLOTS, seed=1))  # most images wait
        assert isinstance(next(big), Progress)
        second = iter(alice.generate("waits", 1, seed=2))
        assert isinstance(next(second), Progress)
        with pytest.raises(PaletteError) as err:
            alice.generate_images("one too many for alice", 1, seed=3)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'alice'" in err.value.details and "limit 2 per caller" in err.value.details
        assert err.value.retry_after_s is not None
        # Another caller is still served while alice is at her limit.
        assert len(bob.generate_images("bob is served", 1, seed=4).images) == 1
        assert alice.info().limits.max_queued_requests_per_caller == 2


def _job(caller: str, images: int, weight: float = 1.0) -> GenerateJob:
    spec = GenerateSpec(prompt="p", prompt_tokens=(None,) * images, params=(None,) * images, rank=False,
                        format=0, quality=0, preview_every=0)
    return GenerateJob(f"{caller}-{images}", caller, weight, spec, image_length=16)


def test_rows_go_round_robin_over_callers_by_weight():
    queue = FairQueue()
    for _ in range(10):
        queue.push(_job("flood", 4))
    queue.push(_job("single", 1))
    first = [job.caller for job, _ in queue.take(2)]
    assert "single" in first, first  # one row each in turn, however many requests the flood queued

    weighted = FairQueue()
    weighted.push(_job("heavy", 40, weight=3.0))
    weighted.push(_job("light", 40, weight=1.0))
    picks = [job.caller for job, _ in weighted.take(40)]
    assert picks.count("heavy") == 30 and picks.count("light") == 10
    assert all("light" in picks[i:i + 4] for i in range(0, 40, 4)), picks  # interleaved, not in blocks


def test_within_a_caller_requests_take_turns_image_by_image():
    queue = FairQueue()
    big, small = _job("alice", 16), _job("alice", 1)
    queue.push(big)
    queue.push(small)
    picks = queue.take(3)
    assert [(job is small, index) for job, index in picks] == [(False, 0), (True, 0), (False, 1)]
    assert len(queue) == 1 and queue.images_waiting() == 14
    # Each round starts again from the oldest request: older requests finish first.
    queue = FairQueue()
    a, b, c = _job("alice", 4), _job("alice", 4), _job("alice", 4)
    for job in (a, b, c):
        queue.push(job)
    assert [job for job, _ in queue.take(2)] == [a, b]
    assert [job for job, _ in queue.take(2)] == [a, b]
