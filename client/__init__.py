"""The Palette client: needs only grpcio, protobuf and Pillow (no jax).

    from palette.client import PaletteClient

    with PaletteClient("127.0.0.1:50051") as client:
        for event in client.generate("a painting of a fox", 4, rank=True):
            ...  # Progress, Preview, GeneratedImage (as each image is decoded), then Done
"""

from .aio import AsyncPaletteClient
from .events import (Done, GeneratedImage, GenerateEvent, PaletteError, Preview, Progress, RankDone, RankEvent,
                     Score)
from .sync import DEFAULT_TARGET, GenerateCall, GenerateResult, PaletteClient

__all__ = ["PaletteClient", "AsyncPaletteClient", "GenerateCall", "GenerateResult", "PaletteError", "Progress",
           "Preview", "GeneratedImage", "Done", "Score", "RankDone", "GenerateEvent", "RankEvent", "DEFAULT_TARGET"]
