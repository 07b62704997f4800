"""One implementation of each Palette RPC, whatever the transport.

The gRPC servicer, the Connect/HTTP app and the Ray Serve deployment are adapters: each turns its
transport's request, metadata and cancellation into calls on `PaletteCore`, and the `RpcFailure`s
it raises into its own status codes. Nothing here knows which transport asked.

Every call is bracketed by a `CallRecord` (`begin` ... `finish`), which counts it in flight, in the
request metrics under its caller, and writes the one `finished` log line.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from importlib import metadata
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator

import grpc

from palette.stages.pipeline import Pipeline
from palette.v1 import palette_pb2 as pb

from .auth import ANONYMOUS_CALLER, Caller
from .batcher import Batcher, BatcherConfig
from .errors import InvalidArgument, RpcFailure, Unavailable
from .images import load_upload
from .jobs import DoneEvent, End, EventStream, GenerateJob, ImageEvent, PreviewEvent, ProgressEvent
from .metrics import Metrics
from .validation import check_prompt, parse_generate

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Palette"].full_name


@dataclasses.dataclass
class CoreConfig:
    """What bounds the work one call may ask for, and how the batcher shares the sampler."""

    max_queued_requests: int = 64
    max_queued_per_caller: int = 0  # 0 = only the total limit
    max_wait_ms: float = 10.0
    rank_batch: int = 8
    max_rank_images: int = 1024
    max_rank_image_bytes: int = 16 * 1024 * 1024
    max_rank_image_pixels: int = 4096 * 4096
    max_rank_call_bytes: int = 64 * 1024 * 1024
    max_rank_aspect_ratio: float = 4.0


class CallRecord:
    """One RPC from start to end: in flight, then counted once in the metrics and the log."""

    def __init__(self, core: "PaletteCore", method: str, request_id: str, caller: Caller):
        self.core = core
        self.method = method
        self.request_id = request_id
        self.caller = caller
        self.start = time.monotonic()
        self.code: grpc.StatusCode | None = None  # what the handler decided
        self._finished = False
        self._lock = threading.Lock()
        core._inflight_add(1)

    def ok(self) -> None:
        self.code = grpc.StatusCode.OK

    def fail(self, failure: RpcFailure) -> None:
        self.code = failure.code
        log.info("%s refused: %s", self.method, failure.message,
                 extra={"request_id": self.request_id, "caller": self.caller.name, "code": failure.code.name})

    def internal(self) -> RpcFailure:
        """An unexpected exception: logged with its traceback here; the caller gets the request id."""
        log.exception("%s failed", self.method, extra={"request_id": self.request_id, "caller": self.caller.name})
        failure = RpcFailure(f"internal error (request id {self.request_id}); the server log has the details")
        self.code = failure.code
        return failure

    def finish(self, code: grpc.StatusCode | None = None) -> None:
        """The call is over (idempotent). `code`: what the transport saw when the handler decided nothing."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        final = self.code or code or grpc.StatusCode.CANCELLED
        seconds = time.monotonic() - self.start
        metrics = self.core.metrics
        metrics.requests.labels(self.method, final.name, self.caller.name).inc()
        metrics.latency.labels(self.method, self.caller.name).observe(seconds)
        log.info("%s finished: %s", self.method, final.name,
                 extra={"request_id": self.request_id, "method": self.method, "caller": self.caller.name,
                        "code": final.name, "ms": round(1000 * seconds, 1)})
        self.core._inflight_add(-1)


