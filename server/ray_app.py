"""The Ray Serve transport: palette.v1.Palette on many replicas, each a whole Palette pipeline.

`PaletteReplica` is a Serve deployment and, like the gRPC servicer, an adapter over PaletteCore:
it authenticates the call, hands the work to the core and turns RpcFailures into status codes,
messages and trailers. Each replica builds the same pipeline, device state and continuous batching
as `palette serve` (warmed up before Serve routes to it), and Serve's gRPC proxy routes each call to
a replica by load. `server/ray_proxy.py` runs in that proxy and adds what Serve's public API lacks
(initial metadata, the client's deadline, replica loss as UNAVAILABLE, health in the proxy).

`build_app(args)` makes the application; it is the `import_path` of deploy/serve_config.yaml and
what `palette serve --ray` deploys. A call's way: client -> a node's Serve gRPC proxy (the hook
adds x-request-id, the deadline, its mark) -> Serve's router picks a replica -> PaletteReplica
method -> PaletteCore; messages come back the same way, the first one empty (`ATTACHED`) so the
hook sends the initial metadata at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import tomllib
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from palette.stages.pipeline import default_config_path
from palette.v1 import palette_pb2 as pb

from . import logs
from .auth import Authenticator
from .core import CallRecord, CoreConfig, PaletteCore, RankSession, rank_image
from .errors import Cancelled, RpcFailure, decoded
from .main import load_pipeline
from .ray_proxy import (ATTACHED, DEADLINE_KEY, HOOK_KEY, REPLICA_KEY, REQUEST_ID_KEY, ReplicaStatus, pack_details,
                        quiet_replica_statuses)
from .service import UNAUTHENTICATED_CALLER, caller_of

log = logging.getLogger(__name__)

APP_NAME = "palette"
ROUTE_PREFIX = "/palette"  # never None: Serve's gRPC proxy cannot reach an application without one
DEPLOYMENT_NAME = "Palette"
PROXY_LOCATION = "EveryNode"  # a gRPC proxy on every node, so that losing one node loses one entry point
# Palette's replicas log one JSON `finished` line per call themselves: no access log of Serve's.
LOGGING = dict(encoding="JSON", log_level="INFO", enable_access_log=False)
# Serve's grpc_options.grpc_servicer_functions, in this order: the hook wraps what is registered after it.
SERVICER_FUNCTIONS = (
    "palette.server.ray_proxy.install",
    "palette.server.ray_proxy.add_health",
    "palette.server.ray_proxy.add_service",
)
HEALTH = health_pb2.HealthCheckResponse
# A proxy cancels a call about 10 ms after the client's deadline; one cancelled this close to the
# deadline the replica knew counts as DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.1


@dataclasses.dataclass
class AppArgs:
    """`build_app`'s arguments: the `args` of the application in a Serve config file."""

    # What each replica runs, as `palette serve` would.
    config: str | None = None  # pipeline TOML, readable on every node; None: the embedded default
    pipeline: dict = dataclasses.field(default_factory=dict)  # stage option overrides: num_slots, chunk_steps
    core: dict = dataclasses.field(default_factory=dict)  # CoreConfig fields: queue and Rank limits
    auth_tokens: str | None = None  # token file, readable on every node
    warmup: bool = True  # compile before Serve routes to the replica
    log_format: str = "json"
    # How many replicas, and what each may take.
    replicas: int = 1  # fixed count, unless min_replicas / max_replicas differ
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica; default: its sampler rows
    autoscaling: dict = dataclasses.field(default_factory=dict)  # more AutoscalingConfig fields
    max_ongoing_requests: int | None = None  # default: the Generate queue plus 64 (Palette's queue refuses first)
    max_replicas_per_node: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    grace_s: float = 30.0  # a stopping replica's in-flight calls may take this long
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0

    @classmethod
    def of(cls, args: dict | None) -> "AppArgs":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args or {}) - set(names))
        if unknown:
            raise ValueError(f"unknown Palette application args {unknown}; known: {', '.join(names)}")
        made = cls(**(args or {}))
        CoreConfig(**made.core)  # a misspelt limit fails here, not in every replica
        return made

    @property
    def rows(self) -> int:
        """The replicas' sampler rows: the override, else the pipeline config's (as the replicas will load it)."""
        if self.pipeline.get("num_slots"):
            return int(self.pipeline["num_slots"])
        path = self.config or default_config_path()
        try:
            with open(path, "rb") as f:
                stages = tomllib.load(f).get("stages", [])
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read the pipeline config {path}: {err}") from None
        return next((int(stage["num_slots"]) for stage in stages if "num_slots" in stage), 8)

    def deployment_options(self) -> dict[str, Any]:
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        if not 0 < low <= high:
            raise ValueError(f"replicas: need 1 <= min_replicas <= max_replicas, got {low} and {high}")
        queue = CoreConfig(**self.core).max_queued_requests
        options: dict[str, Any] = dict(
            max_ongoing_requests=self.max_ongoing_requests or queue + 64,
            graceful_shutdown_timeout_s=self.grace_s,
            health_check_period_s=self.health_check_period_s, health_check_timeout_s=self.health_check_timeout_s,
            ray_actor_options={"num_cpus": self.num_cpus, "num_gpus": self.num_gpus})
        if self.max_replicas_per_node:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if low == high:
            options["num_replicas"] = low
        else:
            options["autoscaling_config"] = dict(
                min_replicas=low, max_replicas=high, initial_replicas=low,
                target_ongoing_requests=self.target_ongoing_requests or self.rows, **self.autoscaling)
        return options

    def replica_settings(self) -> dict[str, Any]:
        return dict(config=self.config, pipeline=dict(self.pipeline), core=dataclasses.asdict(CoreConfig(**self.core)),
                    auth_tokens=self.auth_tokens, warmup=self.warmup, log_format=self.log_format)


