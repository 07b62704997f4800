"""The gRPC transport: the Palette service, health and reflection on one port, over PaletteCore.

This adapter authenticates the call, decodes its messages (a message that does not decode is the
client's fault: INVALID_ARGUMENT, never INTERNAL), hands the work to the core and writes what comes
back, turning RpcFailures into status codes and trailing metadata. No model math and no RPC logic
of its own: the Connect/HTTP app and the Ray deployment sit on the same core.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from palette.stages.pipeline import Pipeline
from palette.v1 import palette_pb2 as pb

from .auth import Authenticator, Caller
from .core import SERVICE_NAME, CallRecord, CoreConfig, PaletteCore, rank_image
from .errors import RpcFailure
from .errors import decoded
from .errors import tolerant_deserializer as _deserializer
from .logs import request_id_from
from .metrics import Metrics
from .tls import CertificateFiles

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1."
UNAUTHENTICATED_CALLER = Caller("unauthenticated")


class ConfigError(ValueError):
    """The server cannot start with these settings; the message says which flag to change."""


@dataclasses.dataclass
class ServerConfig(CoreConfig):
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (PaletteServer.port says which)
    metrics_port: int | None = 9464  # Prometheus /metrics; None = off, 0 = any free port
    http_port: int | None = None  # Connect, gRPC-Web and the web page (http_app.py); None = off, 0 = any free port
    grace_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    warmup: bool = True  # compile the common shapes before listening
    max_workers: int = 0  # RPC threads; 0 = enough for a full queue plus the running requests
    # Transport security and identities.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # require client certificates signed by this CA (mTLS)
    auth_tokens: str | None = None  # token file: name:token[:weight] per line
    insecure: bool = False  # allow plaintext on a non-loopback address (behind a mesh that does TLS)
    # Abuse limits of the transport.
    max_message_bytes: int = 33 * 1024 * 1024  # largest message a client may send (RankImages holds all)
    max_streams_per_connection: int = 64  # concurrent calls one HTTP/2 connection may open
    keepalive_s: float = 60.0  # ping idle clients this often, drop them when they stop answering
    min_client_ping_interval_s: float = 10.0  # clients pinging more often than this get disconnected

    def check(self) -> None:
        """ConfigError when these settings would be unsafe or cannot work."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
                              "inside TLS")
        if not self.tls_cert and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"refusing to serve plaintext on {self.host}, which is not a loopback address: "
                              f"give --tls-cert and --tls-key (and --auth-tokens or --tls-client-ca to know "
                              f"who calls), or pass --insecure if a proxy or mesh in front of it does TLS")
        if self.max_message_bytes < self.max_rank_image_bytes + 1024:
            raise ConfigError(f"--max-message-bytes ({self.max_message_bytes}) must exceed the largest Rank image "
                              f"({self.max_rank_image_bytes} bytes) plus room for the message around it")
        if self.max_queued_per_caller < 0 or self.max_queued_requests < 1:
            raise ConfigError("--max-queue must be >= 1 and --max-queue-per-caller >= 0")

    def authenticator(self) -> Authenticator:
        return Authenticator(self.auth_tokens, client_certificates=bool(self.tls_client_ca))

    def certificates(self) -> CertificateFiles | None:
        return CertificateFiles(self.tls_cert, self.tls_key, self.tls_client_ca) if self.tls_cert else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def certificate_subject(context: grpc.ServicerContext) -> str | None:
    """The verified client certificate's subject (mTLS), or its common name on older gRPC builds."""
    auth = context.auth_context() or {}
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            value = values[0]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def caller_of(authenticator: Authenticator, context: grpc.ServicerContext) -> Caller:
    """Who is calling, or Unauthenticated."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    subject = certificate_subject(context) if authenticator.client_certificates else None
    return authenticator.authenticate(values, subject)


class _GrpcCall:
    """A gRPC call's bracket around a CallRecord: authenticates, echoes x-request-id, and counts the
    call as finished when gRPC says it ended, however it ended."""

    def __init__(self, servicer: "PaletteServicer", method: str, context: grpc.ServicerContext):
        self.context = context
        request_id = request_id_from(context.invocation_metadata())
        failure = None
        try:
            caller = caller_of(servicer.authenticator, context)
        except RpcFailure as err:
            caller, failure = UNAUTHENTICATED_CALLER, err
        self.record: CallRecord = servicer.core.begin(method, request_id, caller)
        # Registered before anything can raise, so the call is counted as finished whatever happens.
        if not context.add_callback(self._terminated):
            self._terminated()
        try:
            context.send_initial_metadata((("x-request-id", request_id),))
        except Exception:  # noqa: BLE001 - the client is already gone; the callback ends the record
            pass
        if failure is not None:
            self.fail(failure)
            raise _Refused

    def _terminated(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.record.finish(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)

    def ok(self) -> None:
        self.record.ok()

    def fail(self, failure: RpcFailure) -> None:
        if self.record.code is None and not self.context.is_active():
            return  # already over (cancelled / deadline): the callback records how
        self.record.fail(failure)
        if failure.trailers:
            self.context.set_trailing_metadata(failure.trailers)
        self.context.set_code(failure.code)
        self.context.set_details(failure.message)

    def internal(self) -> None:
        if self.context.is_active():
            self.fail(self.record.internal())


class _Refused(Exception):
    """Authentication failed; the call's status is already set."""


