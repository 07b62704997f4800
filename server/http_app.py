"""The HTTP transport: Connect (JSON and binary), gRPC-Web and the web page on one port, over PaletteCore.

The twin of service.py's gRPC adapter. connectrpc's ASGI application speaks the protocols; this module
authenticates each call with the same Authenticator (the `authorization` header, or the client
certificate's subject under mTLS), brackets it with the core's CallRecord (metrics, the `finished` log
line, x-request-id in and out), hands the work to the core, and turns RpcFailures into Connect errors
with the same code and message. Trailers such as retry-after-ms become response trailers: Connect's
end-of-stream metadata, gRPC-Web's trailer frame, or `trailer-` headers on a unary Connect reply. A
client that disconnects cancels its call, which frees its sampler rows like a cancelled gRPC call.

uvicorn serves it over HTTP/1.1 on its own thread and event loop; PaletteServer binds, starts and
drains it next to the gRPC port. gRPC itself (HTTP/2 with trailers) stays on the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import importlib.resources
import logging
import socket
import threading
import time
from typing import Any, AsyncIterator

import grpc
import uvicorn
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from uvicorn.protocols.http.h11_impl import H11Protocol

from palette.v1 import palette_pb2 as pb
from palette.v1.palette_connect import PaletteASGIApplication

from .auth import Authenticator
from .core import SERVICE_NAME, PaletteCore, rank_image
from .errors import RpcFailure, Undecodable, decoded
from .logs import request_id_from
from .service import UNAUTHENTICATED_CALLER, ServerConfig
from .tls import CertificateFiles

log = logging.getLogger(__name__)

RPC_PREFIX = f"/{SERVICE_NAME}/"

# The verified client certificate's subject for the request being handled (mTLS), set by WebApp
# from the scope's TLS extension; a context variable reaches the handler whatever task runs it.
_peer_subject: contextvars.ContextVar[str | None] = contextvars.ContextVar("palette_peer_subject", default=None)


# -- errors both ways -----------------------------------------------------------------------------

def to_connect(failure: RpcFailure) -> ConnectError:
    """The Connect error with the failure's code and message (gRPC's CANCELLED is Connect's CANCELED)."""
    name = failure.code.name
    return ConnectError(Code.CANCELED if name == "CANCELLED" else Code[name], failure.message)


def from_connect(error: ConnectError) -> RpcFailure:
    """What the protocol layer refused (a broken request stream, say) as the core's failure."""
    name = error.code.name
    return RpcFailure(error.message, grpc.StatusCode.CANCELLED if name == "CANCELED" else grpc.StatusCode[name])


