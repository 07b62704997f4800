"""A contact sheet: generated images in a grid, each captioned with its seed and CLIP score."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .events import GeneratedImage

MIN_CELL = 160  # small images are enlarged (nearest neighbour) so captions fit
PAD = 4
CAPTION = 30


def contact_sheet(images: Sequence[GeneratedImage], title: str = "") -> Image.Image:
    """Images in the given order (pass them best first to show a ranking), captioned
    "#index seed S" and, when ranked, "score X"."""
    if not images:
        raise ValueError("no images for a contact sheet")
    pils = [im.to_pil().convert("RGB") for im in images]
    cell_w = max(MIN_CELL, max(p.width for p in pils))
    cell_h = max(round(cell_w * p.height / p.width) for p in pils)
    cols = math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / cols)
    font = ImageFont.load_default()
    header = CAPTION if title else 0
    sheet = Image.new("RGB", (cols * (cell_w + PAD) + PAD, header + rows * (cell_h + CAPTION + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), title if len(title) <= 100 else title[:97] + "...", fill="black", font=font)
    for n, (meta, pil) in enumerate(zip(images, pils)):
        x = PAD + (n % cols) * (cell_w + PAD)
        y = header + PAD + (n // cols) * (cell_h + CAPTION + PAD)
        if pil.size != (cell_w, cell_h):
            pil = pil.resize((cell_w, cell_h), Image.NEAREST)
        sheet.paste(pil, (x, y))
        caption = f"#{meta.index} seed {meta.seed}"
        draw.text((x, y + cell_h + 2), caption, fill="black", font=font)
        if meta.score is not None:
            draw.text((x, y + cell_h + 15), f"score {meta.score:.4f}", fill="black", font=font)
    return sheet
