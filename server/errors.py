"""Errors that end an RPC with a chosen status code and a message meant for the caller."""

from __future__ import annotations

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


def undecodable(type_name: str, error: Exception) -> InvalidArgument:
    """The client sent bytes (or JSON) that are not a `type_name` message: its fault, never INTERNAL."""
    return InvalidArgument(f"the {type_name} message could not be decoded ({error}); "
                           f"check that strings are valid UTF-8 and the body is complete")
