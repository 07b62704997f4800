"""Palette's hook inside Ray Serve's gRPC proxy: what the contract needs that Serve's public API lacks.

Serve's gRPC proxy (ray[serve] 2.60) forwards each call to a replica and the replica's messages,
status code, details and trailing metadata back. It sends no initial metadata of the replica's, the
replica cannot see the client's deadline, a replica that raises loses its trailing metadata, a lost
replica shows as INTERNAL with Ray's traceback as the message, and grpc.health.v1 calls are routed to
replicas like any request (so they queue behind work). Serve calls every `grpc_servicer_functions`
entry as `fn(servicer, server)` inside each proxy process, in order, before the server starts;
`install`, listed first, wraps the proxy's handler factory so that every palette.v1.Palette call

  * reaches the replica with a valid `x-request-id` (the client's, or a new one; also Serve's
    `request_id`, so Serve's logs show the same id), the client's remaining deadline
    (`x-palette-deadline-ms`) and a mark that this hook is in front (`x-palette-proxy`);
  * sends the initial metadata `x-request-id` and `x-palette-replica` as soon as a replica has the
    call (the replica's first message is empty, `ATTACHED`, and never reaches the client);
  * ends with the replica's status, message and trailers: a replica that ends a stream with an error
    must raise, which loses its trailers, so it packs them into the status details (`pack_details`)
    and they are unpacked here;
  * ends UNAVAILABLE, not INTERNAL, when its replica was lost (retryable: seeds make a Generate
    idempotent), and never shows the client a Ray traceback.

`add_health` answers grpc.health.v1.Health in the proxy itself: SERVING while the proxy is not
draining and its router knows at least one running replica, whatever the replicas are busy with.

Both rely on private internals of Serve 2.60 (`missing_internals` names them; the `ray` extra pins
the minor release). Where one is missing, the hook logs one warning and leaves Serve's public
behaviour: no initial metadata, replica loss as INTERNAL, health routed to the replicas' own `Check`.
This module runs in the proxy, so it imports neither jax nor the rest of the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Callable, Iterable

import grpc

from palette.v1 import palette_pb2 as pb

from .errors import tolerant_deserializer
from .logs import request_id_from

log = logging.getLogger("ray.serve.palette")  # Serve's proxy log

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Palette"].full_name
REQUEST_ID_KEY = "x-request-id"
REPLICA_KEY = "x-palette-replica"
HOOK_KEY = "x-palette-proxy"  # the hook is in front: the replica may use ATTACHED and pack_details
DEADLINE_KEY = "x-palette-deadline-ms"  # the client's remaining time when the proxy took the call
SERVE_REQUEST_ID_KEY = "request_id"  # what Serve's proxy and logs call the request id
ATTACHED = b""  # a serialized empty response: the replica has the call (sent first, never forwarded)
_TRAILERS_MARK = "\n--palette-trailers--\n"
# How Serve 2.60 reports a replica that died under a call (RayActorError, ActorDiedError, ...).
_REPLICA_LOST = ("actor died", "actor is dead", "ActorDiedError", "ActorUnavailableError", "RayActorError",
                 "worker died", "node died", "OwnerDiedError")


def pack_details(message: str, trailers: Iterable[tuple[str, str]]) -> str:
    """Status details that carry trailing metadata through a raise (the hook unpacks them)."""
    return message + _TRAILERS_MARK + json.dumps([list(pair) for pair in trailers])


def unpack_details(details: str | bytes | None) -> tuple[str, list[tuple[str, str]] | None]:
    """(message, trailers) from `pack_details`' output; trailers None when nothing was packed."""
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    message, mark, packed = (details or "").partition(_TRAILERS_MARK)
    if not mark:
        return message, None
    try:
        return message, [(str(key), str(value)) for key, value in json.loads(packed)]
    except ValueError:  # cut short by Serve's 4 KiB limit on details
        return message, []


class ReplicaStatus(Exception):
    """What a replica raises once its call's status is set on the context (a stream cannot end with an
    error otherwise): Serve's proxy ends the call with that status. Defined here, a module the proxy
    has loaded anyway, because the proxy unpickles it."""


class _QuietReplicaStatuses(logging.Filter):
    """Serve logs every raise in a replica as an error with its traceback, in the replica and again in the
    proxy; a ReplicaStatus is the client's answer (INVALID_ARGUMENT, RESOURCE_EXHAUSTED ...), not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        for _ in range(8):  # gRPCStatusError -> RayTaskError -> ReplicaStatus
            if error is None:
                return True
            if isinstance(error, ReplicaStatus):
                return False
            error = (getattr(error, "original_exception", None) or getattr(error, "cause", None)
                     or error.__cause__)
        return True


def quiet_replica_statuses() -> None:
    """Leave ReplicaStatus out of Serve's error log in this process (a replica's, or a proxy's)."""
    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, _QuietReplicaStatuses) for f in serve_log.filters):
        serve_log.addFilter(_QuietReplicaStatuses())


