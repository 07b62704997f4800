"""The Palette model server: gRPC service, dynamic batcher, lifecycle. Needs the `server` extra."""

from .service import PaletteServer, PaletteServicer, ServerConfig

__all__ = ["PaletteServer", "PaletteServicer", "ServerConfig"]
