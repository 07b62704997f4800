"""Helpers for the HTTP port's tests: Connect calls made by hand (as curl or a browser would make them),
the same call over gRPC for comparison, and throwaway certificates for the TLS tests."""

from __future__ import annotations

import json
import ssl
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from palette.v1 import palette_pb2_grpc

END_STREAM = 0x02


def url(server: Any, method: str = "", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.http_port}/" + (f"palette.v1.Palette/{method}" if method else "")


def post(address: str, body: bytes, content_type: str, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one POST, whatever the status."""
    request = urllib.request.Request(address, data=body, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def unary_json(server: Any, method: str, message: dict, **kwargs) -> tuple[int, dict[str, str], dict]:
    """A Connect unary call with a JSON body, as `curl -H 'Content-Type: application/json'` makes it."""
    status, headers, body = post(url(server, method, kwargs.pop("scheme", "http")), json.dumps(message).encode(),
                                 "application/json", **kwargs)
    return status, headers, json.loads(body)


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def read_envelopes(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        out.append((flags, body[5:5 + size]))
        body = body[5 + size:]
    return out


def stream_json(server: Any, method: str, message: dict, **kwargs) -> tuple[dict[str, str], list[dict], dict]:
    """A Connect server-streaming call in JSON: (response headers, messages, the end-of-stream message)."""
    status, headers, body = post(url(server, method), envelope(json.dumps(message).encode()),
                                 "application/connect+json", **kwargs)
    assert status == 200, (status, body[:200])
    frames = read_envelopes(body)
    assert frames and frames[-1][0] & END_STREAM, "the stream must end with an end-of-stream message"
    return headers, [json.loads(p) for f, p in frames[:-1]], json.loads(frames[-1][1])


def grpc_unary(server: Any, method: str, request: Any, metadata: tuple = ()) -> tuple[grpc.StatusCode, str, Any]:
    """(code, details, reply or None) of the same call over the gRPC port."""
    with grpc.insecure_channel(server.address) as channel:
        stub = palette_pb2_grpc.PaletteStub(channel)
        try:
            reply = getattr(stub, method)(request, timeout=60, metadata=metadata)
            if method == "Generate":
                reply = list(reply)
            return grpc.StatusCode.OK, "", reply
        except grpc.RpcError as err:
            return err.code(), err.details(), None


def to_json(message: Any) -> dict:
    return json_format.MessageToDict(message)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, all signed by the CA."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Palette Test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    for name, subject, extension in (
            ("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            ("client", "/O=Palette Tests/CN=web-client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=folder)
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
