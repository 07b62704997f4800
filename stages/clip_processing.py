"""CLIP inputs: images -> normalised NCHW pixels, prompts -> token ids.

Images go through transformers' `CLIPImageProcessorPil`: the Pillow backend of
`CLIPImageProcessor`, which resizes with Pillow as the released checkpoints'
preprocessing did (the default backend in transformers 5 resizes with torchvision,
and its pixels differ). `image_processor(ref)` reads `preprocessor_config.json`;
`pixel_values(processor, images)` gives float32 [N, 3, H, W].

`CLIPTextTokenizer` wraps `transformers.CLIPTokenizerFast` and returns int32
arrays ready for `CLIP.encode_text`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from palette.stages.checkpoint import CheckpointError, resolve_model_dir

PREPROCESSOR_FILE = "preprocessor_config.json"


def image_processor(ref: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> CLIPImageProcessorPil:
    """The folder's (or hub id's) `preprocessor_config.json`; without one, openai CLIP's recipe at the
    model's image size: `image_size`, else `vision_config.image_size` from config.json, else 224."""
    folder = resolve_model_dir(ref)
    path = folder / PREPROCESSOR_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("do_resize", True) and data.get("size") is None and data.get("crop_size") is not None:
            # A file with only a crop size: resize the short side to it, as CLIP does.
            crop = data["crop_size"]
            side = min(crop.values()) if isinstance(crop, dict) else crop
            return CLIPImageProcessorPil.from_pretrained(str(folder), size={"shortest_edge": int(side)})
        return CLIPImageProcessorPil.from_pretrained(str(folder))
    if image_size is None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        image_size = (config.get("vision_config") or {}).get("image_size")
    h, w = (224, 224) if image_size is None else _pair(image_size)
    return CLIPImageProcessorPil(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def output_hw(processor: CLIPImageProcessorPil) -> tuple[int, int] | None:
    """(H, W) of every image the processor makes, or None when it depends on the input."""
    if processor.do_center_crop:
        return processor.crop_size.height, processor.crop_size.width
    if processor.do_resize and processor.size.height:
        return processor.size.height, processor.size.width
    return None


def pixel_values(processor: CLIPImageProcessorPil, images: Sequence[Any]) -> np.ndarray:
    """PIL images or uint8 HWC arrays -> float32 [N, 3, H, W] (all the same size: a crop or a fixed resize)."""
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    return np.asarray(pixels, np.float32)


class CLIPTextTokenizer:
    """Prompts -> int32 `input_ids` / `attention_mask`, truncated to the model's text length.

    CLIP's tokenizer pads with the EOS id, its largest id; the model pools at the first largest id, the
    first EOS, so padding never matters.
    """

    TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"CLIP text max_length must be >= 2 (BOS + EOS), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, max_length: int | None = None) -> "CLIPTextTokenizer":
        """Load the tokenizer files in `ref`; `max_length` defaults to text_config.max_position_embeddings."""
        folder = resolve_model_dir(ref)
        has_json = (folder / "tokenizer.json").is_file()
        has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not (has_json or has_bpe):
            raise CheckpointError(
                f"{folder} has no CLIP tokenizer: it needs tokenizer.json, or vocab.json and merges.txt "
                f"(as in openai/clip-vit-base-patch32)"
            )
        from transformers import CLIPTokenizerFast

        tokenizer = CLIPTokenizerFast.from_pretrained(str(folder))
        largest = max(tokenizer.get_vocab().values())
        if tokenizer.eos_token_id != largest:
            # CLIP's text tower reads a caption at argmax(input_ids) (FlaxCLIPModel's pooling): with
            # another id on top it would read that word instead, and drop every word after it.
            raise CheckpointError(
                f"{folder}: the CLIP tokenizer's EOS id ({tokenizer.eos_token_id}) is not its largest id "
                f"({largest}); CLIP pools each caption at its largest id, so EOS must be the last id, "
                f"as in openai/clip-vit-base-patch32 (49407)"
            )
        if max_length is None:
            max_length = _text_length_from_config(Path(folder))
        if max_length is None:
            max_length = int(tokenizer.model_max_length)
            if max_length > 10_000:  # transformers' "unset" sentinel is a huge number
                raise CheckpointError(
                    f"{folder}: cannot tell the text length (no config.json text_config.max_position_embeddings, "
                    f"no tokenizer model_max_length); pass max_length"
                )
        return cls(tokenizer, max_length)

    def __call__(self, texts: str | Sequence[str], pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Tokenise a batch, padded to the longest row (or to `max_length` for one fixed shape)."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(
            list(texts),
            padding="max_length" if pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {
            "input_ids": np.asarray(encoded["input_ids"], np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], np.int32),
        }


def _text_length_from_config(folder: Path) -> int | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    text = dict(config.get("text_config") or {})
    text.update(config.get("text_config_dict") or {})
    if "max_position_embeddings" in text:
        return int(text["max_position_embeddings"])
    if config.get("model_type") == "clip":
        return 77  # transformers' CLIPTextConfig default
    return None