class PaletteServicer:
    """palette.v1.Palette over gRPC, as thin as it can be: the core does the work."""

    def __init__(self, core: PaletteCore, authenticator: Authenticator):
        self.core = core
        self.authenticator = authenticator

    def _call(self, method: str, context: grpc.ServicerContext) -> _GrpcCall | None:
        try:
            return _GrpcCall(self, method, context)
        except _Refused:
            return None

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        call = self._call("Generate", context)
        if call is None:
            return
        try:
            job = self.core.start_generate(decoded(request), call.record)
        except RpcFailure as failure:
            call.fail(failure)
            return
        except Exception:  # noqa: BLE001
            call.internal()
            return
        if not context.add_callback(lambda: self.core.cancel(job)):
            self.core.cancel(job)
        try:
            yield from self.core.generate_responses(job, call.record)
        except RpcFailure as failure:
            call.fail(failure)

    def Rank(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[pb.RankResponse]:
        call = self._call("Rank", context)
        if call is None:
            return
        session = None
        try:
            session = self.core.start_rank_stream(decoded(next(request_iterator, None)), call.record)
            # A reader thread takes images in while this one streams scores out, so scores flow
            # back as soon as each batch is scored, even while the client is still sending.
            threading.Thread(target=session.read_all, args=(_rank_images(request_iterator),),
                             name=f"palette-rank-{call.record.request_id}", daemon=True).start()
            yield from session.responses(context.is_active)
        except RpcFailure as failure:
            call.fail(failure)
        except Exception:  # noqa: BLE001
            call.internal()
        finally:
            if session is not None:
                session.closed.set()

    def RankImages(self, request: Any, context: grpc.ServicerContext) -> pb.RankImagesResponse:
        return self._unary("RankImages", request, context, self.core.rank_images, pb.RankImagesResponse)

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> pb.ModelInfo:
        return self._unary("GetModelInfo", request, context, lambda _request, _call: self.core.model_info(),
                           pb.ModelInfo)

    def _unary(self, method: str, request: Any, context: grpc.ServicerContext, work: Callable[[Any, CallRecord], Any],
               empty: Any) -> Any:
        call = self._call(method, context)
        if call is None:
            return empty()
        try:
            reply = work(decoded(request), call.record)
        except RpcFailure as failure:
            call.fail(failure)
            return empty()
        except Exception:  # noqa: BLE001
            call.internal()
            return empty()
        call.ok()
        call.record.finish()  # counted before the reply leaves, so a caller that has it sees it counted
        return reply

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers, each with a deserializer that reports bad bytes instead of raising."""
        serialize = lambda message: message.SerializeToString()  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, _deserializer(pb.GenerateRequest), serialize),
            "Rank": grpc.stream_stream_rpc_method_handler(self.Rank, _deserializer(pb.RankRequest), serialize),
            "RankImages": grpc.unary_unary_rpc_method_handler(
                self.RankImages, _deserializer(pb.RankImagesRequest), serialize),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, _deserializer(pb.GetModelInfoRequest), serialize),
        })


def _rank_images(request_iterator: Iterator[Any]) -> Iterator[bytes]:
    for position, message in enumerate(request_iterator, start=1):
        yield rank_image(position, decoded(message))


class _AuthInterceptor(grpc.ServerInterceptor):
    """Reflection (and anything else on the port but health) needs what the Palette service needs.
    The Palette handlers authenticate themselves, where the identity is used; health stays open for
    load balancers."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if (handler is None or not self.authenticator.required or details.method.startswith(HEALTH_PREFIX)
                or details.method.startswith(f"/{SERVICE_NAME}/")):
            return handler

        def guard(behavior: Callable) -> Callable:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    caller_of(self.authenticator, context)
                except RpcFailure as failure:
                    context.abort(failure.code, failure.message)
                return behavior(request, context)
            return guarded

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(**{k: guard(getattr(handler, k)) for k in kinds if getattr(handler, k)})