def build_app(args: dict | None = None) -> serve.Application:
    """The Palette application (Serve's `import_path: palette.server.ray_app:build_app`)."""
    app = AppArgs.of(args)
    return PaletteReplica.options(**app.deployment_options()).bind(app.replica_settings())


class _Call:
    """One RPC on this replica: its CallRecord, trailers and deadline; ends failures as statuses."""

    def __init__(self, replica: "PaletteReplica", method: str, context: RayServegRPCContext):
        self.context = context
        metadata = list(context.invocation_metadata() or ())
        self.hooked = any(k == HOOK_KEY for k, _ in metadata)  # the proxy hook is in front
        self.request_id = logs.request_id_from(metadata)
        self.deadline = None  # monotonic seconds, from the deadline the client gave the proxy
        for key, value in metadata:
            if key == DEADLINE_KEY and self.hooked and value.isdigit():
                self.deadline = time.monotonic() + int(value) / 1000
        self.trailers = ((REQUEST_ID_KEY, self.request_id), (REPLICA_KEY, replica.replica_id))
        context.set_trailing_metadata(list(self.trailers))  # the hook sends these as initial metadata
        self.refused: RpcFailure | None = None
        try:
            caller = caller_of(replica.authenticator, context)
        except RpcFailure as failure:
            caller, self.refused = UNAUTHENTICATED_CALLER, failure
        self.record: CallRecord = replica.core.begin(method, self.request_id, caller)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S

    def set_status(self, failure: RpcFailure) -> None:
        if isinstance(failure, Cancelled) and self.expired():
            failure = RpcFailure("Deadline Exceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
        self.record.fail(failure)
        trailers = self.trailers + tuple(failure.trailers)
        self.context.set_trailing_metadata(list(trailers))
        self.context.set_code(failure.code)
        self.context.set_details(pack_details(failure.message, trailers) if self.hooked else failure.message)

    @contextlib.contextmanager
    def failures(self, stream: bool) -> Iterator[None]:
        """Any failure of the body as this call's status; a stream's is then raised as ReplicaStatus."""
        try:
            if self.refused is not None:
                raise self.refused
            yield
        except RpcFailure as failure:
            self.set_status(failure)
        except Exception:  # noqa: BLE001 - logged with its traceback; the client gets the request id
            self.set_status(self.record.internal())
        else:
            return
        if stream:
            raise ReplicaStatus(self.record.code.name)

    @contextlib.contextmanager
    def deadline_timer(self, expire: Callable[[], None]) -> Iterator[None]:
        """Call `expire` at the deadline, should the proxy not have cancelled the call by then."""
        timer = None
        if self.deadline is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, self.deadline - time.monotonic()), expire)
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()

    def finish(self) -> None:
        self.record.finish(grpc.StatusCode.DEADLINE_EXCEEDED if self.expired() else grpc.StatusCode.CANCELLED)


