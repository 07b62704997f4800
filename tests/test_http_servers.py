"""The HTTP port under the gRPC port's settings: tokens, TLS, client certificates, a full queue, a drain.

Each test starts its own server (one at a time); the calls are compared with the same calls over gRPC.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.request

import grpc
import pytest

from http_fixtures import envelope, grpc_unary, make_certificates, post, read_envelopes, stream_json, unary_json, url
from palette.client import PaletteClient, Progress
from palette.v1 import palette_pb2 as pb
from server_fixtures import metric, running_server, slow_steps, wait_until


def test_serve_takes_the_http_port(monkeypatch):
    import palette.server.main
    from palette.client import cli

    seen = []
    monkeypatch.setattr(palette.server.main, "run", lambda config_path, config, **options: seen.append(config) or 0)
    assert cli.main(["serve", "--http-port", "8080"]) == 0
    assert seen[0].http_port == 8080 and seen[0].host == "127.0.0.1"
    assert cli.main(["serve"]) == 0 and seen[1].http_port is None  # off unless given


def test_tokens_guard_the_rpcs_as_on_the_grpc_port_and_the_page_stays_open(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret-token\n")
    with running_server(http_port=0, auth_tokens=str(tokens)) as server:
        for header, problem in ((None, "missing token"), ("Bearer wrong-token-value", "unknown token"),
                                ("Basic abc", "malformed authorization")):
            metadata = (("authorization", header),) if header else ()
            code, details, _ = grpc_unary(server, "GetModelInfo", pb.GetModelInfoRequest(), metadata)
            status, _, body = unary_json(server, "GetModelInfo", {}, headers=dict(metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith(problem)
            assert status == 401 and body == {"code": "unauthenticated", "message": details}
        _, _, end = stream_json(server, "Generate", {"prompt": "a cat"})
        assert end["error"]["code"] == "unauthenticated"

        status, _, body = unary_json(server, "GetModelInfo", {}, headers={"Authorization": "Bearer alice-secret-token"})
        assert status == 200 and body["limits"]["numSlots"]
        assert wait_until(lambda: metric(server, "palette_requests_total", method="GetModelInfo", code="OK",
                                         caller="alice") == 1)
        with urllib.request.urlopen(url(server), timeout=10) as page:  # the page asks for the token itself
            assert page.status == 200


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


def https_context(certificates, client: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates["ca.pem"]))
    if client:
        context.load_cert_chain(certificates["client.pem"], certificates["client.key"])
    return context


def test_tls_on_the_http_port(certificates):
    with running_server(http_port=0, tls_cert=str(certificates["server.pem"]),
                        tls_key=str(certificates["server.key"])) as server:
        context = https_context(certificates, client=False)
        status, _, body = unary_json(server, "GetModelInfo", {}, scheme="https", context=context)
        assert status == 200 and body["hasRanker"] is True
        with urllib.request.urlopen(url(server, scheme="https"), timeout=10, context=context) as page:
            assert page.status == 200
        with pytest.raises(OSError):  # no plaintext on a TLS port
            post(url(server, "GetModelInfo"), b"{}", "application/json", timeout=10)


def test_client_certificates_are_required_and_name_the_caller_as_over_grpc(certificates):
    with running_server(http_port=0, tls_cert=str(certificates["server.pem"]), tls_key=str(certificates["server.key"]),
                        tls_client_ca=str(certificates["ca.pem"])) as server:
        with pytest.raises(OSError):  # the handshake wants a client certificate
            unary_json(server, "GetModelInfo", {}, scheme="https", context=https_context(certificates, client=False))
        status, _, _ = unary_json(server, "GetModelInfo", {}, scheme="https",
                                  context=https_context(certificates, client=True))
        assert status == 200
        with PaletteClient(server.address, timeout=30, tls_ca=str(certificates["ca.pem"]),
                           tls_cert=str(certificates["client.pem"]), tls_key=str(certificates["client.key"])) as client:
            client.info()
        samples = [line for line in _metrics_lines(server) if line.startswith("palette_requests_total{")
                   and 'method="GetModelInfo"' in line]
        callers = {line.split('caller="')[1].split('"')[0] for line in samples}
        # One identity for both transports: the certificate's subject, as gRPC reports it.
        assert len(callers) == 1 and "CN=web-client" in callers.pop(), samples
        assert any(line.endswith(" 2.0") for line in samples), samples


def _metrics_lines(server) -> list[str]:
    from server_fixtures import metrics_text

    return metrics_text(server).splitlines()


def test_a_full_queue_says_when_to_retry_over_connect():
    with running_server(http_port=0, max_queued_requests=2) as server, slow_steps(server, 0.05), \
            PaletteClient(server.address, timeout=60) as client:
        hog = client.generate("a request with many images", 16, seed=1)
        hog_events = iter(hog)
        assert isinstance(next(hog_events), Progress)
        second = client.generate("a second request", 1, seed=2)
        assert isinstance(next(iter(second)), Progress)

        _, messages, end = stream_json(server, "Generate", {"prompt": "one too many", "seed": 3})
        assert messages == [] and end["error"]["code"] == "resource_exhausted"
        assert "retry in about" in end["error"]["message"]
        retry_ms = int(end["metadata"]["retry-after-ms"][0])
        assert 500 <= retry_ms <= 60_000
        # The binary protocol carries the same trailer.
        status, _, body = post(url(server, "Generate"), envelope(pb.GenerateRequest(prompt="again").SerializeToString()),
                               "application/connect+proto")
        final = json.loads(read_envelopes(body)[-1][1])
        assert status == 200 and final["error"]["code"] == "resource_exhausted" and "retry-after-ms" in final["metadata"]
        hog.cancel()
        second.cancel()


def test_drain_finishes_http_streams_and_refuses_new_calls():
    with running_server(http_port=0) as server:
        results: dict = {}
        with slow_steps(server, 0.02):
            worker = threading.Thread(target=lambda: results.update(
                first=stream_json(server, "Generate", {"prompt": "finish me", "numImages": 2, "seed": 5})))
            worker.start()
            assert wait_until(lambda: server.batcher.occupied_slots() > 0, timeout=10)
            stopper = threading.Thread(target=server.stop, kwargs={"grace": 30})
            stopper.start()
            assert wait_until(lambda: not server.batcher.accepting, timeout=5)
            status, _, body = unary_json(server, "RankImages", {"prompt": "too late"})
            assert status == 503 and body["code"] == "unavailable"
            worker.join(60)
            stopper.join(60)
        _, messages, end = results["first"]
        assert end == {} and "done" in messages[-1]
        assert sum("image" in m for m in messages) == 2
        started = time.monotonic()
        with pytest.raises(OSError):  # the port is closed
            post(url(server, "GetModelInfo"), b"{}", "application/json", timeout=5)
        assert time.monotonic() - started < 5
