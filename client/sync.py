"""The blocking client: iterate a Generate or Rank stream's events as they arrive."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import grpc

from palette.v1 import palette_pb2 as pb
from palette.v1 import palette_pb2_grpc as pb_grpc

from .events import (Done, GenerateEvent, GeneratedImage, ImageInput, PaletteError, RankDone, RankEvent, Score,
                     Security, generate_event, generate_request, image_bytes, metadata_for, random_seed, rank_event)

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclasses.dataclass
class GenerateResult:
    images: list[GeneratedImage]  # index order
    done: Done

    @property
    def ranked(self) -> list[GeneratedImage]:
        """Best first when the request ranked, else index order."""
        if not self.done.ranked_indices:
            return list(self.images)
        by_index = {im.index: im for im in self.images}
        return [by_index[i] for i in self.done.ranked_indices]


class GenerateCall:
    """An in-flight Generate: iterate it for events; `cancel()` stops the server's work within one step.

    With `resubmit` > 0, a call that ends UNAVAILABLE (a replica or node lost, a server draining)
    before its first image is sent again, up to `resubmit` times within the call's deadline. That is
    safe because the request carries its seeds: the images are the ones the lost call would have
    sent. The events of a resubmitted call start again with its first progress.
    """

    def __init__(self, start: Callable[[float | None], Any], timeout: float | None, resubmit: int = 0):
        self._start = start
        self._deadline = time.monotonic() + timeout if timeout else None
        self._resubmit = resubmit
        self._cancelled = False
        self._call = start(timeout)

    def __iter__(self) -> Iterator[GenerateEvent]:
        attempts = 0
        while True:
            sent_image = False
            try:
                for msg in self._call:
                    event = generate_event(msg)
                    sent_image |= isinstance(event, GeneratedImage)
                    yield event
                return
            except grpc.RpcError as err:
                error = PaletteError.from_rpc_error(err)
            if not self._may_resubmit(error, sent_image, attempts):
                raise error
            attempts += 1
            time.sleep(error.retry_after_s or min(2.0, 0.1 * 2 ** attempts))
            self._call = self._start(None if self._deadline is None else max(0.0, self._deadline - time.monotonic()))

    def _may_resubmit(self, error: PaletteError, sent_image: bool, attempts: int) -> bool:
        if self._cancelled or sent_image or attempts >= self._resubmit or error.code != grpc.StatusCode.UNAVAILABLE:
            return False
        return self._deadline is None or time.monotonic() < self._deadline

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    @property
    def request_id(self) -> str | None:
        for key, value in self._call.initial_metadata() or ():
            if key == "x-request-id":
                return value
        return None

    def collect(self) -> GenerateResult:
        images: list[GeneratedImage] = []
        for event in self:
            if isinstance(event, GeneratedImage):
                images.append(event)
            elif isinstance(event, Done):
                return GenerateResult(sorted(images, key=lambda im: im.index), event)
        raise PaletteError(grpc.StatusCode.UNKNOWN, "the stream ended without a done message")


class PaletteClient:
    """Talk to a Palette server: `generate`, `rank`, `info`. Use as a context manager or call `close()`.

    Security: `tls=True` (the system's CA roots) or `tls_ca` (a PEM file) for a TLS server,
    `tls_cert` + `tls_key` for a server that wants client certificates, `token` (default
    $PALETTE_TOKEN) for one that wants bearer tokens.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 channel: grpc.Channel | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None,
                 resubmit_unavailable: int = 0):
        self.target = target
        self.timeout = timeout
        self.resubmit_unavailable = resubmit_unavailable  # see GenerateCall
        self.security = Security.of(tls, tls_ca, tls_cert, tls_key, token)
        self._channel = channel or self.security.channel(target)
        self._stub = pb_grpc.PaletteStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PaletteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (e.g. right after starting a server)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise PaletteError(grpc.StatusCode.UNAVAILABLE,
                               f"no server answered at {self.target} within {timeout:g} s "
                               f"(start one with `palette serve`)") from None

    def generate(self, prompt: str, num_images: int = 1, *, timeout: float | None = None,
                 request_id: str | None = None, resubmit_unavailable: int | None = None, **options) -> GenerateCall:
        """Start sampling; options: seed, top_k, top_p, temperature, condition_scale, rank, format
        ("png" / "jpeg" / "webp"), quality, preview_every. Iterate the result for Progress, Preview,
        GeneratedImage and Done events, or call `.collect()`. `resubmit_unavailable` (default: the
        client's) sends the request again when it fails UNAVAILABLE before its first image."""
        resubmit = self.resubmit_unavailable if resubmit_unavailable is None else resubmit_unavailable
        if resubmit and not options.get("seed"):
            options["seed"] = random_seed()  # chosen here, so a resubmission samples the same images
        request = generate_request(prompt, num_images, **options)
        metadata = metadata_for(request_id, self.security.token)
        return GenerateCall(lambda timeout: self._stub.Generate(request, timeout=timeout, metadata=metadata),
                            timeout or self.timeout, resubmit)

    def generate_images(self, prompt: str, num_images: int = 1, **options) -> GenerateResult:
        return self.generate(prompt, num_images, **options).collect()

    def rank(self, prompt: str, images: Iterable[ImageInput], *, timeout: float | None = None,
             request_id: str | None = None) -> Iterator[RankEvent]:
        """CLIP-score `images` (bytes, paths or PIL images) against `prompt`: Score events as batches
        finish, then RankDone. Images are read and sent one per message, lazily."""
        def requests() -> Iterator[pb.RankRequest]:
            yield pb.RankRequest(prompt=prompt)
            for image in images:
                yield pb.RankRequest(image=image_bytes(image))

        try:
            for msg in self._stub.Rank(requests(), timeout=timeout or self.timeout,
                                       metadata=metadata_for(request_id, self.security.token)):
                yield rank_event(msg)
        except grpc.RpcError as err:
            raise PaletteError.from_rpc_error(err) from None

    def rank_scores(self, prompt: str, images: Iterable[ImageInput], **kwargs) -> tuple[list[float], list[int]]:
        """(scores in input order, indices best first)."""
        scores: dict[int, float] = {}
        for event in self.rank(prompt, images, **kwargs):
            if isinstance(event, Score):
                scores[event.index] = event.score
            elif isinstance(event, RankDone):
                return [scores[i] for i in range(len(scores))], list(event.ranked_indices)
        raise PaletteError(grpc.StatusCode.UNKNOWN, "the stream ended without a done message")

    def info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout or 30.0,
                                           metadata=metadata_for(None, self.security.token))
        except grpc.RpcError as err:
            raise PaletteError.from_rpc_error(err) from None