class RankSession:
    """A Rank call's images in, scores out. A reader adds images as they arrive (checked, decoded and
    submitted in batches); the consumer reads scores as each batch is scored, possibly before the
    reader is done. `read_all` runs the reader for a sync source, `responses` / `aresponses` stream."""

    def __init__(self, core: "PaletteCore", call: CallRecord, prompt: str):
        self.core = core
        self.call = call
        self.prompt = prompt
        self.count = 0
        self.total_bytes = 0
        self._batch: list[Any] = []
        self._out = EventStream()  # (first index, future) per batch, then End
        self._scores: dict[int, float] = {}
        self.closed = threading.Event()

    def add(self, data: bytes) -> None:
        """One uploaded image: checked against the limits, decoded, and batched for the ranker."""
        cfg = self.core.config
        if self.count >= cfg.max_rank_images:
            raise InvalidArgument(f"a Rank call takes at most {cfg.max_rank_images} images; "
                                  f"split them over several calls")
        self.total_bytes += len(data)
        if self.total_bytes > cfg.max_rank_call_bytes:
            raise InvalidArgument(f"the images of one Rank call may total at most {cfg.max_rank_call_bytes} bytes; "
                                  f"image {self.count} brings them to {self.total_bytes}: split them over several calls")
        self._batch.append(load_upload(data, self.count, cfg.max_rank_image_bytes, cfg.max_rank_image_pixels,
                                       cfg.max_rank_aspect_ratio))
        self.count += 1
        if len(self._batch) == cfg.rank_batch:
            self._submit()

    def finish(self) -> None:
        """No more images: submit what is left."""
        if self.count == 0:
            raise InvalidArgument("no images to rank: after the prompt, send one image per message")
        if self._batch:
            self._submit()
        self._out.put(End())

    def abort(self, failure: RpcFailure) -> None:
        self._out.put(End(failure))

    def _submit(self) -> None:
        start = self.count - len(self._batch)
        self._out.put((start, self.core.batcher.submit_rank(self.prompt, self._batch)))
        self._batch = []

    def read_all(self, images: Iterable[bytes]) -> None:
        """Run the reader over a blocking source (on its own thread); failures end the stream."""
        try:
            for data in images:
                if self.closed.is_set():
                    return
                self.add(data)
            self.finish()
        except RpcFailure as failure:
            self.abort(failure)
        except Exception:  # noqa: BLE001 - the source failed: the client left, or a fault
            self.abort(self.core.source_failure(self.call))

    async def aread_all(self, images: AsyncIterable[bytes]) -> None:
        """`read_all` for an asyncio source; each image is checked and decoded on a worker thread."""
        import asyncio

        try:
            async for data in images:
                if self.closed.is_set():
                    return
                await asyncio.to_thread(self.add, data)
            self.finish()
        except RpcFailure as failure:
            self.abort(failure)
        except Exception:  # noqa: BLE001 - the source failed: the client left, or a fault
            self.abort(self.core.source_failure(self.call))

    def _scored(self, start: int, values: list[float]) -> Iterator[pb.RankResponse]:
        for offset, value in enumerate(values):
            self._scores[start + offset] = value
            yield pb.RankResponse(score=pb.Score(index=start + offset, score=value))

    def _last(self, end: End) -> pb.RankResponse:
        """The done message, or the RpcFailure that ended the call."""
        if end.failure is not None:
            raise end.failure
        self.call.ok()  # before the last message goes out: a client may hang up as soon as it has it
        ranked = sorted(self._scores, key=lambda i: (-self._scores[i], i))
        return pb.RankResponse(done=pb.RankDone(ranked_indices=ranked, request_id=self.call.request_id,
                                                total_ms=1000 * (time.monotonic() - self.call.start)))

    def responses(self, is_active: Any = lambda: True) -> Iterator[pb.RankResponse]:
        """Scores as batches finish, then done; raises the RpcFailure that ended the call."""
        while True:
            item = self._out.get()
            if isinstance(item, End):
                yield self._last(item)
                return
            start, future = item
            while True:
                try:
                    values = future.result(timeout=0.25)
                    break
                except concurrent.futures.TimeoutError:
                    if not is_active():
                        future.cancel()
                        raise RpcFailure("cancelled", grpc.StatusCode.CANCELLED) from None
            yield from self._scored(start, values)

    async def aresponses(self) -> AsyncIterator[pb.RankResponse]:
        import asyncio

        while True:
            item = await self._out.aget()
            if isinstance(item, End):
                yield self._last(item)
                return
            start, future = item
            try:
                values = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.cancel()
                raise
            for response in self._scored(start, values):
                yield response


