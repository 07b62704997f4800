"""The gRPC service: validate, hand work to the batcher, stream what comes back. No model math here."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from importlib import metadata
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from palette.stages.pipeline import Pipeline
from palette.v1 import palette_pb2 as pb
from palette.v1 import palette_pb2_grpc as pb_grpc

from .batcher import Batcher, BatcherConfig, End, GenerateJob
from .errors import InvalidArgument, RpcFailure, Unavailable
from .images import load_upload
from .logs import request_id_from
from .metrics import Metrics
from .validation import check_prompt, parse_generate

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Palette"].full_name


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (PaletteServer.port says which)
    metrics_port: int | None = 9464  # Prometheus /metrics; None = off, 0 = any free port
    max_queued_requests: int = 64
    max_wait_ms: float = 10.0
    rank_batch: int = 8
    max_rank_images: int = 1024
    max_rank_image_bytes: int = 16 * 1024 * 1024
    max_rank_image_pixels: int = 4096 * 4096
    grace_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    warmup: bool = True  # compile the common shapes before listening
    max_workers: int = 0  # RPC threads; 0 = enough for a full queue plus the running requests


class _Call:
    """Per-RPC bookkeeping: request id, the final status for metrics and the log."""

    def __init__(self, method: str, context: grpc.ServicerContext, metrics: Metrics, inflight: "_Counter"):
        self.method = method
        self.inflight = inflight
        inflight.add(1)
        self.context = context
        self.metrics = metrics
        self.start = time.monotonic()
        self.code: grpc.StatusCode | None = None
        self.closed = threading.Event()  # the handler has returned
        self.request_id = request_id_from(context.invocation_metadata())
        context.send_initial_metadata((("x-request-id", self.request_id),))
        if not context.add_callback(self._terminated):
            self._terminated()

    def _terminated(self) -> None:
        self.inflight.add(-1)
        code = self.code
        if code is None:  # the RPC ended before the handler decided: the client left or the deadline passed
            remaining = self.context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
        seconds = time.monotonic() - self.start
        self.metrics.requests.labels(self.method, code.name).inc()
        self.metrics.latency.labels(self.method).observe(seconds)
        log.info("%s finished: %s", self.method, code.name,
                 extra={"request_id": self.request_id, "method": self.method, "code": code.name,
                        "ms": round(1000 * seconds, 1)})

    def ok(self) -> None:
        self.code = grpc.StatusCode.OK

    def fail(self, failure: RpcFailure) -> None:
        if self.code is None and not self.context.is_active():
            return  # already over (cancelled / deadline); nothing to tell
        self.code = failure.code
        if failure.trailers:
            self.context.set_trailing_metadata(failure.trailers)
        self.context.set_code(failure.code)
        self.context.set_details(failure.message)
        log.info("%s refused: %s", self.method, failure.message,
                 extra={"request_id": self.request_id, "code": failure.code.name})

    def internal(self) -> None:
        """An unexpected exception: logged with its traceback here, never sent to the client."""
        if not self.context.is_active():
            return
        log.exception("%s failed", self.method, extra={"request_id": self.request_id})
        self.fail(RpcFailure(f"internal error (request id {self.request_id}); the server log has the details"))


class _Counter:
    def __init__(self):
        self._value = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self._value += delta

    @property
    def value(self) -> int:
        return self._value


class PaletteServicer(pb_grpc.PaletteServicer):
    def __init__(self, pipeline: Pipeline, batcher: Batcher, config: ServerConfig, metrics: Metrics):
        self.pipeline = pipeline
        self.batcher = batcher
        self.config = config
        self.metrics = metrics
        self.inflight = _Counter()  # RPCs started and not yet ended

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        call = _Call("Generate", context, self.metrics, self.inflight)
        try:
            spec = parse_generate(request, self.pipeline)
            job = GenerateJob(call.request_id, spec, self.pipeline.limits.image_length)
            self.batcher.submit(job)
        except RpcFailure as failure:
            call.fail(failure)
            return
        except Exception:  # noqa: BLE001
            call.internal()
            return
        if not context.add_callback(lambda: self.batcher.cancel(job)):
            self.batcher.cancel(job)
        log.info("Generate accepted", extra={
            "request_id": call.request_id, "num_images": job.num_images, "rank": spec.rank,
            "seeds": [p.seed for p in spec.params][:4], "prompt_chars": len(spec.prompt)})
        while True:
            item = job.events.get()
            if isinstance(item, End):
                if item.failure is None:
                    call.ok()
                elif context.is_active():
                    call.fail(item.failure)
                return
            yield item

    def Rank(self, request_iterator: Iterator[pb.RankRequest],
             context: grpc.ServicerContext) -> Iterator[pb.RankResponse]:
        call = _Call("Rank", context, self.metrics, self.inflight)
        batches: queue.Queue[Any] = queue.Queue()
        scores: dict[int, float] = {}
        try:
            if not self.batcher.accepting:
                raise Unavailable("the server is shutting down; retry in a moment or on another replica")
            if not self.pipeline.has_ranker:
                raise RpcFailure("this server's pipeline has no ranker stage, so it cannot rank",
                                 grpc.StatusCode.FAILED_PRECONDITION)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("item") != "prompt":
                raise InvalidArgument("the first Rank message must carry the prompt; then send one image per message")
            prompt = first.prompt
            check_prompt(self.pipeline, prompt)
            # A reader thread takes images in while this one streams scores out, so scores flow
            # back as soon as each batch is scored, even while the client is still sending.
            reader = threading.Thread(target=self._read_images, args=(prompt, request_iterator, batches, call),
                                      name=f"palette-rank-{call.request_id}", daemon=True)
            reader.start()
            while True:
                item = batches.get()
                if isinstance(item, RpcFailure):
                    raise item
                if item is None:
                    break
                yield from self._scores(item, scores, context)
            ranked = sorted(scores, key=lambda i: (-scores[i], i))
            call.ok()
            yield pb.RankResponse(done=pb.RankDone(ranked_indices=ranked, request_id=call.request_id,
                                                   total_ms=1000 * (time.monotonic() - call.start)))
        except RpcFailure as failure:
            call.fail(failure)
        except Exception:  # noqa: BLE001
            call.internal()
        finally:
            call.closed.set()

    def _read_images(self, prompt: str, request_iterator: Iterator[pb.RankRequest], out: queue.Queue,
                     call: "_Call") -> None:
        """Check each uploaded image and submit full batches; ends with None or an RpcFailure."""
        cfg = self.config
        batch: list[Any] = []
        count = 0
        try:
            for position, message in enumerate(request_iterator, start=1):
                if call.closed.is_set():
                    return
                if message.WhichOneof("item") != "image":
                    raise InvalidArgument(f"message {position} carries no image: only the first message carries "
                                          f"the prompt, every later one exactly one image")
                if count >= cfg.max_rank_images:
                    raise InvalidArgument(f"a Rank call takes at most {cfg.max_rank_images} images; "
                                          f"split them over several calls")
                batch.append(load_upload(message.image, count, cfg.max_rank_image_bytes, cfg.max_rank_image_pixels))
                count += 1
                if len(batch) == cfg.rank_batch:
                    out.put((count - len(batch), self.batcher.submit_rank(prompt, batch)))
                    batch = []
            if count == 0:
                raise InvalidArgument("no images to rank: after the prompt, send one image per message")
            if batch:
                out.put((count - len(batch), self.batcher.submit_rank(prompt, batch)))
            out.put(None)
        except RpcFailure as failure:
            out.put(failure)
        except Exception:  # noqa: BLE001 - the client went away mid-stream, or a fault (logged by the handler)
            if call.context.is_active():
                log.exception("reading Rank images failed", extra={"request_id": call.request_id})
                out.put(RpcFailure(f"internal error (request id {call.request_id}); the server log has the details"))
            else:
                out.put(RpcFailure("cancelled", grpc.StatusCode.CANCELLED))

    def _scores(self, item: tuple[int, concurrent.futures.Future], scores: dict[int, float],
                context: grpc.ServicerContext) -> Iterator[pb.RankResponse]:
        start, future = item
        while True:
            try:
                values = future.result(timeout=0.25)
                break
            except concurrent.futures.TimeoutError:
                if not context.is_active():
                    future.cancel()
                    raise RpcFailure("cancelled", grpc.StatusCode.CANCELLED) from None
        for offset, value in enumerate(values):
            scores[start + offset] = value
            yield pb.RankResponse(score=pb.Score(index=start + offset, score=value))

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        call = _Call("GetModelInfo", context, self.metrics, self.inflight)
        try:
            info = self.pipeline.info()
            limits = self.pipeline.limits
            stages = [pb.StageInfo(name=str(s.get("name", "")), kind=str(s.get("kind", "")), type=str(s.get("type", "")),
                                   checkpoint=str(s.get("checkpoint") or ""), dtype=str(s.get("dtype") or ""),
                                   consumes=[str(x) for x in s.get("consumes", ())],
                                   produces=[str(x) for x in s.get("produces", ())])
                      for s in info.get("stages", ())]
            height, width = limits.image_size
            reply = pb.ModelInfo(
                stages=stages, devices=[str(d) for d in info.get("devices", ())], has_ranker=self.pipeline.has_ranker,
                config_path=str(info.get("config") or ""), server_version=_version(),
                limits=pb.Limits(
                    max_prompt_chars=limits.max_prompt_chars, max_prompt_tokens=limits.max_prompt_tokens,
                    max_images_per_request=limits.max_images_per_request, num_slots=limits.num_slots,
                    image_length=limits.image_length, chunk_steps=self.pipeline.sampler.chunk_steps,
                    image_width=width, image_height=height,
                    max_queued_requests=self.config.max_queued_requests, max_rank_images=self.config.max_rank_images,
                    max_rank_image_bytes=self.config.max_rank_image_bytes,
                    max_rank_image_pixels=self.config.max_rank_image_pixels,
                    max_top_k=self.pipeline.sampler.max_top_k,
                    default_condition_scale=self.pipeline.default_condition_scale,
                    default_temperature=self.pipeline.default_temperature))
        except Exception:  # noqa: BLE001
            call.internal()
            return pb.ModelInfo()
        call.ok()
        return reply


def _version() -> str:
    try:
        return metadata.version("palette")
    except metadata.PackageNotFoundError:
        return "unknown"


class PaletteServer:
    """The Palette service, health and reflection on one port, plus /metrics on another."""

    def __init__(self, pipeline: Pipeline, config: ServerConfig | None = None):
        self.pipeline = pipeline
        self.config = config = config or ServerConfig()
        self.metrics = Metrics(pipeline.sampler.num_slots)
        self.batcher = Batcher(pipeline, BatcherConfig(max_queued_requests=config.max_queued_requests,
                                                       max_wait_ms=config.max_wait_ms, rank_batch=config.rank_batch),
                               self.metrics)
        workers = config.max_workers or config.max_queued_requests + 2 * pipeline.sampler.num_slots + 16
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="palette-rpc"),
            # Beyond this many concurrent calls gRPC itself answers RESOURCE_EXHAUSTED instead of queueing
            # them behind busy threads (our own queue limit normally refuses work well before that).
            maximum_concurrent_rpcs=workers,
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", config.max_rank_image_bytes + 64 * 1024),
                     ("grpc.max_send_message_length", -1)])
        self.servicer = PaletteServicer(pipeline, self.batcher, config, self.metrics)
        pb_grpc.add_PaletteServicer_to_server(self.servicer, self._grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "PaletteServer":
        # Bind first, so a port in use is reported at once rather than after the warm-up.
        try:
            self.port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
        except RuntimeError as err:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port} (is the port in use?): {err}") \
                from None
        if not self.port:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port} (is the port in use?)")
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        if self.config.warmup:
            self.batcher.warmup()
        self.batcher.start()
        self._grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": self.address, "metrics_port": self.metrics_port})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful drain: refuse new work, give in-flight requests `grace` seconds, then cancel and exit."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("draining", extra={"grace_s": grace, "in_flight": self.servicer.inflight.value})
        # New work is refused with UNAVAILABLE by our handlers (a clear, retryable answer) while the
        # port stays open for the in-flight streams; the port closes once they are done or the grace ends.
        self.batcher.stop_accepting()
        self.health.enter_graceful_shutdown()
        while self.servicer.inflight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        self._grpc.stop(max(0.0, deadline - time.monotonic())).wait()
        self.batcher.stop(timeout=10)
        self.metrics.close()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)

    def __enter__(self) -> "PaletteServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=0)
