"""The real server on a loopback port, driven by the real client: streaming, ranking, batching, lifecycle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
import time

import grpc
import pytest
from PIL import Image

from palette.client import (AsyncPaletteClient, Done, GeneratedImage, PaletteClient, PaletteError, Preview,
                            Progress, RankDone, Score)
from server_fixtures import (NUM_SLOTS, metric, metrics_text, pipeline, png_bytes, running_server, slow_steps,
                             wait_until)


@pytest.fixture(scope="module")
def server():
    with running_server(max_queued_requests=64, rank_batch=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with PaletteClient(server.address, timeout=60) as c:
        c.wait_ready()
        yield c


# -- Generate: order and content --------------------------------------------------------------------

def test_stream_order_progress_then_images_then_done(server, client):
    n = 2 * NUM_SLOTS  # more images than rows: the first images must arrive while others still sample
    with slow_steps(server, 0.03):
        events = list(client.generate("a red apple on a table", n, seed=11))
    assert isinstance(events[0], Progress) and events[0].tokens_done == 0
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    kinds = [type(e).__name__ for e in events]
    first_image = kinds.index("GeneratedImage")
    assert "Progress" in kinds[:first_image]
    images = [e for e in events if isinstance(e, GeneratedImage)]
    assert sorted(im.index for im in images) == list(range(n))
    # Streaming, not batch-at-the-end: an image arrives before the request's sampling is complete.
    last_full = max(i for i, e in enumerate(events) if isinstance(e, Progress) and e.images_sampled < n)
    assert first_image < last_full, f"images only came after all were sampled: {kinds}"
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.tokens_done for p in progress] == sorted(p.tokens_done for p in progress)
    assert progress[-1].tokens_done == progress[-1].tokens_total == n * pipeline().limits.image_length
    h, w = pipeline().limits.image_size
    for im in images:
        assert im.mime_type == "image/png" and (im.width, im.height) == (w, h)
        assert im.to_pil().size == (w, h)
        assert im.score is None
    assert [im.seed for im in sorted(images, key=lambda m: m.index)] == list(range(11, 11 + n))
    done = events[-1]
    assert done.ranked_indices == () and done.request_id
    assert 0 < done.time_to_first_image_ms <= done.total_ms


def test_rank_orders_images_by_score(client):
    result = client.generate_images("a blue house", 4, seed=5, rank=True)
    scores = {im.index: im.score for im in result.images}
    assert all(s is not None for s in scores.values())
    assert list(result.done.ranked_indices) == sorted(scores, key=lambda i: -scores[i])
    assert [im.index for im in result.ranked] == list(result.done.ranked_indices)
    # Rank on the same bytes scores the same images the same way.
    rank_scores, order = client.rank_scores("a blue house", [im.data for im in result.images])
    assert rank_scores == pytest.approx([scores[i] for i in range(4)], rel=1e-4, abs=1e-5)
    assert result.done.rank_ms > 0


def test_seed_is_reported_and_reproducible(client):
    random_seeded = client.generate_images("a cat", 2)
    seeds = [im.seed for im in random_seeded.images]
    assert seeds[0] > 0 and seeds[1] == seeds[0] % (2**32 - 1) + 1
    again = client.generate_images("a cat", 1, seed=seeds[1])
    assert again.images[0].data == random_seeded.images[1].data
    wrapped = client.generate_images("a cat", 2, seed=2**32 - 1)
    assert [im.seed for im in wrapped.images] == [2**32 - 1, 1]


def test_same_seed_alone_and_in_a_busy_batch_gives_identical_bytes(client):
    options = dict(seed=4242, top_k=20, temperature=0.9)
    alone = client.generate_images("a lighthouse at dusk", 1, **options).images[0]
    others = [("a lighthouse at dusk", dict(seed=1, top_k=5)), ("green fields", dict(seed=77)),
              ("a robot", dict(seed=9, temperature=1.5, condition_scale=3.0))]
    with concurrent.futures.ThreadPoolExecutor(len(others) + 1) as pool:
        busy = [pool.submit(client.generate_images, prompt, 3, **opts) for prompt, opts in others]
        target = pool.submit(client.generate_images, "a lighthouse at dusk", 1, **options)
        results = [f.result() for f in busy]
        inside = target.result().images[0]
    assert all(len(r.images) == 3 for r in results)
    assert inside.seed == alone.seed == 4242
    assert inside.data == alone.data


def test_previews_and_formats(client):
    events = list(client.generate("a sailboat", 1, seed=3, preview_every=16, format="jpeg", quality=80))
    previews = [e for e in events if isinstance(e, Preview)]
    images = [e for e in events if isinstance(e, GeneratedImage)]
    assert previews, "preview_every=16 should stream partial images"
    assert all(p.mime_type == "image/jpeg" and p.tokens_done < pipeline().limits.image_length for p in previews)
    assert images[0].mime_type == "image/jpeg" and images[0].to_pil().format == "JPEG"
    assert events.index(previews[0]) < events.index(images[0])
    webp = client.generate_images("a sailboat", 1, seed=3, format="webp").images[0]
    assert webp.mime_type == "image/webp" and Image.open(io.BytesIO(webp.data)).format == "WEBP"


def test_model_info(client):
    info = client.info()
    limits = pipeline().limits
    assert [s.kind for s in info.stages][:3] == ["text", "sampler", "image_decoder"]
    assert info.has_ranker and info.devices and info.server_version
    assert info.limits.num_slots == NUM_SLOTS and info.limits.image_length == limits.image_length
    assert info.limits.max_images_per_request == limits.max_images_per_request
    assert (info.limits.image_height, info.limits.image_width) == tuple(limits.image_size)
    assert any(s.checkpoint for s in info.stages) and any(s.dtype for s in info.stages)
    # The sampling defaults the embedded set's pipeline.toml chose (not the protocol's 10 and 1).
    settings = pipeline().settings
    assert info.limits.default_condition_scale == pytest.approx(settings["condition_scale"])
    assert info.limits.default_temperature == pytest.approx(settings["temperature"])


def test_unset_sampling_options_take_the_pipeline_defaults(client):
    p = pipeline()
    assert (p.default_condition_scale, p.default_temperature) != (10.0, 1.0)
    unset = client.generate_images("a red circle on a blue background", 1, seed=21).images[0]
    spelt = client.generate_images("a red circle on a blue background", 1, seed=21, temperature=p.default_temperature,
                                   condition_scale=p.default_condition_scale).images[0]
    protocol = client.generate_images("a red circle on a blue background", 1, seed=21, temperature=1.0,
                                      condition_scale=10.0).images[0]
    assert unset.data == spelt.data
    assert unset.data != protocol.data


def test_request_id_round_trips(client):
    call = client.generate("a tree", 1, seed=1, request_id="test-req-42")
    events = list(call)
    assert call.request_id == "test-req-42"
    assert events[-1].request_id == "test-req-42"


# -- Rank -------------------------------------------------------------------------------------------

def test_rank_many_images_streams_scores_then_order(client):
    images = [png_bytes(i) for i in range(40)]
    events = list(client.rank("a colourful pattern", images))
    scores = [e for e in events if isinstance(e, Score)]
    assert isinstance(events[-1], RankDone) and sum(isinstance(e, RankDone) for e in events) == 1
    assert [s.index for s in scores] == list(range(40))
    by_index = {s.index: s.score for s in scores}
    assert list(events[-1].ranked_indices) == sorted(by_index, key=lambda i: (-by_index[i], i))
    expected = pipeline().rank("a colourful pattern", [Image.open(io.BytesIO(b)).convert("RGB") for b in images[:8]])
    assert [by_index[i] for i in range(8)] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_rank_scores_stream_while_client_is_still_sending(client):
    first_score = threading.Event()

    def uploads():
        for i in range(8):  # one full batch (rank_batch = 8) ...
            yield png_bytes(100 + i)
        # ... whose scores must come back before the client sends more.
        assert first_score.wait(30), "no score streamed back while the client was still sending"
        yield png_bytes(200)

    events = []
    for event in client.rank("stripes", uploads()):
        if isinstance(event, Score):
            first_score.set()
        events.append(event)
    assert sum(isinstance(e, Score) for e in events) == 9 and isinstance(events[-1], RankDone)


# -- Concurrency, cancellation, deadlines ------------------------------------------------------------

def test_32_concurrent_generate_streams_all_answered(server, client):
    steps_before = metric(server, "palette_sampler_batch_size_count")
    rows_before = metric(server, "palette_sampler_batch_size_sum")

    def one(i):
        return client.generate_images(f"prompt number {i}", 1 + i % 2, seed=1000 + i)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, result in enumerate(results):
        assert len(result.images) == 1 + i % 2
        assert result.images[0].seed == 1000 + i
    steps = metric(server, "palette_sampler_batch_size_count") - steps_before
    rows = metric(server, "palette_sampler_batch_size_sum") - rows_before
    assert rows / steps > 1.5, "concurrent requests should share sampler steps"


def test_async_client_streams_concurrently(server):
    async def main():
        async with AsyncPaletteClient(server.address, timeout=60) as c:
            async def one(i):
                return [e async for e in c.generate("a boat", 2, seed=50 + i)]
            return await asyncio.gather(*(one(i) for i in range(6))), await c.info()

    results, info = asyncio.run(main())
    for events in results:
        assert isinstance(events[0], Progress) and isinstance(events[-1], Done)
        assert sum(isinstance(e, GeneratedImage) for e in events) == 2
    assert info.limits.num_slots == NUM_SLOTS


def test_cancellation_frees_rows(server, client):
    assert wait_until(lambda: server.batcher.occupied_slots() == 0)
    cancelled_before = metric(server, "palette_requests_total", method="Generate", code="CANCELLED")
    images_before = metric(server, "palette_images_total")
    step = 0.05
    with slow_steps(server, step):
        call = client.generate("a very long job", 16, seed=1)
        events = iter(call)
        assert isinstance(next(events), Progress)
        assert isinstance(next(events), Progress)  # the first step ran: rows are in use
        assert server.batcher.occupied_slots() == NUM_SLOTS
        call.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(PaletteError) as err:
            list(events)
        assert err.value.code == grpc.StatusCode.CANCELLED
        assert wait_until(lambda: server.batcher.occupied_slots() == 0, timeout=5)
        freed_after = time.monotonic() - cancelled_at
    # Rows are freed at the next step boundary: within about one step, not after the request's 16 images.
    assert freed_after < 2 * step + 0.5, freed_after
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate", code="CANCELLED")
                      == cancelled_before + 1)
    assert metric(server, "palette_images_total") - images_before < 16
    # The server goes on serving.
    assert len(client.generate_images("after the cancel", 1, seed=2).images) == 1


def test_deadline_exceeded(server, client):
    with slow_steps(server, 0.02), pytest.raises(PaletteError) as err:
        client.generate_images("too slow for this deadline", 16, seed=3, timeout=0.2)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.batcher.occupied_slots() == 0, timeout=5)
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate",
                                     code="DEADLINE_EXCEEDED") >= 1)
    assert len(client.generate_images("after the deadline", 1, seed=4).images) == 1


# -- Health, reflection, metrics ----------------------------------------------------------------------

def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "palette.v1.Palette"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="palette.v1.Palette"),
        ]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"palette.v1.Palette", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # enough for grpcurl to describe the API


def test_metrics_endpoint(server, client):
    client.generate_images("metrics", 1, seed=1)
    text = metrics_text(server)
    for name in ("palette_requests_total", "palette_queue_depth", "palette_sampler_batch_size_bucket",
                 "palette_tokens_per_second", "palette_time_to_first_image_seconds_bucket",
                 "palette_request_latency_seconds_bucket", "palette_tokens_sampled_total"):
        assert name in text, name
    assert metric(server, "palette_requests_total", method="Generate", code="OK") >= 1
