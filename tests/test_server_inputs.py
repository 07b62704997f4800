"""Every bad input gets INVALID_ARGUMENT with a message a user can act on; faults never leak a traceback."""

from __future__ import annotations

import io
import math
import zlib

import grpc
import pytest
from PIL import Image

from palette.client import PaletteClient, PaletteError
from palette.v1 import palette_pb2 as pb
from palette.v1 import palette_pb2_grpc as pb_grpc
from server_fixtures import pipeline, png_bytes, running_server

MAX_RANK_BYTES = 200_000
MAX_RANK_PIXELS = 1_000_000
MAX_RANK_IMAGES = 20


@pytest.fixture(scope="module")
def server():
    with running_server(max_rank_image_bytes=MAX_RANK_BYTES, max_rank_image_pixels=MAX_RANK_PIXELS,
                        max_rank_images=MAX_RANK_IMAGES) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with PaletteClient(server.address, timeout=60) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.PaletteStub(channel)


def refused(call) -> PaletteError:
    with pytest.raises(PaletteError) as err:
        call()
    return err.value


def long_prompt_in_tokens() -> str:
    limits = pipeline().limits
    words = " ".join(f"word{i}" for i in range(limits.max_prompt_tokens * 2))
    assert len(words) <= limits.max_prompt_chars
    return words



@pytest.mark.parametrize("kwargs, expected", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   \n\t"), "prompt is empty"),
    (dict(prompt="x" * 501), "the limit is 500"),
    (dict(prompt=None), "tokens"),  # filled in with a prompt that is too long in tokens
    (dict(num_images=0), "num_images must be 1..16, got 0"),
    (dict(num_images=40), "num_images must be 1..16, got 40"),
    (dict(num_images=-3), "num_images must be 1..16, got -3"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p=math.nan), "top_p must be in (0, 1]"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0, got -1"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0"),
    (dict(condition_scale=math.inf), "condition_scale must be a finite number"),
    (dict(top_k=-5), "top_k must be 0..256"),
    (dict(top_k=257), "top_k must be 0..256 (0 = the model default), got 257"),
    (dict(format=7), "format must be IMAGE_FORMAT_PNG (1), IMAGE_FORMAT_JPEG (2) or IMAGE_FORMAT_WEBP (3)"),
    (dict(quality=101), "quality must be 1..100"),
    (dict(preview_every=10_000), "preview_every must be 0..256"),
])
def test_generate_bad_input(client, kwargs, expected):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a fine prompt")
    if prompt is None:
        prompt = long_prompt_in_tokens()
    num_images = kwargs.pop("num_images", 1)
    err = refused(lambda: client.generate_images(prompt, num_images, **kwargs))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details, err.details
    if "tokens" in expected:
        assert str(pipeline().limits.max_prompt_tokens) in err.details


def test_all_problems_reported_at_once(client):
    err = refused(lambda: client.generate_images("ok", 99, top_p=2.0, temperature=-1.0))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("num_images", "top_p", "temperature"):
        assert field in err.details


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def big_but_small_png() -> bytes:
    """A real, fully decodable 1500x1500 image (2.25 M pixels) that compresses to a few KiB."""
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1500), "white").save(buf, format="PNG")
    assert len(buf.getvalue()) < MAX_RANK_BYTES
    return buf.getvalue()


def truncated_png() -> bytes:
    return png_bytes(1)[:200]


@pytest.mark.parametrize("image, expected", [
    (b"definitely not an image", "image 1 is not an image format the server can read"),
    (b"", "image 1 is empty"),
    ("truncated", "image 1 is not a decodable image"),
    ("oversized", f"the limit is {MAX_RANK_BYTES} bytes"),
    ("too_many_pixels", f"1500x1500 = 2250000 pixels; the limit is {MAX_RANK_PIXELS}"),
    ("bomb", "image 1"),
])
def test_rank_bad_image(client, image, expected):
    image = {"truncated": truncated_png, "oversized": lambda: b"\x89PNG" + b"\0" * (MAX_RANK_BYTES + 1),
             "too_many_pixels": big_but_small_png, "bomb": lambda: bomb_png(100_000, 100_000)}.get(
        image, lambda: image)()
    err = refused(lambda: list(client.rank("a picture", [png_bytes(0), image])))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details, err.details


def test_rank_decompression_bomb_is_refused_before_decoding(client):
    for size in ((100_000, 100_000), (20_000, 20_000), (1001, 1000)):
        err = refused(lambda: list(client.rank("a picture", [bomb_png(*size)])))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "pixels" in err.details or "decompression bomb" in err.details, err.details


def test_rank_too_many_images(client):
    err = refused(lambda: list(client.rank("many", [png_bytes(i) for i in range(MAX_RANK_IMAGES + 1)])))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_RANK_IMAGES} images" in err.details


@pytest.mark.parametrize("messages, expected", [
    ([pb.RankRequest(image=png_bytes(0))], "the first Rank message must carry the prompt"),
    ([], "the first Rank message must carry the prompt"),
    ([pb.RankRequest(prompt="a cat")], "no images to rank"),
    ([pb.RankRequest(prompt="")], "prompt is empty"),
    ([pb.RankRequest(prompt="a cat"), pb.RankRequest(image=png_bytes(0)), pb.RankRequest(prompt="again")],
     "message 2 carries no image"),
])
def test_rank_bad_stream(stub, messages, expected):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Rank(iter(messages), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details(), err.value.details()


def test_a_fault_is_internal_without_traceback_and_the_server_goes_on(server, client, monkeypatch):
    def broken(tokens):
        raise RuntimeError("simulated device failure in a secret/path/file.py")

    monkeypatch.setattr(server.pipeline, "decode", broken)
    err = refused(lambda: client.generate_images("boom", 2, seed=1))
    assert err.code == grpc.StatusCode.INTERNAL
    assert "request" in err.details and "Traceback" not in err.details and "secret" not in err.details
    monkeypatch.undo()
    assert len(client.generate_images("fine again", 2, seed=1).images) == 2


def test_server_keeps_serving_after_bad_input(client):
    for _ in range(3):
        refused(lambda: client.generate_images("", 1))
    assert len(client.generate_images("still here", 1, seed=9).images) == 1
