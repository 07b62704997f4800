"""Defects an outside reliability probe found, each reproduced here: the in-flight count under a
cancel storm, seed-stable <person> prompts, extreme aspect ratios in Rank, Rank work beside Generate
delivery, undecodable messages, and the smaller ones (metrics of refused Rank calls, how a value is
printed, prompts that normalise to nothing)."""

from __future__ import annotations

import io
import logging
import random
import threading
import time

import grpc
import pytest
from PIL import Image

from palette.client import Done, GeneratedImage, PaletteClient, PaletteError
from palette.v1 import palette_pb2 as pb
from server_fixtures import metric, pipeline, running_server, wait_until


@pytest.fixture(scope="module")
def server():
    with running_server(max_rank_image_pixels=1 << 24) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with PaletteClient(server.address, timeout=120) as c:
        c.wait_ready()
        yield c


def raw_channel(server) -> grpc.Channel:
    return grpc.insecure_channel(server.address)


def generate_stub(channel: grpc.Channel):
    return channel.unary_stream("/palette.v1.Palette/Generate")  # bytes in, bytes out


# -- the in-flight count --------------------------------------------------------------------------

def test_a_cancel_storm_leaves_nothing_in_flight_and_the_drain_ends_with_the_work():
    with running_server(warmup=False) as server:
        rng = random.Random(0)
        request = pb.GenerateRequest(prompt="a storm of cancels", num_images=2, seed=1).SerializeToString()
        with raw_channel(server) as channel:
            stub = generate_stub(channel)
            for i in range(200):
                call = stub(request)
                if rng.random() < 0.5:
                    time.sleep(rng.random() * 0.002)
                call.cancel()
        assert wait_until(lambda: server.core.inflight == 0, timeout=30), f"{server.core.inflight} still in flight"
        assert metric(server, "palette_inflight_requests") == 0
        # Calls cancelled before gRPC handed them to us never started; every one that did is counted.
        counted = sum(metric(server, "palette_requests_total", method="Generate", code=code)
                      for code in ("OK", "CANCELLED"))
        assert counted > 20, f"only {counted} calls reached the server, so the storm tested little"
        started = time.monotonic()
        server.stop(grace=30)
        assert time.monotonic() - started < 5, "the drain waited for calls that were already over"


# -- <person> ---------------------------------------------------------------------------------------

def test_a_person_draw_follows_the_image_seed():
    from palette.stages.text import PERSON_PHRASES

    prompt = "<person> with a red circle on a blue background"
    pipe = pipeline()
    seeds = list(range(1, 25))
    tokens = pipe.encode_prompt(prompt, seeds)
    again = pipe.encode_prompt(prompt, seeds)
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(tokens, again))
    for index in (0, 7, 23):  # an image's tokens do not depend on the other images of its request
        (alone,) = pipe.encode_prompt(prompt, [seeds[index]])
        assert (alone.input_ids == tokens[index].input_ids).all()
    texts = {pipe.text.processor.normalize(prompt, random.Random(seed)) for seed in seeds}
    assert {text.split(" with ")[0].strip() for text in texts} <= set(PERSON_PHRASES)
    assert len({tuple(t.input_ids) for t in tokens}) > 1, "every seed drew the same phrase"
    first, *rest = pipe.encode_prompt("a red circle", [3, 4, 5])  # without <person>: tokenised once
    assert all(t is first for t in rest)


def test_person_prompts_keep_the_seed_contract(client):
    prompt = "<person> with a red circle on a blue background"
    runs = [client.generate_images(prompt, 4, seed=5) for _ in range(3)]
    for run in runs[1:]:
        assert [im.data for im in run.images] == [im.data for im in runs[0].images]
    # Each image again alone, from its reported seed.
    for image in runs[0].images[1:3]:
        alone = client.generate_images(prompt, 1, seed=image.seed).images[0]
        assert alone.data == image.data


# -- extreme aspect ratios ------------------------------------------------------------------------

def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_extreme_aspect_ratios_cost_bounded_work(client):
    strip = Image.new("RGB", (1 << 24, 1), (200, 40, 40))  # 16,777,216 pixels: within the pixel limit
    scores, _ = client.rank_scores("a red circle", [png(strip), png(strip.transpose(Image.Transpose.ROTATE_90))])
    assert len(scores) == 2


