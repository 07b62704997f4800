"""Helpers for the Ray Serve tests: free ports, a compilation cache the replicas share, health checks."""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile

import grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=1)
def jax_cache_env() -> dict[str, str]:
    """Environment for Ray nodes (their processes inherit it) whose replicas share compiled code: a
    replica after the first starts in seconds rather than half a minute. One folder per test run."""
    folder = tempfile.mkdtemp(prefix="palette-test-jax-cache-")
    atexit.register(shutil.rmtree, folder, True)
    return dict(JAX_COMPILATION_CACHE_DIR=folder, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def health_status(address: str, service: str = "", timeout: float = 10) -> int:
    """grpc.health.v1 Check's status at `address` (RpcError for NOT_FOUND and the like)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return reply.status
