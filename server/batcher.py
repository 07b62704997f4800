"""Dynamic batching: many Generate requests share the sampler's rows; decoding and ranking batch too.

Two threads own all device work:

* the **sampler thread** owns the SamplerEngine (it is not thread-safe). Each turn it
  releases the rows of cancelled requests, admits waiting images into free rows
  (round-robin over the waiting requests, so a 1-image request is not stuck behind
  a 16-image one), runs one `step()` (chunk_steps tokens for every occupied row),
  reports progress, and hands finished rows to the post thread. When the engine is
  idle it waits up to `max_wait_ms` for more requests before the first step, so a
  burst of arrivals shares one batch; when it is busy, new requests join at the
  next step boundary (continuous batching).
* the **post thread** drains everything finished so far and decodes it as one VQGAN
  batch, CLIP-scores the rows of requests that asked to rank, and streams each
  image to its request at once; it also serves Rank batches and previews.

A request's images depend only on its own seeds: each sampler row has its own PRNG
stream, so what else shares the batch never changes a pixel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image

from palette.stages.pipeline import Pipeline
from palette.v1 import palette_pb2 as pb

from .errors import QueueFull, RpcFailure, Unavailable
from .images import encode_image
from .metrics import Metrics
from .validation import GenerateSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BatcherConfig:
    max_queued_requests: int = 64  # Generate requests waiting for rows; more -> RESOURCE_EXHAUSTED
    max_wait_ms: float = 10.0  # an idle engine waits this long for company before its first step
    decode_batch: int = 0  # most images per VQGAN batch; 0 = num_slots
    rank_batch: int = 8  # images per CLIP batch in Rank calls


class End:
    """The last item of a request's event queue: finished (code None) or failed."""

    def __init__(self, failure: RpcFailure | None = None):
        self.failure = failure


