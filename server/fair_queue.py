"""Generate requests waiting for sampler rows, shared fairly between callers.

Each caller (identity) has its own queue. Free rows go to callers by smooth weighted round-robin
(with equal weights: one row each in turn), so a flood of requests from one caller delays another
caller by at most one row's turn. Within a caller, each round of free rows passes over its requests
from the oldest, one image each: a 1-image request is never stuck behind a 16-image one, and older
requests finish first rather than all of a caller's requests crawling along together.
"""

from __future__ import annotations

from typing import Iterator

from .jobs import GenerateJob


class _CallerQueue:
    def __init__(self, weight: float):
        self.weight = weight
        self.jobs: list[GenerateJob] = []
        self.current = 0.0  # smooth weighted round-robin credit
        self.cursor = 0  # the next request of this round


class FairQueue:
    """Not thread-safe: the batcher holds its lock around every call."""

    def __init__(self) -> None:
        self._callers: dict[str, _CallerQueue] = {}
        self._count = 0

    def __len__(self) -> int:
        """Requests waiting (each with at least one image not yet given a row)."""
        return self._count

    def __iter__(self) -> Iterator[GenerateJob]:
        for queue in self._callers.values():
            yield from queue.jobs

    def waiting_for(self, caller: str) -> int:
        queue = self._callers.get(caller)
        return len(queue.jobs) if queue else 0

    def images_waiting(self) -> int:
        return sum(job.images_waiting for job in self)

    def oldest_accepted_at(self) -> float | None:
        return min((job.accepted_at for job in self), default=None)

    def push(self, job: GenerateJob) -> None:
        queue = self._callers.get(job.caller)
        if queue is None:
            queue = self._callers[job.caller] = _CallerQueue(job.weight)
        queue.jobs.append(job)
        self._count += 1

    def drop_cancelled(self) -> bool:
        """Forget cancelled requests; True when any was dropped."""
        dropped = False
        for caller, queue in list(self._callers.items()):
            if any(job.cancelled.is_set() for job in queue.jobs):
                kept = [job for job in queue.jobs if not job.cancelled.is_set()]
                self._count -= len(queue.jobs) - len(kept)
                queue.jobs = kept
                dropped = True
            if not queue.jobs:
                del self._callers[caller]
        return dropped

    def take(self, rows: int) -> list[tuple[GenerateJob, int]]:
        """Give up to `rows` free rows to waiting images: (job, image index) pairs, fairly ordered."""
        picks: list[tuple[GenerateJob, int]] = []
        for queue in self._callers.values():
            queue.cursor = 0
        while rows > 0 and self._callers:
            queue = self._next_caller()
            if queue.cursor >= len(queue.jobs):
                queue.cursor = 0
            job = queue.jobs[queue.cursor]
            picks.append((job, job.next_index))
            job.next_index += 1
            rows -= 1
            if job.images_waiting:
                queue.cursor += 1
            else:
                del queue.jobs[queue.cursor]
                self._count -= 1
                if not queue.jobs:
                    del self._callers[job.caller]
        return picks

    def clear(self) -> list[GenerateJob]:
        jobs = list(self)
        self._callers.clear()
        self._count = 0
        return jobs

    def _next_caller(self) -> _CallerQueue:
        """Smooth weighted round-robin: every caller gains its weight, the richest is served and pays
        the total. Over any stretch each caller gets rows in proportion to its weight, interleaved."""
        total = 0.0
        best = None
        for queue in self._callers.values():
            queue.current += queue.weight
            total += queue.weight
            if best is None or queue.current > best.current:
                best = queue
        best.current -= total
        return best