class _Codec:
    """A google.protobuf codec whose undecodable input becomes the request itself: an `Undecodable`
    that the handler raises inside its CallRecord, so that the call is counted and answered as the
    gRPC port answers it (connectrpc would refuse it before any handler ran)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: Any) -> Any:
        try:
            return self._inner.decode(data, message_class)
        except Exception as err:  # noqa: BLE001 - bad bytes or bad JSON: the client's fault
            return Undecodable(message_class.DESCRIPTOR.name, err)


CODECS = (_Codec(google_protobuf_binary_codec()), _Codec(google_protobuf_json_codec()))


# -- the service ----------------------------------------------------------------------------------

class _ConnectCall:
    """A Connect call's bracket around a CallRecord, as `_GrpcCall` is for gRPC: authenticates, echoes
    x-request-id, maps what the handler raises, and counts the call as finished however it ended."""

    def __init__(self, service: "PaletteConnect", method: str, ctx: Any):
        self.ctx = ctx
        headers = ctx.request_headers
        request_id = request_id_from(headers.allitems())
        ctx.response_headers["x-request-id"] = request_id
        authenticator = service.authenticator
        subject = _peer_subject.get() if authenticator.client_certificates else None
        self._refused: RpcFailure | None = None
        try:
            caller = authenticator.authenticate(headers.getall("authorization"), subject)
        except RpcFailure as failure:
            caller, self._refused = UNAUTHENTICATED_CALLER, failure
        self.record = service.core.begin(method, request_id, caller)

    def __enter__(self) -> "_ConnectCall":
        if self._refused is not None:
            self._fail(self._refused)
            self.record.finish()
            raise to_connect(self._refused)
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        try:
            if error is None:
                self.record.ok()
            elif isinstance(error, RpcFailure):
                self._fail(error)
                raise to_connect(error) from None
            elif isinstance(error, ConnectError):  # the request stream broke (too large, client gone)
                self._fail(from_connect(error))
            elif isinstance(error, Exception):
                raise to_connect(self.record.internal()) from None
            # CancelledError (the client left, or its deadline passed) and GeneratorExit: finish() says which.
            return False
        finally:
            remaining = self.ctx.timeout_ms
            expired = remaining is not None and remaining <= 0
            self.record.finish(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)

    def _fail(self, failure: RpcFailure) -> None:
        self.record.fail(failure)
        for key, value in failure.trailers:
            self.ctx.response_trailers.add(key, value)


class PaletteConnect:
    """palette.v1.Palette for connectrpc (the generated `Palette` protocol), as thin as PaletteServicer."""

    def __init__(self, core: PaletteCore, authenticator: Authenticator):
        self.core = core
        self.authenticator = authenticator

    async def generate(self, request: Any, ctx: Any) -> AsyncIterator[pb.GenerateResponse]:
        with _ConnectCall(self, "Generate", ctx) as call:
            job = self.core.start_generate(decoded(request), call.record)
            try:
                async for message in self.core.agenerate_responses(job, call.record):
                    yield message
            finally:
                self.core.cancel(job)  # frees its rows if the client left or its deadline passed; else a no-op

    async def rank(self, requests: AsyncIterator[Any], ctx: Any) -> AsyncIterator[pb.RankResponse]:
        with _ConnectCall(self, "Rank", ctx) as call:
            session = self.core.start_rank_stream(decoded(await anext(requests, None)), call.record)
            # Images are read on their own task while scores stream out, as the gRPC adapter's reader thread.
            reader = asyncio.create_task(session.aread_all(_rank_images(requests)))
            try:
                async for response in session.aresponses():
                    yield response
            finally:
                session.closed.set()
                reader.cancel()

    async def rank_images(self, request: Any, ctx: Any) -> pb.RankImagesResponse:
        with _ConnectCall(self, "RankImages", ctx) as call:
            return await asyncio.to_thread(self.core.rank_images, decoded(request), call.record)

    async def get_model_info(self, request: Any, ctx: Any) -> pb.ModelInfo:
        with _ConnectCall(self, "GetModelInfo", ctx):
            decoded(request)
            return self.core.model_info()


async def _rank_images(requests: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    position = 0
    try:
        async for message in requests:
            position += 1
            yield rank_image(position, decoded(message))
    except ConnectError as err:
        raise from_connect(err) from None


# -- the page and the router ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page loads nothing from elsewhere; images are blob: URLs made from the streamed bytes.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def load_page() -> dict[str, StaticFile]:
    """The web page built by `make web` (shipped as package data in palette/server/web), by URL path."""
    files: dict[str, StaticFile] = {}
    root = importlib.resources.files("palette.server") / "web"
    if not root.is_dir():
        log.warning("the web page is missing from the package (make web builds it); the RPCs are served without it")
        return files
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            files["/" + entry.name] = StaticFile(body, CONTENT_TYPES[suffix],
                                                 '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


class WebApp:
    """The ASGI application on the HTTP port: RPCs under /palette.v1.Palette/, the page everywhere else."""

    def __init__(self, rpc: Any, page: dict[str, StaticFile]):
        self.rpc = rpc
        self.page = page

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan is off, websockets are not served
            return
        if scope["path"].startswith(RPC_PREFIX):
            tls = scope.get("extensions", {}).get("tls") or {}
            token = _peer_subject.set(tls.get("client_cert_name"))
            try:
                await self.rpc(scope, receive, send)
            finally:
                _peer_subject.reset(token)
            return
        await self._page(scope, send)

    async def _page(self, scope: dict, send: Any) -> None:
        file = self.page.get(scope["path"])
        if file is None:
            return await _respond(send, 404, [(b"content-type", b"text/plain; charset=utf-8")],
                                  b"not found: the page is at /, the RPCs under " + RPC_PREFIX.encode() + b"\n")
        if scope["method"] not in ("GET", "HEAD"):
            return await _respond(send, 405, [(b"allow", b"GET, HEAD")], b"")
        headers = [(b"content-type", file.content_type.encode()), (b"etag", file.etag.encode()),
                   (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer")]
        if file.content_type.startswith("text/html"):
            headers.append((b"content-security-policy", PAGE_POLICY.encode()))
        if dict(scope["headers"]).get(b"if-none-match") == file.etag.encode():
            return await _respond(send, 304, headers, b"")
        await _respond(send, 200, headers + [(b"content-length", str(len(file.body)).encode())],
                       b"" if scope["method"] == "HEAD" else file.body)


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(core: PaletteCore, authenticator: Authenticator, max_message_bytes: int) -> WebApp:
    rpc = PaletteASGIApplication(PaletteConnect(core, authenticator), read_max_bytes=max_message_bytes,
                                 codecs=CODECS)
    return WebApp(rpc, load_page())


# -- the server -----------------------------------------------------------------------------------

_SHORT_NAMES = {"commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
                "organizationName": "O", "organizationalUnitName": "OU", "streetAddress": "STREET",
                "domainComponent": "DC", "userId": "UID"}


def subject_name(subject: tuple) -> str:
    """An `ssl` peer certificate's subject as an RFC 4514 string ("CN=client,O=Example"), as gRPC reports it."""
    def escape(value: str) -> str:
        value = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
        if value[:1] in ("#", " "):
            value = "\\" + value
        return value[:-1] + "\\ " if value.endswith(" ") else value

    rdns = ["+".join(f"{_SHORT_NAMES.get(key, key)}={escape(value)}" for key, value in rdn) for rdn in subject]
    return ",".join(reversed(rdns))


