"""Errors that end an RPC with a chosen status code and a message meant for the caller."""

from __future__ import annotations

from typing import Any, Callable

import grpc


class RpcFailure(Exception):
    """End the call with `code` and `message`; `trailers` go into the trailing metadata."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.trailers = trailers


class InvalidArgument(RpcFailure):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RpcFailure):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(RpcFailure):
    code = grpc.StatusCode.CANCELLED


class Unavailable(RpcFailure):
    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(RpcFailure):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message, trailers=(("retry-after-ms", str(retry_after_ms)),))
        self.retry_after_ms = retry_after_ms


class Undecodable:
    """What `tolerant_deserializer` gives for bytes that are not a valid message of the expected type:
    the transport reports it as INVALID_ARGUMENT (the client's fault, never INTERNAL) once it knows
    who called. Picklable, so Ray Serve's proxy can hand it to a replica."""

    def __init__(self, type_name: str, error: Exception):
        self.failure = InvalidArgument(f"the {type_name} message could not be decoded ({error}); "
                                       f"check that strings are valid UTF-8 and the body is complete")


def tolerant_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as err:  # noqa: BLE001 - DecodeError and friends: the client sent bad bytes
            return Undecodable(message_type.DESCRIPTOR.name, err)

    return parse


def decoded(message: Any) -> Any:
    """The message, or its InvalidArgument when it could not be decoded."""
    if isinstance(message, Undecodable):
        raise message.failure
    return message
