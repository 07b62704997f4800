"""Score generated images against their prompt with CLIP.

`CLIPScorer.score(prompt, images)` returns CLIP's logits_per_image[:, 0]:
exp(logit_scale) * cosine(image, prompt), one float per image; higher is a
better match. Shapes are kept fixed so jit compiles once per bucket:
the prompt is always padded to the model's full text length (the causal mask
and the attention mask make that padding invisible to the pooled EOS state),
and images are padded up to the next bucket size (chunked at the largest).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from palette.stages.clip_processing import CLIPTextTokenizer, image_processor, output_hw, pixel_values
from palette.stages.devices import pad_rows
from palette.stages.models import clip
from palette.stages.models.clip import CLIP

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


class CLIPScorer:
    """Prompt + images -> float32 scores [N] (logits_per_image[:, 0])."""

    def __init__(
        self,
        model: CLIP,
        image_processor: Any,  # transformers' CLIPImageProcessorPil (clip_processing.image_processor)
        tokenizer: CLIPTextTokenizer,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
    ) -> None:
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"CLIPScorer buckets must be positive batch sizes, got {buckets}")
        vc = model.config.vision_config
        if vc.num_channels != 3:
            raise ValueError(f"CLIPScorer scores RGB images; this CLIP model takes {vc.num_channels} channels")
        if output_hw(image_processor) not in (None, vc.image_hw):
            raise ValueError(
                f"the image preprocessor makes {output_hw(image_processor)} images but the CLIP model "
                f"takes {vc.image_hw}"
            )
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.buckets = buckets
        config = model.config

        def score_fn(params: Any, input_ids: jax.Array, attention_mask: jax.Array, pixels: jax.Array) -> jax.Array:
            return clip.forward(params, input_ids, attention_mask, pixels, config)["logits_per_image"][:, 0]

        self._score = jax.jit(score_fn)

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike, dtype: Any = jnp.float32, buckets: Sequence[int] = DEFAULT_BUCKETS
    ) -> "CLIPScorer":
        """Model, preprocessor and tokenizer from one folder (or hub id) such as openai/clip-vit-base-patch32."""
        model = CLIP.from_pretrained(ref, dtype=dtype)
        processor = image_processor(ref, image_size=model.config.vision_config.image_size)
        tokenizer = CLIPTextTokenizer.from_pretrained(ref, max_length=model.config.text_config.max_position_embeddings)
        return cls(model, processor, tokenizer, buckets)

    def bucket_for(self, n: int) -> int:
        """The smallest bucket holding n images (the largest bucket when n exceeds it: chunks)."""
        for size in self.buckets:
            if n <= size:
                return size
        return self.buckets[-1]

    def score(self, prompt: str, images: Sequence[Image.Image], params: Any = None) -> np.ndarray:
        """float32 [len(images)]: exp(logit_scale) * cosine similarity of each image with `prompt`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        images = list(images)
        if not images:
            return np.zeros((0,), np.float32)
        text = self.tokenizer([prompt], pad_to_max_length=True)
        return self.score_pixels(text["input_ids"], text["attention_mask"], self.pixels(images), params)

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The model's float32 NCHW pixels of PIL images (or uint8 HWC arrays)."""
        return pixel_values(self.image_processor, images)

    def score_pixels(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray,
                     params: Any = None) -> np.ndarray:
        """Scores for preprocessed NCHW pixels against one tokenised prompt ([1, L] ids and mask)."""
        params = self.model.params if params is None else params
        n = pixels.shape[0]
        scores = []
        for start in range(0, n, self.buckets[-1]):
            chunk = pixels[start:start + self.buckets[-1]]
            size = self.bucket_for(len(chunk))
            chunk = pad_rows(chunk, size)  # zero rows, scored and dropped: the shape is the bucket's
            out = self._score(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                              jnp.asarray(chunk, jnp.float32))
            scores.append(np.asarray(out, np.float32)[: min(size, n - start)])
        return np.concatenate(scores)
