"""The Palette model server: the RPCs' one implementation (core), its transports, batching, lifecycle.

Needs the `server` extra.
"""

from .core import CoreConfig, PaletteCore
from .service import PaletteServer, PaletteServicer, ServerConfig

__all__ = ["PaletteServer", "PaletteServicer", "ServerConfig", "PaletteCore", "CoreConfig"]
