"""Typed events for what a Palette server streams, and the error a failed call raises."""

from __future__ import annotations

import dataclasses
import io
import os
import secrets
from typing import Any, Union

import grpc
import grpc.aio
from PIL import Image

from palette.v1 import palette_pb2 as pb

EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "jpg": pb.IMAGE_FORMAT_JPEG,
           "webp": pb.IMAGE_FORMAT_WEBP}


class PaletteError(Exception):
    """A call failed. `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None,
                 retry_after_s: float | None = None):
        self.code = code
        self.details = details
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        hint = f" (retry after {retry_after_s:.1f} s)" if retry_after_s is not None else ""
        super().__init__(f"{code.name}: {details}{hint}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "PaletteError":
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = (err.details() if hasattr(err, "details") else None) or str(err)
        retry = None
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == "retry-after-ms":
                try:
                    retry = int(value) / 1000
                except ValueError:
                    pass
        request_id = None
        try:
            for key, value in err.initial_metadata() or ():
                if key == "x-request-id":
                    request_id = value
        except Exception:  # noqa: BLE001 - not every RpcError carries metadata
            pass
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
            details = f"{details} (is a server running? start one with `palette serve`)"
        return cls(code, details, request_id, retry)


@dataclasses.dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int
    images_sampled: int
    images_queued: int

    @property
    def fraction(self) -> float:
        return self.tokens_done / self.tokens_total if self.tokens_total else 0.0


@dataclasses.dataclass(frozen=True)
class _Encoded:
    data: bytes
    mime_type: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.mime_type, ".bin")

    def to_pil(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self.data)


@dataclasses.dataclass(frozen=True)
class Preview(_Encoded):
    index: int = 0
    tokens_done: int = 0


@dataclasses.dataclass(frozen=True)
class GeneratedImage(_Encoded):
    index: int = 0
    seed: int = 0
    score: float | None = None  # CLIP score when the request ranked


@dataclasses.dataclass(frozen=True)
class Done:
    ranked_indices: tuple[int, ...]
    queue_ms: float
    sampling_ms: float
    decode_ms: float
    rank_ms: float
    time_to_first_image_ms: float
    total_ms: float
    request_id: str


@dataclasses.dataclass(frozen=True)
class Score:
    index: int
    score: float


@dataclasses.dataclass(frozen=True)
class RankDone:
    ranked_indices: tuple[int, ...]
    total_ms: float
    request_id: str


GenerateEvent = Union[Progress, Preview, GeneratedImage, Done]
RankEvent = Union[Score, RankDone]


def generate_event(msg: pb.GenerateResponse) -> GenerateEvent:
    kind = msg.WhichOneof("event")
    if kind == "progress":
        p = msg.progress
        return Progress(p.tokens_done, p.tokens_total, p.images_sampled, p.images_queued)
    if kind == "preview":
        p = msg.preview
        return Preview(p.data, p.mime_type, p.width, p.height, index=p.index, tokens_done=p.tokens_done)
    if kind == "image":
        m = msg.image
        return GeneratedImage(m.data, m.mime_type, m.width, m.height, index=m.index, seed=m.seed,
                              score=m.score if m.has_score else None)
    if kind == "done":
        d = msg.done
        return Done(tuple(d.ranked_indices), d.queue_ms, d.sampling_ms, d.decode_ms, d.rank_ms,
                    d.time_to_first_image_ms, d.total_ms, d.request_id)
    raise ValueError(f"unknown Generate event {kind!r} (is the client older than the server?)")


def rank_event(msg: pb.RankResponse) -> RankEvent:
    kind = msg.WhichOneof("event")
    if kind == "score":
        return Score(msg.score.index, msg.score.score)
    if kind == "done":
        return RankDone(tuple(msg.done.ranked_indices), msg.done.total_ms, msg.done.request_id)
    raise ValueError(f"unknown Rank event {kind!r} (is the client older than the server?)")


def generate_request(prompt: str, num_images: int = 1, *, seed: int = 0, top_k: int = 0,
                     top_p: float | None = None, temperature: float | None = None,
                     condition_scale: float | None = None, rank: bool = False, format: str | int = "png",
                     quality: int = 0, preview_every: int = 0) -> pb.GenerateRequest:
    if isinstance(format, str):
        try:
            format = FORMATS[format.lower()]
        except KeyError:
            raise ValueError(f"format must be one of png, jpeg, webp; got {format!r}") from None
    request = pb.GenerateRequest(prompt=prompt, num_images=num_images, seed=seed, top_k=top_k, rank=rank,
                                 format=format, quality=quality, preview_every=preview_every)
    if top_p is not None:
        request.top_p = top_p
    if temperature is not None:
        request.temperature = temperature
    if condition_scale is not None:
        request.condition_scale = condition_scale
    return request


ImageInput = Union[bytes, str, os.PathLike, Image.Image]

SEED_SPACE = 2**32 - 1  # seeds are 1..2^32-1 on the wire; 0 asks the server to choose


def random_seed() -> int:
    return secrets.randbelow(SEED_SPACE) + 1


def image_bytes(image: ImageInput) -> bytes:
    """Bytes for a Rank upload: encoded bytes as they are, a file's contents, or a PIL image as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    with open(image, "rb") as f:
        return f.read()


def metadata_for(request_id: str | None, token: str | None = None) -> tuple[tuple[str, str], ...] | None:
    metadata = []
    if request_id:
        metadata.append(("x-request-id", request_id))
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return tuple(metadata) or None


def channel_options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024)]


@dataclasses.dataclass(frozen=True)
class Security:
    """How to reach a server: TLS (with the system's roots or `ca`), a client certificate (mTLS), a token.

    `token` defaults to $PALETTE_TOKEN; it is sent as `authorization: Bearer <token>` on every call.
    """

    tls: bool = False
    ca: str | os.PathLike | None = None  # PEM file of the CA that signed the server's certificate
    cert: str | os.PathLike | None = None  # client certificate (PEM), with `key`
    key: str | os.PathLike | None = None
    token: str | None = None

    @classmethod
    def of(cls, tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None, token: str | None = None) -> "Security":
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        token = token if token is not None else os.environ.get("PALETTE_TOKEN") or None
        return cls(tls=bool(tls or tls_ca or tls_cert), ca=tls_ca, cert=tls_cert, key=tls_key, token=token)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))

    def channel(self, target: str, aio: bool = False) -> Any:
        module = grpc.aio if aio else grpc
        credentials = self.credentials()
        if credentials is None:
            return module.insecure_channel(target, options=channel_options())
        return module.secure_channel(target, credentials, options=channel_options())