class GenerateJob:
    """One Generate request's state as it moves through the batcher."""

    def __init__(self, request_id: str, spec: GenerateSpec, image_length: int):
        self.request_id = request_id
        self.spec = spec
        self.image_length = image_length
        self.num_images = len(spec.params)
        self.events: queue.Queue[Any] = queue.Queue()  # GenerateResponse messages, then one End
        self.cancelled = threading.Event()  # client gone, deadline passed, or server fault
        self.next_index = 0  # the next image to give a sampler row
        self.tokens_done = [0] * self.num_images
        self.last_preview = [0] * self.num_images
        self.sampled = 0
        self.sent = 0
        self.scores: dict[int, float] = {}
        self.accepted_at = time.monotonic()
        self.first_step_at: float | None = None
        self.sampled_at: float | None = None
        self.first_image_at: float | None = None
        self.decode_s = 0.0
        self.rank_s = 0.0
        self.ended = False

    @property
    def images_waiting(self) -> int:
        return self.num_images - self.next_index

    def progress(self) -> pb.GenerateResponse:
        return pb.GenerateResponse(progress=pb.Progress(
            tokens_done=sum(self.tokens_done), tokens_total=self.num_images * self.image_length,
            images_sampled=self.sampled, images_queued=self.images_waiting))

    def emit(self, response: pb.GenerateResponse) -> None:
        if not self.ended:
            self.events.put(response)

    def end(self, failure: RpcFailure | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.events.put(End(failure))


@dataclasses.dataclass
class _ImageTask:
    job: GenerateJob
    index: int
    tokens: np.ndarray


@dataclasses.dataclass
class _PreviewTask:
    job: GenerateJob
    index: int
    tokens: np.ndarray
    steps_done: int


@dataclasses.dataclass
class _RankTask:
    prompt: str
    images: list[Image.Image]
    future: concurrent.futures.Future


_STOP = object()


class Batcher:
    def __init__(self, pipeline: Pipeline, config: BatcherConfig | None = None, metrics: Metrics | None = None):
        self.pipeline = pipeline
        self.engine = pipeline.sampler
        self.config = config or BatcherConfig()
        self.metrics = metrics or Metrics(self.engine.num_slots)
        self.decode_batch = self.config.decode_batch or self.engine.num_slots
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenerateJob] = collections.deque()  # under _cv
        self._slots: dict[int, tuple[GenerateJob, int]] = {}  # sampler thread only
        self._post: queue.Queue[Any] = queue.Queue()
        self._accepting = True
        self._stopping = False
        self._step_s = 0.0  # moving average of one step, for the retry hint
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("palette-sampler", self._sampler_loop), ("palette-post", self._post_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def warmup(self) -> None:
        """Compile what requests will need before serving: every admission size, step after admit,
        after step and after release, every release count, and each decode and rank batch size."""
        from palette.stages.pipeline import SamplingParams

        t0 = time.monotonic()
        engine = self.engine
        tokens = self.pipeline.encode_prompt("warm up")
        params = lambda n: [SamplingParams(seed=i + 1) for i in range(n)]  # noqa: E731
        sizes = sorted({min(1 << i, engine.num_slots) for i in range(engine.num_slots.bit_length() + 1)})
        final = None
        for n in sizes:  # whole runs: admit n, step until finished, release
            slots = engine.free_slots()[:n]
            engine.admit(slots, [tokens] * n, params(n))
            progress = engine.step()
            while not all(p.finished for p in progress):
                progress = engine.step()
            final = progress[0].tokens
            engine.release(slots)
        # Continuous batching: admit while others run, release some while others run.
        engine.admit([0], [tokens], params(1))
        engine.step()
        if engine.num_slots > 1:
            engine.admit([1], [tokens], params(1))
            engine.step()
            engine.release([0])
            engine.step()
            engine.release([1])
        else:
            engine.release([0])
        for count in range(1, engine.num_slots + 1):
            engine.release(list(range(count)))
        engine.admit([0], [tokens], params(1))
        engine.step()
        engine.release([0])
        grid = np.stack([final] * max(self.decode_batch, self.config.rank_batch))
        images = []
        for n in sorted({min(1 << i, len(grid)) for i in range(len(grid).bit_length() + 1)}):
            images = self.pipeline.decode(grid[:n])
            if self.pipeline.has_ranker:
                self.pipeline.rank("warm up", images)
        self.pipeline.preview(grid[0], 1)
        log.info("warm-up done", extra={"seconds": round(time.monotonic() - t0, 2)})

    def stop_accepting(self) -> None:
        """New Generate requests get UNAVAILABLE from now on; work already accepted continues."""
        with self._cv:
            self._accepting = False

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, end requests still queued or running as UNAVAILABLE, and join the threads."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    @property
    def accepting(self) -> bool:
        return self._accepting

    def idle(self) -> bool:
        with self._cv:
            return not self._waiting and not self._slots

    def occupied_slots(self) -> int:
        return len(self._slots)

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, job: GenerateJob) -> None:
        """Queue a request, or raise QueueFull / Unavailable."""
        with self._cv:
            if not self._accepting:
                raise Unavailable("the server is shutting down; retry in a moment or on another replica")
            if len(self._waiting) >= self.config.max_queued_requests:
                retry_ms = self._retry_after_ms()
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting for sampler rows "
                                f"(limit {self.config.max_queued_requests}); retry in about {retry_ms / 1000:.1f} s",
                                retry_ms)
            job.emit(job.progress())  # before the sampler can see the job, so it is always the first event
            self._waiting.append(job)
            self._update_queue_metrics()
            self._cv.notify_all()

    def cancel(self, job: GenerateJob) -> None:
        """The client is gone (or its deadline passed): its rows are released before the next step."""
        job.cancelled.set()
        job.end(RpcFailure("cancelled"))
        with self._cv:
            self._cv.notify_all()

    def submit_rank(self, prompt: str, images: list[Image.Image]) -> concurrent.futures.Future:
        """CLIP-score images on the post thread; the future gives one float per image."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(Unavailable("the server is shutting down"))
        else:
            self._post.put(_RankTask(prompt, images, future))
        return future

    def _retry_after_ms(self) -> int:
        """A rough time until a queue place frees: the queued images' share of the sampler's throughput."""
        steps_per_image = -(-self.engine.image_length // self.engine.chunk_steps)
        step_s = self._step_s or 0.5
        images = sum(j.images_waiting for j in self._waiting) + len(self._slots)
        seconds = images * steps_per_image * step_s / self.engine.num_slots
        return int(min(60.0, max(0.5, seconds)) * 1000)

    def _update_queue_metrics(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.queued_images.set(sum(j.images_waiting for j in self._waiting))

    # -- the sampler thread ---------------------------------------------------------------------

    def _sampler_loop(self) -> None:
        while True:
            admissions = self._next_admissions()
            if admissions is None:
                break
            self._release_cancelled()
            self._admit(admissions)
            if not self._slots:
                continue
            t0 = time.monotonic()
            try:
                progress = self.engine.step()
            except Exception:  # noqa: BLE001 - a fault ends the requests in the batch, not the server
                log.exception("sampler step failed")
                self._fail_slots(list(self._slots), "the sampler failed")
                continue
            self._on_progress(progress, t0, time.monotonic())
        self._fail_slots(list(self._slots), "the server stopped before this request finished", Unavailable)
        self._post.put(_STOP)

    def _next_admissions(self) -> list[tuple[GenerateJob, int]] | None:
        """Wait for work; pick (job, image index) pairs for the free rows. None: stop."""
        with self._cv:
            while True:
                self._drop_cancelled_waiting()
                if self._stopping:
                    for job in self._waiting:
                        job.end(Unavailable("the server stopped before this request started"))
                    self._waiting.clear()
                    self._update_queue_metrics()
                    if not self._slots:
                        return None
                    if all(job.cancelled.is_set() for job, _ in self._slots.values()):
                        return []
                if self._waiting or self._slots:
                    break
                self._cv.wait()
            if not self._slots and self._waiting and not self._stopping:
                # An idle engine waits briefly so that a burst of requests shares the first step.
                deadline = self._waiting[0].accepted_at + self.config.max_wait_ms / 1000
                while (self._waiting and not self._stopping
                       and sum(j.images_waiting for j in self._waiting) < self.engine.num_slots
                       and (remaining := deadline - time.monotonic()) > 0):
                    self._cv.wait(remaining)
                    self._drop_cancelled_waiting()
            free = self.engine.num_slots - len(self._slots) + sum(
                1 for job, _ in self._slots.values() if job.cancelled.is_set())
            picks: list[tuple[GenerateJob, int]] = []
            while free > 0 and self._waiting:
                for job in list(self._waiting):  # one image per waiting request per pass
                    if free == 0:
                        break
                    picks.append((job, job.next_index))
                    job.next_index += 1
                    free -= 1
                    if not job.images_waiting:
                        self._waiting.remove(job)
            self._update_queue_metrics()
            return picks

    def _drop_cancelled_waiting(self) -> None:
        if any(job.cancelled.is_set() for job in self._waiting):
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled.is_set())
            self._update_queue_metrics()

    def _release_cancelled(self) -> None:
        gone = [slot for slot, (job, _) in self._slots.items() if job.cancelled.is_set()]
        if gone:
            self.engine.release(gone)
            for slot in gone:
                job, _ = self._slots.pop(slot)
            log.info("released cancelled rows", extra={"slots": gone})
            self.metrics.active_slots.set(len(self._slots))

    def _admit(self, picks: Sequence[tuple[GenerateJob, int]]) -> None:
        picks = [(job, index) for job, index in picks if not job.cancelled.is_set()]
        if not picks:
            return
        slots = self.engine.free_slots()[:len(picks)]
        try:
            self.engine.admit(slots, [job.spec.prompt_tokens for job, _ in picks],
                              [job.spec.params[index] for job, index in picks])
        except Exception:  # noqa: BLE001
            log.exception("sampler admit failed")
            for job, _ in picks:
                job.cancelled.set()
                job.end(RpcFailure(f"internal error while starting request {job.request_id}; see the server log"))
            return
        for slot, (job, index) in zip(slots, picks):
            self._slots[slot] = (job, index)
        self.metrics.active_slots.set(len(self._slots))

    def _on_progress(self, progress: Sequence[Any], t0: float, t1: float) -> None:
        length = self.engine.image_length
        finished: list[int] = []
        tasks: list[Any] = []
        touched: dict[int, GenerateJob] = {}
        new_tokens = 0
        for p in progress:
            owner = self._slots.get(p.slot)
            if owner is None:
                continue
            job, index = owner
            if job.cancelled.is_set():
                continue
            if job.first_step_at is None:
                job.first_step_at = t0
            done = length if p.finished else int(p.steps_done)
            new_tokens += max(0, done - job.tokens_done[index])
            job.tokens_done[index] = done
            touched[id(job)] = job
            if p.finished:
                finished.append(p.slot)
                job.sampled += 1
                if job.sampled == job.num_images:
                    job.sampled_at = t1
                tasks.append(_ImageTask(job, index, np.array(p.tokens, copy=True)))
            elif job.spec.preview_every and done - job.last_preview[index] >= job.spec.preview_every:
                job.last_preview[index] = done
                tasks.append(_PreviewTask(job, index, np.array(p.tokens, copy=True), done))
        if finished:
            self.engine.release(finished)
            for slot in finished:
                del self._slots[slot]
        for job in touched.values():  # progress first, so it always precedes the images it reports
            job.emit(job.progress())
        for task in tasks:
            self._post.put(task)
        dt = max(t1 - t0, 1e-9)
        self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt
        self.metrics.batch_size.observe(len(progress))
        self.metrics.step_seconds.observe(dt)
        self.metrics.tokens.inc(new_tokens)
        self.metrics.tokens_per_second.set(new_tokens / dt)
        self.metrics.active_slots.set(len(self._slots))

    def _fail_slots(self, slots: list[int], why: str, kind: type[RpcFailure] = RpcFailure) -> None:
        if not slots:
            return
        for slot in slots:
            job, _ = self._slots.pop(slot)
            job.cancelled.set()
            job.end(kind(f"{why} (request {job.request_id}); see the server log" if kind is RpcFailure else why))
        try:
            self.engine.release(slots)
        except Exception:  # noqa: BLE001
            log.exception("releasing rows failed")
        self.metrics.active_slots.set(len(self._slots))

    # -- the post thread ------------------------------------------------------------------------

    def _post_loop(self) -> None:
        stop = False
        while not stop:
            tasks = [self._post.get()]
            while True:
                try:
                    tasks.append(self._post.get_nowait())
                except queue.Empty:
                    break
            if any(t is _STOP for t in tasks):
                stop = True
                tasks = [t for t in tasks if t is not _STOP]
            images = [t for t in tasks if isinstance(t, _ImageTask) and not t.job.cancelled.is_set()]
            for start in range(0, len(images), self.decode_batch):
                self._finish_images(images[start:start + self.decode_batch])
            for task in tasks:
                if isinstance(task, _RankTask):
                    self._rank(task)
            finishing = {(id(t.job), t.index) for t in images}
            latest: dict[tuple[int, int], _PreviewTask] = {}
            for task in tasks:
                if isinstance(task, _PreviewTask) and (id(task.job), task.index) not in finishing:
                    latest[(id(task.job), task.index)] = task
            for task in latest.values():
                if not task.job.cancelled.is_set():
                    self._preview(task)

    def _finish_images(self, tasks: list[_ImageTask]) -> None:
        t0 = time.monotonic()
        try:
            images = self.pipeline.decode(np.stack([t.tokens for t in tasks]))
        except Exception:  # noqa: BLE001
            log.exception("decode failed")
            for job in {id(t.job): t.job for t in tasks}.values():
                job.cancelled.set()
                job.end(RpcFailure(f"internal error while decoding request {job.request_id}; see the server log"))
            return
        dt = time.monotonic() - t0
        self.metrics.decode_batch_size.observe(len(tasks))
        self.metrics.decode_seconds.observe(dt)
        jobs = {id(t.job): t.job for t in tasks}
        for job in jobs.values():
            job.decode_s += dt
        # Requests that do not rank get their images before CLIP runs for the others.
        plain = [(t, im) for t, im in zip(tasks, images) if not t.job.spec.rank]
        ranked = [(t, im) for t, im in zip(tasks, images) if t.job.spec.rank]
        for task, image in plain:
            self._send_image(task, image, None)
        by_job: dict[int, list[tuple[_ImageTask, Image.Image]]] = {}
        for task, image in ranked:
            by_job.setdefault(id(task.job), []).append((task, image))
        for items in by_job.values():
            job = items[0][0].job
            t0 = time.monotonic()
            try:
                scores = self.pipeline.rank(job.spec.prompt, [im for _, im in items])
            except Exception:  # noqa: BLE001
                log.exception("ranking failed", extra={"request_id": job.request_id})
                job.cancelled.set()
                job.end(RpcFailure(f"internal error while ranking request {job.request_id}; see the server log"))
                continue
            job.rank_s += time.monotonic() - t0
            self.metrics.rank_batch_size.observe(len(items))
            for (task, image), score in zip(items, scores):
                self._send_image(task, image, float(score))

    def _send_image(self, task: _ImageTask, image: Image.Image, score: float | None) -> None:
        job = task.job
        if job.cancelled.is_set():
            return
        try:
            data, mime = encode_image(image, job.spec.format, job.spec.quality)
        except Exception:  # noqa: BLE001
            log.exception("encoding failed", extra={"request_id": job.request_id})
            job.cancelled.set()
            job.end(RpcFailure(f"internal error while encoding request {job.request_id}; see the server log"))
            return
        now = time.monotonic()
        if job.first_image_at is None:
            job.first_image_at = now
            self.metrics.time_to_first_image.observe(now - job.accepted_at)
        if score is not None:
            job.scores[task.index] = score
        job.emit(pb.GenerateResponse(image=pb.Image(
            index=task.index, seed=job.spec.params[task.index].seed, data=data, mime_type=mime,
            width=image.width, height=image.height, score=score or 0.0, has_score=score is not None)))
        job.sent += 1
        self.metrics.images.inc()
        if job.sent == job.num_images:
            job.emit(pb.GenerateResponse(done=self._done(job, now)))
            job.end()

    def _done(self, job: GenerateJob, now: float) -> pb.Done:
        ms = lambda a, b: 1000.0 * (b - a) if a is not None and b is not None else 0.0  # noqa: E731
        ranked = sorted(job.scores, key=lambda i: (-job.scores[i], i)) if job.spec.rank else []
        return pb.Done(ranked_indices=ranked, queue_ms=ms(job.accepted_at, job.first_step_at),
                       sampling_ms=ms(job.first_step_at, job.sampled_at), decode_ms=1000.0 * job.decode_s,
                       rank_ms=1000.0 * job.rank_s, time_to_first_image_ms=ms(job.accepted_at, job.first_image_at),
                       total_ms=ms(job.accepted_at, now), request_id=job.request_id)

    def _rank(self, task: _RankTask) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            scores = self.pipeline.rank(task.prompt, task.images)
        except Exception as err:  # noqa: BLE001
            log.exception("ranking failed")
            task.future.set_exception(err)
            return
        self.metrics.rank_batch_size.observe(len(task.images))
        task.future.set_result([float(s) for s in scores])

    def _preview(self, task: _PreviewTask) -> None:
        job = task.job
        try:
            image = self.pipeline.preview(task.tokens, task.steps_done)
            data, mime = encode_image(image, job.spec.format, job.spec.quality)
        except Exception:  # noqa: BLE001 - a failed preview is logged and skipped, the request goes on
            log.exception("preview failed", extra={"request_id": job.request_id})
            return
        job.emit(pb.GenerateResponse(preview=pb.Preview(
            index=task.index, tokens_done=task.steps_done, data=data, mime_type=mime,
            width=image.width, height=image.height)))