# -- what the hook needs of Serve's internals ---------------------------------------------------------

def missing_internals(server: Any = None) -> list[str]:
    """The private parts of Ray Serve the hook uses that are not there (empty: all present). With
    `server` (the proxy's gRPCGenericServer) the instance is checked too, else only the classes."""
    missing = []
    try:
        from ray.serve._private.grpc_util import gRPCGenericServer
        from ray.serve._private.proxy import gRPCProxy
        from ray.serve._private.proxy_request_response import gRPCStreamingType
    except ImportError as err:
        return [f"import: {err}"]
    if {"UNARY_UNARY", "UNARY_STREAM", "STREAM_UNARY", "STREAM_STREAM"} - set(gRPCStreamingType.__members__):
        missing.append("gRPCStreamingType members")
    for cls, names in ((gRPCGenericServer, ("add_passthrough_service", "_override_method_handler")),
                       (gRPCProxy, ("service_handler_factory", "_is_draining"))):
        missing += [f"{cls.__name__}.{name}" for name in names if not callable(getattr(cls, name, None))]
    if server is not None:
        proxy = _proxy_of(server)
        if not isinstance(proxy, gRPCProxy):
            missing.append("gRPCGenericServer.service_handler_factory bound to the gRPCProxy")
        elif not isinstance(getattr(getattr(proxy, "proxy_router", None), "handles", None), dict):
            missing.append("gRPCProxy.proxy_router.handles")
    return missing


def _proxy_of(server: Any) -> Any:
    """The gRPCProxy whose handler factory the server calls (remembered once the hook replaced it)."""
    return getattr(server, "_palette_proxy", None) or getattr(server.service_handler_factory, "__self__", None)


_warned = False


def _usable(server: Any) -> bool:
    """Whether the hooks can work in this proxy; if not, one warning says so."""
    global _warned
    missing = missing_internals(server)
    if missing and not _warned:
        _warned = True
        log.warning("palette: the proxy hook is off: this Ray Serve lacks %s (palette[ray] pins ray[serve] 2.60); "
                    "serving with Serve's public behaviour: no initial metadata, no deadline for the replicas, "
                    "a lost replica as INTERNAL, health answered by the replicas", ", ".join(missing))
    return not missing


# -- the calls ----------------------------------------------------------------------------------------

class _Context:
    """The proxy's ServicerContext with the invocation metadata the replica should see."""

    def __init__(self, context: Any, metadata: tuple[tuple[str, str], ...]):
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Call:
    """One palette.v1.Palette call through this proxy."""

    def __init__(self, context: Any):
        self.context = context
        received = [(k, v) for k, v in context.invocation_metadata() or () if k not in (HOOK_KEY, DEADLINE_KEY)]
        self.request_id = request_id_from(received)
        metadata = [(k, v) for k, v in received if k != REQUEST_ID_KEY]
        metadata += [(REQUEST_ID_KEY, self.request_id), (HOOK_KEY, "1")]
        if not any(k == SERVE_REQUEST_ID_KEY for k, _ in metadata):
            metadata.append((SERVE_REQUEST_ID_KEY, self.request_id))
        remaining = context.time_remaining()
        if remaining is not None:
            metadata.append((DEADLINE_KEY, str(max(0, int(remaining * 1000)))))
        self.forwarded = _Context(context, tuple(metadata))
        self.initial_sent = False

    async def send_initial_metadata(self) -> None:
        """x-request-id, and x-palette-replica once a replica has set it (in its trailing metadata)."""
        if self.initial_sent:
            return
        self.initial_sent = True
        replicas = [v for k, v in self.context.trailing_metadata() or () if k == REPLICA_KEY]
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),)
                                                 + (((REPLICA_KEY, replicas[-1]),) if replicas else ()))

    def finish(self) -> None:
        """Turn the status Serve's proxy set into the contract's."""
        context = self.context
        message, trailers = unpack_details(context.details())
        if trailers is not None:  # the replica's own failure
            context.set_details(message)
            keys = {k for k, _ in trailers}
            kept = [(k, v) for k, v in context.trailing_metadata() or () if k not in keys]
            context.set_trailing_metadata(tuple(kept + trailers))
        elif context.code() == grpc.StatusCode.INTERNAL:  # Ray's: never show its traceback
            if any(sign in message for sign in _REPLICA_LOST):
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(f"the replica serving this call was lost (request id {self.request_id}); "
                                    f"retry: another replica takes it")
            else:
                log.warning("palette: request %s failed in Ray Serve: %s", self.request_id, message[:2000])
                context.set_details(f"internal error in Ray Serve (request id {self.request_id}); "
                                    f"the Ray Serve logs have the details")


