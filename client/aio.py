"""The asyncio client (grpc.aio): `async for event in client.generate(...)`."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterable

import grpc
import grpc.aio

from palette.v1 import palette_pb2 as pb
from palette.v1 import palette_pb2_grpc as pb_grpc

from .events import (Done, GenerateEvent, GeneratedImage, ImageInput, PaletteError, RankEvent, Security,
                     generate_event, generate_request, image_bytes, metadata_for, random_seed, rank_event)
from .sync import DEFAULT_TARGET, GenerateResult


class AsyncPaletteClient:
    """Like PaletteClient, for asyncio. Use `async with AsyncPaletteClient(...) as client:`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None, resubmit_unavailable: int = 0):
        self.target = target
        self.timeout = timeout
        self.resubmit_unavailable = resubmit_unavailable
        self.security = Security.of(tls, tls_ca, tls_cert, tls_key, token)
        self._channel = self.security.channel(target, aio=True)
        self._stub = pb_grpc.PaletteStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPaletteClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: str, num_images: int = 1, *, timeout: float | None = None,
                       request_id: str | None = None, resubmit_unavailable: int | None = None,
                       **options) -> AsyncIterator[GenerateEvent]:
        """Progress, Preview, GeneratedImage and Done events as they stream. Leaving the loop early
        (break, exception, task cancellation) cancels the call, and the server frees its rows.
        `resubmit_unavailable`: as PaletteClient.generate."""
        resubmit = self.resubmit_unavailable if resubmit_unavailable is None else resubmit_unavailable
        if resubmit and not options.get("seed"):
            options["seed"] = random_seed()  # chosen here, so a resubmission samples the same images
        request = generate_request(prompt, num_images, **options)
        metadata = metadata_for(request_id, self.security.token)
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout if timeout else None
        attempts = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            call = self._stub.Generate(request, timeout=remaining, metadata=metadata)
            sent_image = False
            try:
                async for msg in call:
                    event = generate_event(msg)
                    sent_image |= isinstance(event, GeneratedImage)
                    yield event
                return
            except grpc.aio.AioRpcError as err:
                error = PaletteError.from_rpc_error(err)
            finally:
                call.cancel()  # a no-op when the stream already finished
            if (sent_image or attempts >= resubmit or error.code != grpc.StatusCode.UNAVAILABLE
                    or (deadline is not None and time.monotonic() >= deadline)):
                raise error
            attempts += 1
            await asyncio.sleep(error.retry_after_s or min(2.0, 0.1 * 2 ** attempts))

    async def generate_images(self, prompt: str, num_images: int = 1, **options) -> GenerateResult:
        images: list[GeneratedImage] = []
        async for event in self.generate(prompt, num_images, **options):
            if isinstance(event, GeneratedImage):
                images.append(event)
            elif isinstance(event, Done):
                return GenerateResult(sorted(images, key=lambda im: im.index), event)
        raise PaletteError(grpc.StatusCode.UNKNOWN, "the stream ended without a done message")

    async def rank(self, prompt: str, images: Iterable[ImageInput], *, timeout: float | None = None,
                   request_id: str | None = None) -> AsyncIterator[RankEvent]:
        async def requests():
            yield pb.RankRequest(prompt=prompt)
            for image in images:
                yield pb.RankRequest(image=image_bytes(image))

        call = self._stub.Rank(requests(), timeout=timeout or self.timeout,
                               metadata=metadata_for(request_id, self.security.token))
        try:
            async for msg in call:
                yield rank_event(msg)
        except grpc.aio.AioRpcError as err:
            raise PaletteError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout or 30.0,
                                                 metadata=metadata_for(None, self.security.token))
        except grpc.aio.AioRpcError as err:
            raise PaletteError.from_rpc_error(err) from None