@serve.deployment(name=DEPLOYMENT_NAME)
class PaletteReplica:
    """One whole Palette pipeline as a Serve replica; each RPC method is named as in the proto."""

    def __init__(self, settings: dict[str, Any]):
        logs.configure(settings.get("log_format", "json"))
        quiet_replica_statuses()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        pipeline = load_pipeline(settings.get("config"), **settings.get("pipeline", {}))
        config = CoreConfig(**settings.get("core", {}))
        self.authenticator = Authenticator(settings.get("auth_tokens"))
        self.core = PaletteCore(pipeline, config)
        if settings.get("warmup", True):
            started = time.monotonic()
            pipeline.warmup(config.rank_batch)
            log.info("warm-up done", extra={"seconds": round(time.monotonic() - started, 2)})
        self.core.start()
        log.info("replica ready", extra={"replica": self.replica_id})

    def _call(self, method: str, context: RayServegRPCContext) -> _Call:
        return _Call(self, method, context)

    # -- palette.v1.Palette ------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
        call = self._call("Generate", grpc_context)
        if call.hooked:
            yield pb.GenerateResponse.FromString(ATTACHED)
        job = None
        try:
            with call.failures(stream=True):
                job = self.core.start_generate(decoded(request), call.record)
                with call.deadline_timer(lambda: self.core.cancel(job)):
                    async for message in self.core.agenerate_responses(job, call.record):
                        yield message
        finally:  # also when the proxy cancels the call (client gone, deadline): the rows are freed
            if job is not None and not job.ended:
                self.core.cancel(job)
            call.finish()

    async def Rank(self, request_stream: gRPCInputStream,
                   grpc_context: RayServegRPCContext) -> AsyncIterator[pb.RankResponse]:
        call = self._call("Rank", grpc_context)
        if call.hooked:
            yield pb.RankResponse.FromString(ATTACHED)
        session = reader = None
        try:
            with call.failures(stream=True):
                first = decoded(await anext(request_stream, None))
                session = self.core.start_rank_stream(first, call.record)
                # Images are read in while scores stream out, as the gRPC servicer's reader thread does.
                reader = asyncio.create_task(self._read_images(session, request_stream))
                with call.deadline_timer(lambda: session.abort(Cancelled("cancelled"))):
                    async for message in session.aresponses():
                        yield message
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                session.closed.set()
            call.finish()

    async def _read_images(self, session: RankSession, request_stream: gRPCInputStream) -> None:
        try:
            position = 0
            async for message in request_stream:
                position += 1
                if session.closed.is_set():
                    return
                await asyncio.to_thread(session.add, rank_image(position, decoded(message)))  # decodes: off the loop
            session.finish()
        except RpcFailure as failure:
            session.abort(failure)
        except Exception:  # noqa: BLE001 - the request stream failed
            session.abort(self.core.source_failure(session.call))

    async def RankImages(self, request: pb.RankImagesRequest,
                         grpc_context: RayServegRPCContext) -> pb.RankImagesResponse:
        return await self._unary("RankImages", grpc_context, pb.RankImagesResponse,
                                 lambda call: asyncio.to_thread(self.core.rank_images, decoded(request), call.record))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           grpc_context: RayServegRPCContext) -> pb.ModelInfo:
        async def info(_call: _Call) -> pb.ModelInfo:
            decoded(request)
            return self.core.model_info()

        return await self._unary("GetModelInfo", grpc_context, pb.ModelInfo, info)

    async def _unary(self, method: str, context: RayServegRPCContext, empty: Any, work: Callable) -> Any:
        call = self._call(method, context)
        reply = empty()
        try:
            with call.failures(stream=False):
                reply = await work(call)
                call.record.ok()
            return reply
        finally:
            call.finish()

    # -- grpc.health.v1.Health, when the proxy cannot answer it itself (see ray_proxy.add_health) ---

    def _health(self, service: str) -> int:
        if service not in ("", pb.DESCRIPTOR.services_by_name["Palette"].full_name):
            return HEALTH.SERVICE_UNKNOWN
        return HEALTH.SERVING if self.core.batcher.accepting and self.core.batcher.alive() else HEALTH.NOT_SERVING

    def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext) -> HEALTH:
        status = self._health(request.service)
        if status == HEALTH.SERVICE_UNKNOWN:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return HEALTH()
        return HEALTH(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest) -> AsyncIterator[HEALTH]:
        last = None
        while True:
            status = self._health(request.service)
            if status != last:
                yield HEALTH(status=status)
                last = status
            await asyncio.sleep(1.0)

    # -- Serve's side ----------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve's periodic replica check: a replica whose batcher stopped is replaced."""
        if not self.core.batcher.alive():
            raise RuntimeError("the batcher's threads stopped")

    def stats(self) -> dict[str, Any]:
        """What this replica's /metrics would show (Palette's Prometheus metrics are not served through
        Ray): for operators with a Serve handle, and for the tests."""
        codes: dict[str, float] = {}
        for family in self.core.metrics.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['method']}:{sample.labels['code']}"
                    codes[key] = codes.get(key, 0) + sample.value
        return dict(replica=self.replica_id, node=ray.get_runtime_context().get_node_id(),
                    occupied_slots=self.core.batcher.occupied_slots(),
                    inflight=self.core.inflight, requests=codes)

    def __del__(self) -> None:
        """Serve stops the replica after its in-flight calls finished (or grace_s passed)."""
        core = getattr(self, "core", None)
        if core is not None:
            core.stop_accepting()
            core.stop()