class _H11WithClientCertificate(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus the ASGI TLS extension's `client_cert_name` (the verified client
    certificate's subject) in each request's scope: uvicorn does not fill that extension itself."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate and certificate.get("subject"):
            app, name = self.app, subject_name(certificate["subject"])

            async def with_certificate(scope: dict, receive: Any, send: Any) -> None:
                scope.setdefault("extensions", {})["tls"] = {"client_cert_name": name}
                await app(scope, receive, send)

            self.app = with_certificate


class HttpServer:
    """uvicorn serving WebApp on its own thread and event loop. `bind` takes the port (so a port in use
    is reported before the warm-up), `start` serves, `stop` closes the port and lets in-flight calls
    finish within the grace period (then cancels them, which frees their sampler rows)."""

    def __init__(self, core: PaletteCore, authenticator: Authenticator, certificates: CertificateFiles | None,
                 config: ServerConfig, max_calls: int):
        self.app = build_app(core, authenticator, config.max_message_bytes)
        self.host = config.host
        self.requested_port = config.http_port or 0
        self.certificates = certificates
        self.max_calls = max_calls
        self.port: int | None = None
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> int:
        host = self.host.strip("[]")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, self.requested_port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
        except OSError as err:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port} for HTTP (is the port in use?): "
                          f"{err.strerror or err}") from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        return self.port

    def start(self) -> None:
        assert self._socket is not None, "bind() first"
        certificates = self.certificates
        config = uvicorn.Config(
            self.app, http=_H11WithClientCertificate, ws="none", lifespan="off", loop="asyncio",
            log_config=None, access_log=False, server_header=False,
            # Beyond this many connections or calls uvicorn answers 503 (our queue limit refuses work first).
            limit_concurrency=self.max_calls,
            ssl_context_factory=(lambda _config, _default: certificates.ssl_context()) if certificates else None)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its "server process" lines mislead here
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="palette-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start (see the log above)")
            time.sleep(0.01)

    def stop(self, grace: float) -> None:
        """Close the port; in-flight calls get `grace` seconds, then are cancelled."""
        if self._server is None:
            if self._socket is not None:
                self._socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(0.0, grace)
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(grace + 10)
        if self._thread.is_alive():
            log.warning("the HTTP server did not stop in time")