def test_a_long_image_is_ranked_by_its_centre(client):
    rng = random.Random(1)
    wide = Image.new("RGB", (1000, 100))
    wide.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(100_000)])
    centre = wide.crop((300, 0, 700, 100))  # max_rank_aspect_ratio 4: the middle 400 x 100
    (wide_score, centre_score), _ = client.rank_scores("a red circle", [png(wide), png(centre)])
    assert wide_score == centre_score
    limits = client.info().limits
    assert limits.max_rank_aspect_ratio == 4 and limits.max_rank_call_bytes > 0


def test_rank_work_does_not_hold_up_generate_images(server, client, monkeypatch):
    release = threading.Event()
    real_rank = server.pipeline.rank

    def slow_rank(prompt, images):
        if prompt == "blocked ranking":
            release.wait(60)
        return real_rank(prompt, images)

    monkeypatch.setattr(server.pipeline, "rank", slow_rank)
    ranking = threading.Thread(target=lambda: client.rank_scores("blocked ranking", [png(Image.new("RGB", (64, 64)))]))
    ranking.start()
    try:
        time.sleep(0.2)
        events = list(client.generate("images while a Rank call is busy", 2, seed=9))
        assert isinstance(events[-1], Done) and sum(isinstance(e, GeneratedImage) for e in events) == 2
        assert ranking.is_alive(), "the Rank call was not held up, so this test proved nothing"
    finally:
        release.set()
        ranking.join(60)


# -- undecodable messages -------------------------------------------------------------------------

def _prompt_field(raw: bytes) -> bytes:
    return b"\x0a" + bytes([len(raw)]) + raw  # field 1 (prompt), length-delimited


@pytest.mark.parametrize("body, what", [
    (_prompt_field(b"a red \xff\xfe circle"), "invalid UTF-8"),
    (pb.GenerateRequest(prompt="a red circle", num_images=2).SerializeToString()[:-1], "truncated"),
    (b"\x0a\x50abc", "length past the end"),
])
def test_undecodable_generate_is_invalid_argument_without_traceback(server, caplog, body, what):
    caplog.set_level(logging.INFO)
    with raw_channel(server) as channel, pytest.raises(grpc.RpcError) as err:
        list(generate_stub(channel)(body, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    assert "could not be decoded" in err.value.details()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_undecodable_rank_message_is_invalid_argument(server, caplog):
    caplog.set_level(logging.INFO)
    before = metric(server, "palette_requests_total", method="Rank", code="INVALID_ARGUMENT")
    with raw_channel(server) as channel:
        rank = channel.stream_stream("/palette.v1.Palette/Rank")
        messages = [pb.RankRequest(prompt="a red circle").SerializeToString(), b"\x12\x09truncated"]
        with pytest.raises(grpc.RpcError) as err:
            list(rank(iter(messages), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info]
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Rank",
                                     code="INVALID_ARGUMENT") == before + 1)


# -- the smaller ones -----------------------------------------------------------------------------

def test_refused_rank_calls_are_counted_under_their_code(server, client):
    before = metric(server, "palette_requests_total", method="Rank", code="INVALID_ARGUMENT")
    with pytest.raises(PaletteError) as err:
        client.rank_scores("a red circle", [b"not an image"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Rank",
                                     code="INVALID_ARGUMENT") == before + 1)
    assert metric(server, "palette_requests_total", method="Rank", code="CANCELLED") == 0


def test_out_of_range_values_are_printed_as_sent(client):
    with pytest.raises(PaletteError) as err:
        client.generate_images("a red circle", 1, top_p=1.0000002)
    assert "top_p must be in (0, 1], got 1.00000024" in err.value.details


@pytest.mark.parametrize("prompt", ["!!! ??? ...", "\u200b\u200b\u200b", "https://example.com/a/picture.png",
                                    "<b></b>"])
def test_a_prompt_that_normalises_to_nothing_is_refused(client, prompt):
    with pytest.raises(PaletteError) as err:
        client.generate_images(prompt, 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no words left after normalisation" in err.value.details
