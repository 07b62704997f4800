"""Transport security and identities on a real server: TLS, mTLS, bearer tokens, health, reflection,
the caller in logs and metrics, certificate and token rotation, and no plaintext on a public address."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from certificates import CertificateAuthority
from palette.client import PaletteClient, PaletteError
from server_fixtures import metric, running_server, wait_until

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210"}
PALETTE = str(Path(sys.executable).with_name("palette"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder)
    return {"folder": folder, "ca": ca, "server": ca.server(), "alice": ca.client("alice"),
            "other_ca": CertificateAuthority(folder / "other", "Other CA")}


@pytest.fixture()
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# who may call\n" + "".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    return path


def tls_server(pki, **config):
    return running_server(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key), warmup=False, **config)


def generate_one(client: PaletteClient) -> int:
    return len(client.generate_images("a red circle", 1, seed=3).images)


# -- TLS and mTLS -----------------------------------------------------------------------------------

def test_tls_serves_tls_only(pki):
    with tls_server(pki) as server:
        with PaletteClient(server.address, tls_ca=str(pki["ca"].pem), timeout=60) as client:
            assert generate_one(client) == 1
        with PaletteClient(server.address, timeout=10) as plaintext, pytest.raises(PaletteError) as err:
            plaintext.info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses it too.
        with PaletteClient(server.address, tls_ca=str(pki["other_ca"].pem), timeout=10) as wrong, \
                pytest.raises(PaletteError) as err:
            wrong.info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_and_names_the_caller(pki, caplog):
    caplog.set_level(logging.INFO)
    with tls_server(pki, tls_client_ca=str(pki["ca"].pem)) as server:
        with PaletteClient(server.address, tls_ca=str(pki["ca"].pem), timeout=10) as anonymous, \
                pytest.raises(PaletteError) as err:
            anonymous.info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        alice = pki["alice"]
        with PaletteClient(server.address, tls_ca=str(pki["ca"].pem), tls_cert=str(alice.cert),
                           tls_key=str(alice.key), timeout=60) as client:
            assert generate_one(client) == 1
        finished = lambda: [r for r in caplog.records if r.getMessage() == "Generate finished: OK"]  # noqa: E731
        assert wait_until(finished), "no finished log line"
        subject = finished()[-1].caller
        assert "CN=alice" in subject, subject
        assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate", code="OK",
                                         caller=subject) == 1)


# -- tokens -----------------------------------------------------------------------------------------

def test_token_cases_identity_and_no_token_in_logs(token_file, caplog):
    caplog.set_level(logging.DEBUG)
    with running_server(auth_tokens=str(token_file), warmup=False) as server:
        cases = {"missing token": None, "malformed authorization": "Basic YWxpY2U6c2VjcmV0",
                 "unknown token": "Bearer not-a-known-token"}
        for expected, header in cases.items():
            metadata = (("authorization", header),) if header else None
            channel = grpc.insecure_channel(server.address)
            stub = channel.unary_unary("/palette.v1.Palette/GetModelInfo")
            with pytest.raises(grpc.RpcError) as err:
                stub(b"", metadata=metadata, timeout=10)
            channel.close()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, expected
            assert expected in err.value.details(), (expected, err.value.details())
        with PaletteClient(server.address, token=TOKENS["alice"], timeout=60) as alice:
            assert generate_one(alice) == 1
            assert alice.info().limits.max_queued_requests_per_caller == 0  # no per-caller limit was set
        with PaletteClient(server.address, token=TOKENS["bob"], timeout=60) as bob:
            assert generate_one(bob) == 1
        assert wait_until(lambda: metric(server, "palette_requests_total", method="Generate", code="OK",
                                         caller="bob") == 1)
        assert metric(server, "palette_requests_total", method="Generate", code="OK", caller="alice") == 1
        assert metric(server, "palette_requests_total", method="GetModelInfo", code="UNAUTHENTICATED",
                      caller="unauthenticated") == 3
    callers = lambda: {getattr(r, "caller", None) for r in caplog.records  # noqa: E731
                       if r.getMessage() == "Generate finished: OK"}
    assert wait_until(lambda: {"alice", "bob"} <= callers())
    logged = "\n".join(r.getMessage() + " " + repr(vars(r)) for r in caplog.records)
    for token in (*TOKENS.values(), "not-a-known-token"):
        assert token not in logged


def test_the_token_comes_from_palette_token_too(token_file, monkeypatch):
    monkeypatch.setenv("PALETTE_TOKEN", TOKENS["bob"])
    with running_server(auth_tokens=str(token_file), warmup=False) as server, \
            PaletteClient(server.address, timeout=60) as client:
        assert client.info().limits.num_slots > 0


def test_health_is_open_and_reflection_needs_a_token(token_file):
    with running_server(auth_tokens=str(token_file), warmup=False) as server:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "palette.v1.Palette"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()
        authorised = grpc.intercept_channel(grpc.insecure_channel(server.address), _BearerToken(TOKENS["alice"]))
        services = ProtoReflectionDescriptorDatabase(authorised).get_services()
        assert "palette.v1.Palette" in services
        authorised.close()


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        metadata = list(details.metadata or ()) + [("authorization", f"Bearer {self.token}")]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


# -- rotation without a restart ---------------------------------------------------------------------

def test_certificates_and_tokens_rotate_without_a_restart(pki, tmp_path, token_file):
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki["server"].cert, live / "server.crt")
    shutil.copy(pki["server"].key, live / "server.key")
    with running_server(tls_cert=str(live / "server.crt"), tls_key=str(live / "server.key"),
                        auth_tokens=str(token_file), warmup=False) as server:
        with PaletteClient(server.address, tls_ca=str(pki["ca"].pem), token=TOKENS["alice"], timeout=30) as c:
            assert c.info().limits.num_slots > 0
        rotated = pki["other_ca"].server("rotated")
        # Replace both files (as a certificate manager does), then connect anew.
        os.replace(_copy(rotated.cert, live / "next.crt"), live / "server.crt")
        os.replace(_copy(rotated.key, live / "next.key"), live / "server.key")
        token_file.write_text(token_file.read_text() + "carol:carol-token-5555555555\n")
        with PaletteClient(server.address, tls_ca=str(pki["other_ca"].pem), token="carol-token-5555555555",
                           timeout=30) as c:
            assert c.info().limits.num_slots > 0
        with PaletteClient(server.address, tls_ca=str(pki["ca"].pem), token=TOKENS["alice"], timeout=10) as old, \
                pytest.raises(PaletteError) as err:
            old.info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


# -- secure by default ------------------------------------------------------------------------------

def test_plaintext_on_a_public_address_is_refused_before_anything_loads(tmp_path):
    started = subprocess.run([PALETTE, "serve", "--host", "0.0.0.0", "--port", "0", "--no-metrics"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert started.returncode != 0
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in started.stderr, started.stderr
    assert "--tls-cert" in lines[0] and "--insecure" in lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "missing.crt", "--tls-key", "missing.key"], "missing.crt"),
    (["--tls-cert", "server.crt"], "--tls-key"),
    (["--auth-tokens", "tokens.txt"], "tokens.txt"),
])
def test_bad_security_flags_give_one_clear_line(tmp_path, flags, message):
    (tmp_path / "tokens.txt").write_text("alice only-a-name-and-no-colon\n")
    started = subprocess.run([PALETTE, "serve", "--port", "0", "--no-metrics", *flags],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert started.returncode != 0
    assert "Traceback" not in started.stderr and len(started.stderr.strip().splitlines()) == 1, started.stderr
    assert message in started.stderr