def rank_image(position: int, message: pb.RankRequest) -> bytes:
    """The image that the Rank call's message number `position` (from 1, after the prompt) must carry."""
    if message.WhichOneof("item") != "image":
        raise InvalidArgument(f"message {position} carries no image: only the first message carries the prompt, "
                              f"every later one exactly one image")
    return message.image


class PaletteCore:
    def __init__(self, pipeline: Pipeline, config: CoreConfig | None = None, metrics: Metrics | None = None):
        self.pipeline = pipeline
        self.config = config = config or CoreConfig()
        self.metrics = metrics or Metrics(pipeline.sampler.num_slots)
        self.batcher = Batcher(pipeline, BatcherConfig(
            max_queued_requests=config.max_queued_requests, max_queued_per_caller=config.max_queued_per_caller,
            max_wait_ms=config.max_wait_ms, rank_batch=config.rank_batch), self.metrics)
        self._inflight = 0
        self._inflight_lock = threading.Condition()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    def stop_accepting(self) -> None:
        self.batcher.stop_accepting()

    def stop(self) -> None:
        self.batcher.stop(timeout=10)

    @property
    def inflight(self) -> int:
        return self._inflight

    def _inflight_add(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta
            self.metrics.inflight.set(self._inflight)
            self._inflight_lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight (True) or `timeout` seconds pass (False)."""
        with self._inflight_lock:
            return self._inflight_lock.wait_for(lambda: self._inflight <= 0, timeout)

    def begin(self, method: str, request_id: str, caller: Caller = ANONYMOUS_CALLER) -> CallRecord:
        return CallRecord(self, method, request_id, caller)

    def source_failure(self, call: CallRecord) -> RpcFailure:
        return RpcFailure("cancelled: the request stream ended abnormally", grpc.StatusCode.CANCELLED)

    # -- Generate ---------------------------------------------------------------------------------

    def start_generate(self, request: pb.GenerateRequest, call: CallRecord) -> GenerateJob:
        """Validate and queue; RpcFailure (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE) if not."""
        if not self.batcher.accepting:
            raise Unavailable("the server is shutting down; retry in a moment or on another replica")
        spec = parse_generate(request, self.pipeline)
        job = GenerateJob(call.request_id, call.caller.name, call.caller.weight, spec,
                          self.pipeline.limits.image_length)
        self.batcher.submit(job)
        log.info("Generate accepted", extra={
            "request_id": call.request_id, "caller": call.caller.name, "num_images": job.num_images,
            "rank": spec.rank, "seeds": [p.seed for p in spec.params][:4], "prompt_chars": len(spec.prompt)})
        return job

    def cancel(self, job: GenerateJob) -> None:
        self.batcher.cancel(job)

    def generate_responses(self, job: GenerateJob, call: CallRecord) -> Iterator[pb.GenerateResponse]:
        """The job's events as messages; raises the RpcFailure that ended it early. The call is marked
        OK as its last message goes out: a client may hang up as soon as it has that message."""
        while not isinstance(event := job.events.get(), End):
            if isinstance(event, DoneEvent):
                call.ok()
            yield to_message(event, job.request_id)
        if event.failure is not None:
            raise event.failure

    async def agenerate_responses(self, job: GenerateJob, call: CallRecord) -> AsyncIterator[pb.GenerateResponse]:
        while not isinstance(event := await job.events.aget(), End):
            if isinstance(event, DoneEvent):
                call.ok()
            yield to_message(event, job.request_id)
        if event.failure is not None:
            raise event.failure

    # -- Rank -------------------------------------------------------------------------------------

    def start_rank(self, prompt: str, call: CallRecord) -> RankSession:
        if not self.batcher.accepting:
            raise Unavailable("the server is shutting down; retry in a moment or on another replica")
        if not self.pipeline.has_ranker:
            raise RpcFailure("this server's pipeline has no ranker stage, so it cannot rank",
                             grpc.StatusCode.FAILED_PRECONDITION)
        check_prompt(self.pipeline, prompt)
        return RankSession(self, call, prompt)

    def start_rank_stream(self, first: pb.RankRequest | None, call: CallRecord) -> RankSession:
        """A Rank call from its first message, which must carry the prompt (None: the stream was empty)."""
        if first is None or first.WhichOneof("item") != "prompt":
            raise InvalidArgument("the first Rank message must carry the prompt; then send one image per message")
        return self.start_rank(first.prompt, call)

    def rank_images(self, request: pb.RankImagesRequest, call: CallRecord) -> pb.RankImagesResponse:
        """RankImages: the same checks, limits and ranker as a Rank call, in one request."""
        session = self.start_rank(request.prompt, call)
        session.read_all(request.images)
        responses = list(session.responses())
        scores = [r.score for r in responses if r.WhichOneof("event") == "score"]
        done = responses[-1].done
        return pb.RankImagesResponse(scores=sorted(scores, key=lambda s: s.index),
                                     ranked_indices=done.ranked_indices, total_ms=done.total_ms,
                                     request_id=call.request_id)

    # -- GetModelInfo -----------------------------------------------------------------------------

    def model_info(self) -> pb.ModelInfo:
        info = self.pipeline.info()
        limits = self.pipeline.limits
        cfg = self.config
        stages = [pb.StageInfo(name=str(s.get("name", "")), kind=str(s.get("kind", "")), type=str(s.get("type", "")),
                               checkpoint=str(s.get("checkpoint") or ""), dtype=str(s.get("dtype") or ""),
                               consumes=[str(x) for x in s.get("consumes", ())],
                               produces=[str(x) for x in s.get("produces", ())])
                  for s in info.get("stages", ())]
        height, width = limits.image_size
        return pb.ModelInfo(
            stages=stages, devices=[str(d) for d in info.get("devices", ())], has_ranker=self.pipeline.has_ranker,
            config_path=str(info.get("config") or ""), server_version=version(),
            limits=pb.Limits(
                max_prompt_chars=limits.max_prompt_chars, max_prompt_tokens=limits.max_prompt_tokens,
                max_images_per_request=limits.max_images_per_request, num_slots=limits.num_slots,
                image_length=limits.image_length, chunk_steps=self.pipeline.sampler.chunk_steps,
                image_width=width, image_height=height,
                max_queued_requests=cfg.max_queued_requests, max_rank_images=cfg.max_rank_images,
                max_rank_image_bytes=cfg.max_rank_image_bytes, max_rank_image_pixels=cfg.max_rank_image_pixels,
                max_top_k=self.pipeline.sampler.max_top_k,
                default_condition_scale=self.pipeline.default_condition_scale,
                default_temperature=self.pipeline.default_temperature,
                max_rank_call_bytes=cfg.max_rank_call_bytes, max_rank_aspect_ratio=cfg.max_rank_aspect_ratio,
                max_queued_requests_per_caller=cfg.max_queued_per_caller,
                default_top_k=self.pipeline.sampler.default_top_k))


def to_message(event: Any, request_id: str) -> pb.GenerateResponse:
    """A batcher event as the wire's GenerateResponse."""
    if isinstance(event, ProgressEvent):
        return pb.GenerateResponse(progress=pb.Progress(**dataclasses.asdict(event)))
    if isinstance(event, PreviewEvent):
        return pb.GenerateResponse(preview=pb.Preview(**dataclasses.asdict(event)))
    if isinstance(event, ImageEvent):
        fields = dataclasses.asdict(event)
        score = fields.pop("score")
        return pb.GenerateResponse(image=pb.Image(**fields, score=score or 0.0, has_score=score is not None))
    if isinstance(event, DoneEvent):
        return pb.GenerateResponse(done=pb.Done(**dataclasses.asdict(event), request_id=request_id))
    raise TypeError(f"not a Generate event: {event!r}")


def version() -> str:
    try:
        return metadata.version("palette")
    except metadata.PackageNotFoundError:
        return "unknown"
