"""A Generate request's life in the batcher, and the events it streams back to its caller.

The batcher's threads produce plain events (below); the transports (gRPC, Connect, Ray) turn them
into protobuf messages. An `EventStream` carries them to exactly one consumer, which may block on
it from a thread or await it from an event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any

from .errors import RpcFailure
from .validation import GenerateSpec


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    tokens_done: int
    tokens_total: int
    images_sampled: int
    images_queued: int


@dataclasses.dataclass(frozen=True)
class PreviewEvent:
    index: int
    tokens_done: int
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class ImageEvent:
    index: int
    seed: int
    data: bytes
    mime_type: str
    width: int
    height: int
    score: float | None


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    ranked_indices: list[int]
    queue_ms: float
    sampling_ms: float
    decode_ms: float
    rank_ms: float
    time_to_first_image_ms: float
    total_ms: float


class End:
    """The last item of a stream: finished (failure None) or failed."""

    def __init__(self, failure: RpcFailure | None = None):
        self.failure = failure


class EventStream:
    """A FIFO from the batcher's threads to one consumer, read with `get()` or `await aget()`."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Condition()
        self._wake: Any = None  # set while an asyncio consumer waits

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            self._lock.notify()
            wake = self._wake
        if wake is not None:
            wake()

    def get(self, timeout: float | None = None) -> Any:
        """The next item; TimeoutError when none arrives within `timeout` seconds."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._items, timeout):
                raise TimeoutError
            return self._items.popleft()

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            ready = asyncio.Event()
            with self._lock:
                if self._items:
                    self._wake = None
                    return self._items.popleft()
                self._wake = lambda: loop.call_soon_threadsafe(ready.set)
            await ready.wait()


class GenerateJob:
    """One Generate request's state as it moves through the batcher."""

    def __init__(self, request_id: str, caller: str, weight: float, spec: GenerateSpec, image_length: int):
        self.request_id = request_id
        self.caller = caller  # the identity it is queued under (fair sharing)
        self.weight = weight  # the caller's share of free sampler rows relative to others
        self.spec = spec
        self.image_length = image_length
        self.num_images = len(spec.params)
        self.events = EventStream()  # the events above, then one End
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
        self._end_lock = threading.Lock()

    @property
    def images_waiting(self) -> int:
        return self.num_images - self.next_index

    def progress(self) -> ProgressEvent:
        return ProgressEvent(tokens_done=sum(self.tokens_done), tokens_total=self.num_images * self.image_length,
                             images_sampled=self.sampled, images_queued=self.images_waiting)

    def emit(self, event: Any) -> None:
        if not self.ended:
            self.events.put(event)

    def end(self, failure: RpcFailure | None = None) -> None:
        with self._end_lock:
            if self.ended:
                return
            self.ended = True
        self.events.put(End(failure))

    def fail(self, failure: RpcFailure) -> None:
        """Stop the request's work and end its stream with `failure`."""
        self.cancelled.set()
        self.end(failure)

    def done(self, now: float) -> DoneEvent:
        ms = lambda a, b: 1000.0 * (b - a) if a is not None and b is not None else 0.0  # noqa: E731
        ranked = sorted(self.scores, key=lambda i: (-self.scores[i], i)) if self.spec.rank else []
        return DoneEvent(ranked_indices=ranked, queue_ms=ms(self.accepted_at, self.first_step_at),
                         sampling_ms=ms(self.first_step_at, self.sampled_at), decode_ms=1000.0 * self.decode_s,
                         rank_ms=1000.0 * self.rank_s, time_to_first_image_ms=ms(self.accepted_at, self.first_image_at),
                         total_ms=ms(self.accepted_at, now))
