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
  image to its request at once; it also draws previews.
* the **rank thread** scores the images of Rank calls, so that an upload never
  delays a Generate image.

Waiting requests sit in a `FairQueue`: free rows go round-robin over callers.

A request's images depend only on its own seeds: each sampler row has its own PRNG
stream, so what else shares the batch never changes a pixel.
"""

from __future__ import annotations

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

from .errors import Cancelled, QueueFull, RpcFailure, Unavailable
from .fair_queue import FairQueue
from .images import encode_image
from .jobs import GenerateJob, ImageEvent, PreviewEvent
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BatcherConfig:
    max_queued_requests: int = 64  # Generate requests waiting for rows; more -> RESOURCE_EXHAUSTED
    max_queued_per_caller: int = 0  # likewise for one caller; 0 = only the total limit
    max_wait_ms: float = 10.0  # an idle engine waits this long for company before its first step
    rank_batch: int = 8  # images per CLIP batch in Rank calls


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
        self._cv = threading.Condition()
        self._waiting = FairQueue()  # under _cv
        self._slots: dict[int, tuple[GenerateJob, int]] = {}  # sampler thread only
        self._post: queue.Queue[Any] = queue.Queue()
        self._ranks: queue.Queue[Any] = queue.Queue()
        self._accepting = True
        self._stopping = False
        self._step_s = 0.0  # moving average of one step, for the retry hint
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("palette-sampler", self._sampler_loop), ("palette-post", self._post_loop),
                             ("palette-rank", self._rank_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

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
        self._ranks.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    @property
    def accepting(self) -> bool:
        return self._accepting

    def alive(self) -> bool:
        """True from start() to stop() while every batcher thread runs (a replica's health check)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def idle(self) -> bool:
        with self._cv:
            return not len(self._waiting) and not self._slots

    def occupied_slots(self) -> int:
        return len(self._slots)

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, job: GenerateJob) -> None:
        """Queue a request, or raise QueueFull / Unavailable."""
        with self._cv:
            if not self._accepting:
                raise Unavailable("the server is shutting down; retry in a moment or on another replica")
            limit = self.config.max_queued_requests
            if len(self._waiting) >= limit:
                retry_ms = self._retry_after_ms()
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting for sampler rows "
                                f"(limit {limit}); retry in about {retry_ms / 1000:.1f} s", retry_ms)
            per_caller = self.config.max_queued_per_caller
            mine = self._waiting.waiting_for(job.caller)
            if per_caller and mine >= per_caller:
                retry_ms = self._retry_after_ms()
                raise QueueFull(f"caller {job.caller!r} already has {mine} requests waiting for sampler rows "
                                f"(limit {per_caller} per caller); retry in about {retry_ms / 1000:.1f} s",
                                retry_ms)
            job.emit(job.progress())  # before the sampler can see the job, so it is always the first event
            self._waiting.push(job)
            self._update_queue_metrics()
            self._cv.notify_all()

    def cancel(self, job: GenerateJob) -> None:
        """The client is gone (or its deadline passed): its rows are released before the next step."""
        job.fail(Cancelled("cancelled"))
        with self._cv:
            self._cv.notify_all()

    def submit_rank(self, prompt: str, images: list[Image.Image]) -> concurrent.futures.Future:
        """CLIP-score images on the rank thread; the future gives one float per image."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(Unavailable("the server is shutting down"))
        else:
            self._ranks.put(_RankTask(prompt, images, future))
        return future

    def _retry_after_ms(self) -> int:
        """A rough time until a queue place frees: the queued images' share of the sampler's throughput."""
        steps_per_image = -(-self.engine.image_length // self.engine.chunk_steps)
        step_s = self._step_s or 0.5
        images = self._waiting.images_waiting() + len(self._slots)
        seconds = images * steps_per_image * step_s / self.engine.num_slots
        return int(min(60.0, max(0.5, seconds)) * 1000)

    def _update_queue_metrics(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.queued_images.set(self._waiting.images_waiting())

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
                if self._waiting.drop_cancelled():
                    self._update_queue_metrics()
                if self._stopping:
                    for job in self._waiting.clear():
                        job.end(Unavailable("the server stopped before this request started"))
                    self._update_queue_metrics()
                    if not self._slots:
                        return None
                    if all(job.cancelled.is_set() for job, _ in self._slots.values()):
                        return []
                if len(self._waiting) or self._slots:
                    break
                self._cv.wait()
            if not self._slots and len(self._waiting) and not self._stopping:
                # An idle engine waits briefly so that a burst of requests shares the first step.
                deadline = self._waiting.oldest_accepted_at() + self.config.max_wait_ms / 1000
                while (len(self._waiting) and not self._stopping
                       and self._waiting.images_waiting() < self.engine.num_slots
                       and (remaining := deadline - time.monotonic()) > 0):
                    self._cv.wait(remaining)
                    self._waiting.drop_cancelled()
            free = self.engine.num_slots - len(self._slots) + sum(
                1 for job, _ in self._slots.values() if job.cancelled.is_set())
            picks = self._waiting.take(free)
            self._update_queue_metrics()
            return picks

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
            self.engine.admit(slots, [job.spec.prompt_tokens[index] for job, index in picks],
                              [job.spec.params[index] for job, index in picks])
        except Exception:  # noqa: BLE001
            log.exception("sampler admit failed")
            for job, _ in picks:
                job.fail(RpcFailure(f"internal error while starting request {job.request_id}; see the server log"))
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
            job.fail(kind(f"{why} (request {job.request_id}); see the server log" if kind is RpcFailure else why))
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
            for start in range(0, len(images), self.engine.num_slots):
                self._finish_images(images[start:start + self.engine.num_slots])
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
                job.fail(RpcFailure(f"internal error while decoding request {job.request_id}; see the server log"))
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
                job.fail(RpcFailure(f"internal error while ranking request {job.request_id}; see the server log"))
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
            job.fail(RpcFailure(f"internal error while encoding request {job.request_id}; see the server log"))
            return
        now = time.monotonic()
        if job.first_image_at is None:
            job.first_image_at = now
            self.metrics.time_to_first_image.observe(now - job.accepted_at)
        if score is not None:
            job.scores[task.index] = score
        job.emit(ImageEvent(index=task.index, seed=job.spec.params[task.index].seed, data=data, mime_type=mime,
                            width=image.width, height=image.height, score=score))
        job.sent += 1
        self.metrics.images.inc()
        if job.sent == job.num_images:
            job.emit(job.done(now))
            job.end()

    def _preview(self, task: _PreviewTask) -> None:
        job = task.job
        try:
            image = self.pipeline.preview(task.tokens, task.steps_done)
            data, mime = encode_image(image, job.spec.format, job.spec.quality)
        except Exception:  # noqa: BLE001 - a failed preview is logged and skipped, the request goes on
            log.exception("preview failed", extra={"request_id": job.request_id})
            return
        job.emit(PreviewEvent(index=task.index, tokens_done=task.steps_done, data=data, mime_type=mime,
                              width=image.width, height=image.height))

    # -- the rank thread ------------------------------------------------------------------------

    def _rank_loop(self) -> None:
        while (task := self._ranks.get()) is not _STOP:
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                scores = self.pipeline.rank(task.prompt, task.images)
            except Exception as err:  # noqa: BLE001
                log.exception("ranking failed")
                task.future.set_exception(err)
                continue
            self.metrics.rank_batch_size.observe(len(task.images))
            task.future.set_result([float(s) for s in scores])
        while True:  # stopping: nothing queued behind _STOP is left waiting
            try:
                task = self._ranks.get_nowait()
            except queue.Empty:
                break
            if task is not _STOP and task.future.set_running_or_notify_cancel():
                task.future.set_exception(Unavailable("the server is shutting down"))