def _streaming(handler: Callable) -> Callable:
    # A coroutine that writes each message itself, not an async generator that gRPC drives: a client's
    # cancel (or deadline) then reaches this frame even while a message is being written, and
    # `_cancel_replica_call` still cancels the replica's work. A generator would be left suspended
    # there, and Serve cancels the replica's call only when a cancel finds its proxy waiting for the
    # replica's next message (so without the hook, too, some cancels never reach a replica).
    async def call(request: Any, context: Any) -> None:
        palette_call = _Call(context)
        messages = handler(request, palette_call.forwarded).__aiter__()
        first = True
        async for message in messages:
            await palette_call.send_initial_metadata()
            if not (first and message == ATTACHED):
                try:
                    await context.write(message)
                except asyncio.CancelledError:
                    await _cancel_replica_call(messages)
                    raise
            first = False
        palette_call.finish()
        await palette_call.send_initial_metadata()

    return call


async def _cancel_replica_call(messages: Any) -> None:
    """Run Serve's handler on until it waits for the replica's next message, then cancel it there:
    that is where Serve's proxy cancels the replica's call."""
    for _ in range(10_000):
        step = asyncio.ensure_future(messages.__anext__())
        await asyncio.sleep(0)  # one turn: it runs until it waits
        if step.done():
            if step.cancelled() or step.exception() is not None:  # StopAsyncIteration: the call is over
                return
            continue  # a message that was ready: the client is gone, drop it
        step.cancel()
        try:
            await step
        except BaseException:  # noqa: BLE001 - Serve turns the cancel into a status, or re-raises it
            pass
        return


def _unary(handler: Callable) -> Callable:
    async def call(request: Any, context: Any) -> bytes:
        palette_call = _Call(context)
        response = await handler(request, palette_call.forwarded)
        palette_call.finish()
        await palette_call.send_initial_metadata()
        return response

    return call


def install(_servicer: Any, server: Any) -> None:
    """A `grpc_servicer_functions` entry; must come before the Palette servicer's."""
    if getattr(server, "_palette_hook", False) or not _usable(server):
        return
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    streaming = {gRPCStreamingType.UNARY_STREAM, gRPCStreamingType.STREAM_STREAM}
    original = server.service_handler_factory

    def factory(service_method: str, streaming_type: Any) -> Callable:
        handler = original(service_method=service_method, streaming_type=streaming_type)
        if not service_method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        return (_streaming if streaming_type in streaming else _unary)(handler)

    server._palette_proxy = original.__self__
    server.service_handler_factory = factory
    server._palette_hook = True
    quiet_replica_statuses()
    log.info("palette: proxy hook installed")


def add_service(servicer: Any, server: Any) -> None:
    """A `grpc_servicer_functions` entry: palette.v1.Palette, whose messages a replica receives decoded,
    or as `Undecodable` (INVALID_ARGUMENT there once it knows who called, as in the gRPC servicer)
    rather than the proxy failing the call UNKNOWN."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name), request_deserializer=tolerant_deserializer(getattr(pb, method.input_type.name)))
        for method in pb.DESCRIPTOR.services_by_name["Palette"].methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# -- health -------------------------------------------------------------------------------------------

def _running_replicas(handle: Any) -> int:
    """How many running replicas the proxy's router for this ingress deployment can route to."""
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    request_router = getattr(router, "_request_router", None)
    if request_router is not None:
        return len(request_router.curr_replicas)
    if router is not None and hasattr(router, "_running_replicas"):
        return len(router._running_replicas or ())
    return int(handle.running_replicas_populated())  # public, but never goes back to False


def add_health(servicer: Any, server: Any) -> None:
    """A `grpc_servicer_functions` entry: grpc.health.v1.Health answered by this proxy. Without the
    internals it needs, the Health service is routed to the replicas (their `Check` and `Watch`)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not _usable(server):
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return
    proxy = _proxy_of(server)
    Status = health_pb2.HealthCheckResponse

    def status(service: str) -> int:
        if service not in ("", SERVICE_NAME):
            return Status.SERVICE_UNKNOWN
        ready = not proxy._is_draining() and any(
            _running_replicas(handle) > 0 for handle in list(proxy.proxy_router.handles.values()))
        return Status.SERVING if ready else Status.NOT_SERVING

    class ProxyHealth(health_pb2_grpc.HealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            answer = status(request.service)
            if answer == Status.SERVICE_UNKNOWN:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            return Status(status=answer)

        async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
            last = None
            while True:
                answer = status(request.service)
                if answer != last:
                    yield Status(status=answer)
                    last = answer
                await asyncio.sleep(1.0)

    server.add_passthrough_service(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    health_pb2_grpc.add_HealthServicer_to_server(ProxyHealth(), server)
