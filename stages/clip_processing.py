"""CLIP inputs: images -> normalised NCHW pixels, prompts -> token ids.

`CLIPImagePreprocessor` does what transformers' CLIPImageProcessor (Pillow
backend) does, step for step, so a released checkpoint sees the pixels it was
trained on:

1. convert to RGB (transparent images composited onto white),
2. resize so the shortest side is `shortest_edge`, the long side
   `int(shortest_edge * long / short)` (truncated), with Pillow (BICUBIC by default),
3. center crop with top = (H - crop_h) // 2, left = (W - crop_w) // 2; an image
   smaller than the crop is zero-padded around it first,
4. rescale by 1/255 (float64 multiply, then float32) and normalise per channel.

`CLIPTextTokenizer` wraps `transformers.CLIPTokenizerFast` and returns int32
arrays ready for `CLIP.encode_text`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from palette.stages.checkpoint import CheckpointError, resolve_model_dir

PREPROCESSOR_FILE = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_dict(value: Any, what: str, square: bool) -> dict[str, int]:
    """transformers' size conventions: an int means shortest edge (size) or a square (crop_size)."""
    if isinstance(value, (int, float)):
        n = int(value)
        return {"height": n, "width": n} if square else {"shortest_edge": n}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"shortest_edge"} or keys == {"height", "width"}:
            return {k: int(v) for k, v in value.items()}
    raise ValueError(
        f"{PREPROCESSOR_FILE}: {what} must be an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}}, "
        f"got {value!r}"
    )


@dataclass(frozen=True)
class CLIPImagePreprocessor:
    """PIL images -> float32 NCHW pixels, as transformers' CLIPImageProcessor computes them."""

    size: Mapping[str, int] | None = None  # {"shortest_edge": n} or {"height": h, "width": w}
    crop_size: Mapping[str, int] | None = None  # {"height": h, "width": w}
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _size_dict(224 if self.size is None else self.size, "size", square=False))
        object.__setattr__(
            self, "crop_size", _size_dict(224 if self.crop_size is None else self.crop_size, "crop_size", square=True)
        )
        object.__setattr__(self, "image_mean", tuple(float(x) for x in np.broadcast_to(self.image_mean, (3,))))
        object.__setattr__(self, "image_std", tuple(float(x) for x in np.broadcast_to(self.image_std, (3,))))
        try:
            Image.Resampling(int(self.resample))
        except ValueError as err:
            raise ValueError(
                f"{PREPROCESSOR_FILE}: resample {self.resample!r} is not a Pillow filter "
                f"(valid: {[int(r) for r in Image.Resampling]})"
            ) from err

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> "CLIPImagePreprocessor":
        """Read `preprocessor_config.json`; without one, openai CLIP's recipe at the model's image size.

        `image_size` (else `vision_config.image_size` from config.json, else 224) sets resize and crop when
        there is no preprocessor file.
        """
        folder = resolve_model_dir(ref)
        path = folder / PREPROCESSOR_FILE
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            names = {"size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop",
                     "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"}
            kwargs = {k: v for k, v in data.items() if k in names and v is not None}
            if kwargs.get("do_resize", True) and "size" not in kwargs and "crop_size" in kwargs:
                # A file with only a crop size: resize the short side to it, as CLIP does.
                crop = _size_dict(kwargs["crop_size"], "crop_size", square=True)
                kwargs["size"] = {"shortest_edge": min(crop["height"], crop["width"])}
            return cls(**kwargs)
        if image_size is None:
            config_path = folder / "config.json"
            if config_path.is_file():
                with open(config_path, encoding="utf-8") as f:
                    image_size = (json.load(f).get("vision_config") or {}).get("image_size")
        if image_size is None:
            image_size = 224
        if isinstance(image_size, (list, tuple)):
            h, w = (int(v) for v in image_size)
            return cls(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})
        return cls(size={"shortest_edge": int(image_size)}, crop_size=int(image_size))

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(H, W) of every output image, or None when it depends on the input (no crop, shortest-edge resize)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """A list of PIL images -> float32 [N, 3, H, W]."""
        if isinstance(images, Image.Image):
            images = [images]
        arrays = [self.preprocess_one(image) for image in images]
        if not arrays:
            hw = self.output_hw or (0, 0)
            return np.zeros((0, 3, *hw), np.float32)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"preprocessed images differ in shape {sorted(shapes)}; enable do_center_crop")
        return np.stack(arrays)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise TypeError(f"CLIPImagePreprocessor takes PIL images, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = _to_rgb(image)
        if self.do_resize:
            image = image.resize(self._resized_wh(image.width, image.height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        pixels = pixels.transpose(2, 0, 1)  # HWC -> CHW
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        out = pixels.astype(np.float32)
        if self.do_rescale:
            # transformers multiplies in float64, then rounds to float32.
            out = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            std = np.asarray(self.image_std, np.float32)[:, None, None]
            out = (out - mean) / std
        return out.astype(np.float32, copy=False)

    def _resized_wh(self, width: int, height: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["width"], self.size["height"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)  # truncation, as transformers (and torchvision) do
        return (target, new_long) if width <= height else (new_long, target)


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """CHW center crop; smaller images are first zero-padded (ceil of half the shortfall on top/left)."""
    _, h, w = pixels.shape
    if h < crop_h or w < crop_w:
        new_h, new_w = max(h, crop_h), max(w, crop_w)
        top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded = np.zeros((pixels.shape[0], new_h, new_w), pixels.dtype)
        padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = pixels
        top = (h - crop_h) // 2 + top_pad
        left = (w - crop_w) // 2 + left_pad
        return padded[:, max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return pixels[:, top:top + crop_h, left:left + crop_w]


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
