"""The HTTP port (--http-port): Connect in JSON and binary, gRPC-Web, and the page, over the same core as gRPC.

Calls are made by hand (as curl and browsers make them) and with connectrpc's generated client, and each
is compared with the same call over the gRPC port: same replies, same image bytes for the same seeds,
same error codes and messages.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from connectrpc.errors import ConnectError

from http_fixtures import (envelope, grpc_unary, post, read_envelopes, stream_json, to_json, unary_json,
                           url)
from palette.v1 import palette_pb2 as pb
from palette.v1.palette_connect import PaletteClientSync
from server_fixtures import NUM_SLOTS, metric, png_bytes, running_server, slow_steps, wait_until


@pytest.fixture(scope="module")
def server():
    with running_server(http_port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def connect(server):
    """connectrpc's generated client: the Connect protocol with binary messages."""
    with PaletteClientSync(f"http://127.0.0.1:{server.http_port}", timeout_ms=60_000) as client:
        yield client


def images_of(responses: list[pb.GenerateResponse]) -> dict[int, pb.Image]:
    return {r.image.index: r.image for r in responses if r.WhichOneof("event") == "image"}


# -- unary calls ------------------------------------------------------------------------------------

def test_get_model_info_over_connect_json_and_binary(server, connect):
    _, _, over_grpc = grpc_unary(server, "GetModelInfo", pb.GetModelInfoRequest())
    assert wait_until(lambda: server.core.inflight == 0)  # the gRPC call is counted once gRPC says it ended
    before = metric(server, "palette_requests_total", method="GetModelInfo", code="OK")

    status, headers, body = unary_json(server, "GetModelInfo", {}, headers={"x-request-id": "web-test-1"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "web-test-1"
    assert body == to_json(over_grpc)
    assert body["limits"]["numSlots"] == NUM_SLOTS and body["hasRanker"] is True

    status, headers, raw = post(url(server, "GetModelInfo"), b"", "application/proto")
    assert status == 200 and headers["content-type"] == "application/proto"
    assert pb.ModelInfo.FromString(raw) == over_grpc
    assert connect.get_model_info(pb.GetModelInfoRequest()) == over_grpc
    # Counted like a gRPC call, under the same method name.
    assert wait_until(lambda: metric(server, "palette_requests_total", method="GetModelInfo", code="OK") == before + 3)


def test_rank_images_and_rank_give_the_grpc_scores(server, connect):
    images = [png_bytes(seed) for seed in (1, 2, 3)]
    request = pb.RankImagesRequest(prompt="a red circle", images=images)
    _, _, over_grpc = grpc_unary(server, "RankImages", request)

    status, _, body = unary_json(server, "RankImages", {"prompt": "a red circle",
                                                        "images": [base64.b64encode(i).decode() for i in images]})
    assert status == 200
    assert [s.get("index", 0) for s in body["scores"]] == [0, 1, 2]  # proto3 JSON leaves out zeros
    assert [s["score"] for s in body["scores"]] == pytest.approx([s.score for s in over_grpc.scores], abs=1e-5)
    assert body["rankedIndices"] == list(over_grpc.ranked_indices)

    # The streaming Rank works over HTTP/1.1 too (the client sends all images, then reads the scores).
    def requests():
        yield pb.RankRequest(prompt="a red circle")
        for image in images:
            yield pb.RankRequest(image=image)

    replies = list(connect.rank(requests()))
    scores = [r.score.score for r in replies if r.WhichOneof("event") == "score"]
    assert scores == pytest.approx([s.score for s in over_grpc.scores], abs=1e-5)
    assert list(replies[-1].done.ranked_indices) == list(over_grpc.ranked_indices)


# -- Generate: server streaming ----------------------------------------------------------------------

def test_generate_over_connect_gives_the_grpc_bytes(server, connect):
    request = pb.GenerateRequest(prompt="a red circle in the centre on a white background", num_images=3, seed=21,
                                 rank=True, preview_every=64)
    _, _, over_grpc = grpc_unary(server, "Generate", request)
    expected = images_of(over_grpc)
    assert sorted(expected) == [0, 1, 2]

    binary = list(connect.generate(request))
    headers, messages, end = stream_json(server, "Generate", to_json(request))
    kinds = [next(iter(m)) for m in messages]
    assert kinds[0] == "progress" and kinds[-1] == "done" and "preview" in kinds
    assert [r.WhichOneof("event") for r in binary][0] == "progress" and binary[-1].WhichOneof("event") == "done"
    assert end == {} and headers["x-request-id"] == messages[-1]["done"]["requestId"]

    from_json = {m["image"].get("index", 0): m["image"] for m in messages if "image" in m}
    for index, image in expected.items():
        assert images_of(binary)[index].data == image.data, f"image {index} differs over Connect (binary)"
        assert base64.b64decode(from_json[index]["data"]) == image.data, f"image {index} differs over Connect JSON"
        assert from_json[index]["seed"] == image.seed == 21 + index
        assert from_json[index]["score"] == pytest.approx(image.score, abs=1e-5)
    assert messages[-1]["done"]["rankedIndices"] == list(over_grpc[-1].done.ranked_indices)


def test_client_disconnect_cancels_generate_and_frees_rows(server):
    assert wait_until(lambda: server.batcher.occupied_slots() == 0)
    cancelled = metric(server, "palette_requests_total", method="Generate", code="CANCELLED")
    with slow_steps(server, 0.05):
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        connection.request("POST", "/palette.v1.Palette/Generate",
                           envelope(json.dumps({"prompt": "a long job", "numImages": 16, "seed": 1}).encode()),
                           {"Content-Type": "application/connect+json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read1(5)  # the first message is on its way: the request holds sampler rows
        assert wait_until(lambda: server.batcher.occupied_slots() == NUM_SLOTS, timeout=5)
        connection.sock.shutdown(2)
        connection.close()
        left = time.monotonic()
        assert wait_until(lambda: server.batcher.occupied_slots() == 0, timeout=5)
        assert time.monotonic() - left < 2
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate", code="CANCELLED")
                      == cancelled + 1)


def test_deadline_exceeded_over_connect(server, connect):
    before = metric(server, "palette_requests_total", method="Generate", code="DEADLINE_EXCEEDED")
    with slow_steps(server, 0.02), pytest.raises(ConnectError) as err:
        list(connect.generate(pb.GenerateRequest(prompt="too slow", num_images=16, seed=3), timeout_ms=300))
    assert err.value.code.name == "DEADLINE_EXCEEDED"
    assert wait_until(lambda: server.batcher.occupied_slots() == 0, timeout=5)
    assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate", code="DEADLINE_EXCEEDED")
                      == before + 1)


# -- errors: the same codes and messages as over gRPC -----------------------------------------------------

ERRORS = [
    ("Generate", pb.GenerateRequest(prompt="")),
    ("Generate", pb.GenerateRequest(prompt="a cat", num_images=40, top_p=2.0)),
    ("Generate", pb.GenerateRequest(prompt="x" * 600)),
    ("RankImages", pb.RankImagesRequest(prompt="a cat")),
    ("RankImages", pb.RankImagesRequest(prompt="a cat", images=[b"not an image"])),
]


@pytest.mark.parametrize("method,request_", ERRORS, ids=["empty-prompt", "bad-options", "long-prompt", "no-images",
                                                          "bad-image"])
def test_errors_map_to_the_same_codes_and_messages(server, connect, method, request_):
    code, details, _ = grpc_unary(server, method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details
    if method == "Generate":
        _, messages, end = stream_json(server, method, to_json(request_))
        assert messages == []
        error = end["error"]
    else:
        status, _, error = unary_json(server, method, to_json(request_))
        assert status == 400
    assert error == {"code": "invalid_argument", "message": details}
    with pytest.raises(ConnectError) as err:
        reply = getattr(connect, "generate" if method == "Generate" else "rank_images")(request_)
        list(reply) if method == "Generate" else None
    assert (err.value.code.name, err.value.message) == ("INVALID_ARGUMENT", details)


def test_undecodable_messages_are_invalid_argument_as_over_grpc(server):
    garbage = b"\x12\x05ab"  # field 2 claims 5 bytes, 2 follow
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/palette.v1.Palette/RankImages")
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, _, body = post(url(server, "RankImages"), garbage, "application/proto")
    assert status == 400 and json.loads(body) == {"code": "invalid_argument", "message": err.value.details()}

    status, _, body = unary_json(server, "RankImages", {"prompt": "a cat", "images": "not a list"})
    assert status == 400 and body["code"] == "invalid_argument"
    assert body["message"].startswith("the RankImagesRequest message could not be decoded")


def test_grpc_web(server):
    status, headers, body = post(url(server, "GetModelInfo"), envelope(b""), "application/grpc-web+proto")
    assert status == 200 and headers["content-type"] == "application/grpc-web+proto"
    (data_flags, data), (trailer_flags, trailers) = read_envelopes(body)
    assert data_flags == 0 and pb.ModelInfo.FromString(data).limits.num_slots == NUM_SLOTS
    assert trailer_flags & 0x80 and b"grpc-status: 0" in trailers

    status, _, body = post(url(server, "Generate"), envelope(pb.GenerateRequest(prompt="").SerializeToString()),
                           "application/grpc-web+proto")
    assert status == 200
    trailers = read_envelopes(body)[-1][1].decode()
    assert "grpc-status: 3" in trailers and "prompt%20is%20empty" in trailers


# -- the page ---------------------------------------------------------------------------------------

def test_the_page_is_served_from_the_package_and_needs_nothing_else(server):
    with urllib.request.urlopen(url(server), timeout=10) as response:
        html = response.read().decode()
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = response.headers["Content-Security-Policy"]
        etag = response.headers["ETag"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy  # nothing from elsewhere
    assert '<script src="app.js"' in html and 'href="app.css"' in html
    assert "http://" not in html and "https://" not in html
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        with urllib.request.urlopen(url(server) + name, timeout=10) as response:
            assert response.headers["Content-Type"].startswith(kind)
            assert response.read()
    request = urllib.request.Request(url(server), headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(request, timeout=10)
    assert not_modified.value.code == 304
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url(server) + "nothing-here", timeout=10)
    assert missing.value.code == 404
