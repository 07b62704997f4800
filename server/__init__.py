"""The Palette model server: the RPCs' one implementation (core), its transports, batching, lifecycle.

Needs the `server` extra. The names below are imported on first use, so that a light submodule
(the hook that runs inside Ray Serve's gRPC proxy, say) can be imported without jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"PaletteServer": ".service", "PaletteServicer": ".service", "ServerConfig": ".service",
            "PaletteCore": ".core", "CoreConfig": ".core"}

__all__ = ["PaletteServer", "PaletteServicer", "ServerConfig", "PaletteCore", "CoreConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