class PaletteServer:
    """The Palette service, health and reflection on one port, plus /metrics on another."""

    def __init__(self, pipeline: Pipeline, config: ServerConfig | None = None):
        self.pipeline = pipeline
        self.config = config = config or ServerConfig()
        config.check()
        self.authenticator = config.authenticator()
        self.certificates = config.certificates()
        self.metrics = Metrics(pipeline.sampler.num_slots)
        self.core = PaletteCore(pipeline, config, self.metrics)
        workers = config.max_workers or config.max_queued_requests + 2 * pipeline.sampler.num_slots + 16
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="palette-rpc"),
            interceptors=[_AuthInterceptor(self.authenticator)],
            # Beyond this many concurrent calls gRPC itself answers RESOURCE_EXHAUSTED instead of queueing
            # them behind busy threads (our own queue limit normally refuses work well before that).
            maximum_concurrent_rpcs=workers,
            options=grpc_server_options(config))
        self.servicer = PaletteServicer(self.core, self.authenticator)
        self._grpc.add_generic_rpc_handlers((self.servicer.handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc)
        self._http = None
        if config.http_port is not None:
            from .http_app import HttpServer

            self._http = HttpServer(self.core, self.authenticator, self.certificates, config, max_calls=workers)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._stopped = False

    @property
    def batcher(self):
        return self.core.batcher

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "PaletteServer":
        # Bind first, so a port in use is reported at once rather than after the warm-up.
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.certificates is not None:
                self.port = self._grpc.add_secure_port(address, self.certificates.grpc_credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {address} (is the port in use?): {err}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address} (is the port in use?)")
        if self._http is not None:
            self.http_port = self._http.bind()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        if self.config.warmup:
            started = time.monotonic()
            self.pipeline.warmup(self.config.rank_batch)
            log.info("warm-up done", extra={"seconds": round(time.monotonic() - started, 2)})
        self.core.start()
        self._grpc.start()
        if self._http is not None:
            self._http.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": self.address, "metrics_port": self.metrics_port,
                                   "http_port": self.http_port, "tls": self.certificates is not None,
                                   "client_certificates": bool(self.config.tls_client_ca),
                                   "tokens": self.authenticator.token_file is not None})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful drain: refuse new work, give in-flight requests `grace` seconds, then cancel and exit."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("draining", extra={"grace_s": grace, "in_flight": self.core.inflight})
        # New work is refused with UNAVAILABLE by our handlers (a clear, retryable answer) while the
        # port stays open for the in-flight streams; the port closes once they are done or the grace ends.
        self.core.stop_accepting()
        self.health.enter_graceful_shutdown()
        self.core.wait_idle(grace)
        if self._http is not None:
            self._http.stop(max(0.0, deadline - time.monotonic()))
        self._grpc.stop(max(0.0, deadline - time.monotonic())).wait()
        self.core.stop()
        self.metrics.close()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)

    def __enter__(self) -> "PaletteServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=0)


def grpc_server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Find clients that vanished without closing, and refuse clients that ping to keep a server busy.
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
