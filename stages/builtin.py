"""The four built-in stages of the DALL·E Mini pipeline, registered as entry points.

text processor -> BART sampler -> VQGAN decoder -> CLIP ranker. Each wraps one
model module; the pipeline config names its checkpoint and options.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .base import IMAGE, IMAGE_TOKENS, PROMPT, PROMPT_TOKENS, SAMPLING, SCORE, Stage, StageContext
from .devices import pad_rows

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


class PromptError(ValueError):
    """A prompt the model cannot take; the message is meant for the user."""


def stage_dtype(options: dict[str, Any], context: StageContext) -> str:
    """The stage's compute dtype: its own option, else the pipeline's; "auto" is bfloat16 on an
    accelerator (where bf16 matmuls are native) and float32 on CPU (where they are not)."""
    name = options.get("dtype", context.dtype)
    if name == "auto":
        return "float32" if context.devices.platform == "cpu" else "bfloat16"
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    try:
        return getattr(jnp, DTYPE_NAMES[name])
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {name!r}") from None


def _chunks(n: int, largest: int) -> list[int]:
    """Split n items into chunks of at most `largest`."""
    return [min(largest, n - start) for start in range(0, n, largest)]


class TextProcessorStage(Stage):
    """Normalises the prompt as DALL·E Mini did in training and tokenises it (+ the empty prompt)."""

    kind = "text"
    consumes = (PROMPT,)
    produces = (PROMPT_TOKENS,)

    def initialize(self, context: StageContext) -> None:
        from .text import DalleBartTextProcessor

        self.checkpoint = context.resolve(self.options["checkpoint"])
        wff = self.options.get("word_frequency_file")
        self.processor = DalleBartTextProcessor.from_pretrained(
            self.checkpoint, word_frequency_file=context.resolve(wff) if wff else None)
        self.max_prompt_chars = int(self.options.get("max_prompt_chars", 1000))
        self.max_prompt_tokens = int(self.processor.max_text_length)

    def encode(self, prompt: str, seeds: Sequence[int] = (0,)) -> list:
        """PromptTokens for each image seed, or PromptError saying what is wrong with the prompt.

        DALL·E Mini's normaliser replaces a lone `<person>` with a phrase drawn at random. The draw
        comes from the image's seed, so a seed gives the same image every time; a prompt that draws
        nothing is normalised and tokenised once for all its images.
        """
        from .sampler import PromptTokens
        from .text import DrawRecorder

        if not prompt or not prompt.strip():
            raise PromptError("prompt is empty; describe the image you want")
        if len(prompt) > self.max_prompt_chars:
            raise PromptError(f"prompt is {len(prompt)} characters; the limit is {self.max_prompt_chars}")
        rng = DrawRecorder(seeds[0])
        texts = [self.processor.normalize(prompt, rng)]
        if not texts[0].strip():
            raise PromptError("prompt has no words left after normalisation (URLs, punctuation and invisible "
                              "characters are dropped); describe the image in words")
        count = self.processor.normalized_token_count(texts[0])
        if count > self.max_prompt_tokens:
            raise PromptError(
                f"prompt is {count} tokens after normalisation; the model reads at most {self.max_prompt_tokens} "
                f"tokens (including the 2 start/end tokens): shorten it")
        if rng.drew:
            texts += [self.processor.normalize(prompt, random.Random(seed)) for seed in seeds[1:]]
        enc = self.processor.encode_normalized(texts)
        tokens = [PromptTokens(enc["input_ids"][i], enc["attention_mask"][i], enc["input_ids_uncond"][i],
                               enc["attention_mask_uncond"][i]) for i in range(len(texts))]
        return tokens if rng.drew else tokens * len(seeds)

    def execute(self, batch):
        for item in batch:
            item[PROMPT_TOKENS] = self.encode(item[PROMPT], [item[SAMPLING].seed])[0]
        return batch

    def describe(self):
        return {**super().describe(), "checkpoint": self.checkpoint, "max_prompt_tokens": self.max_prompt_tokens,
                "max_prompt_chars": self.max_prompt_chars}


class BartSamplerStage(Stage):
    """DalleBart encoder once, then 256 image tokens sampled with super conditioning (see sampler.py).

    The server drives `self.engine` directly (continuous batching); `execute` runs
    a whole batch to completion for in-process use and benchmarks.
    """

    kind = "sampler"
    consumes = (PROMPT_TOKENS, SAMPLING)
    produces = (IMAGE_TOKENS,)
    tunable = ("num_slots", "chunk_steps", "max_top_k", "default_top_k", "dtype")

    def initialize(self, context: StageContext) -> None:
        from .models.dallebart import DalleBart
        from .sampler import DEFAULT_TOP_K, SamplerEngine

        self.checkpoint = context.resolve(self.options["checkpoint"])
        self.dtype = stage_dtype(self.options, context)
        self.model = DalleBart.from_pretrained(self.checkpoint, dtype=_jnp_dtype(self.dtype))
        self.engine = SamplerEngine(self.model, context.devices, num_slots=int(self.options.get("num_slots", 8)),
                                    chunk_steps=int(self.options.get("chunk_steps", 16)),
                                    max_top_k=int(self.options.get("max_top_k", 256)),
                                    default_top_k=int(self.options.get("default_top_k", DEFAULT_TOP_K)))

    def execute(self, batch):
        for start in range(0, len(batch), self.engine.num_slots):
            group = batch[start:start + self.engine.num_slots]
            final = {}
            for progress in self.engine.run([it[PROMPT_TOKENS] for it in group], [it[SAMPLING] for it in group]):
                final.update({p.slot: p.tokens for p in progress})
            for item, slot in zip(group, sorted(final)):
                item[IMAGE_TOKENS] = final[slot]
        return batch

    def describe(self):
        c = self.model.config
        return {**super().describe(), "checkpoint": self.checkpoint, "dtype": self.dtype,
                "num_slots": self.engine.num_slots, "chunk_steps": self.engine.chunk_steps,
                "max_top_k": self.engine.max_top_k, "default_top_k": self.engine.default_top_k,
                "d_model": c.d_model, "layers": [c.encoder_layers, c.decoder_layers],
                "image_length": c.image_length, "max_text_length": c.max_text_length}


class VQGANDecoderStage(Stage):
    """Image tokens (a square grid of codebook indices) -> RGB images."""

    kind = "image_decoder"
    consumes = (IMAGE_TOKENS,)
    produces = (IMAGE,)

    def initialize(self, context: StageContext) -> None:
        from .models.vqgan import VQGAN

        self.checkpoint = context.resolve(self.options["checkpoint"])
        self.dtype = stage_dtype(self.options, context)
        self.batch_size = int(self.options.get("batch_size", 8))
        self.vqgan = VQGAN.from_pretrained(self.checkpoint, dtype=_jnp_dtype(self.dtype))
        self.vqgan.params = context.devices.place_params(self.vqgan.params)
        self.devices = context.devices
        self.codebook_size = int(self.vqgan.config.n_embed)

    def decode(self, tokens: np.ndarray) -> list[Image.Image]:
        # The sampler may emit ids past the codebook (the decoder-start id, EOS padding on a
        # row that stopped early); they are clamped as the original's gather did.
        tokens = np.clip(np.asarray(tokens, np.int32), 0, self.codebook_size - 1)
        images: list[Image.Image] = []
        done = 0
        # Always whole batches of `batch_size` rows: XLA:CPU picks its conv kernels by batch size,
        # and their rounding differs, so an image decoded alone and one decoded among others
        # would differ in a pixel or two. One shape keeps a seed's image the same bytes however
        # the server batched it. (batch_size = 1 decodes one image at a time.)
        for count in _chunks(len(tokens), self.batch_size):
            chunk = pad_rows(tokens[done:done + count], self.devices.round_batch(self.batch_size), fill=None)
            pixels = np.asarray(self.vqgan.decode_images(self.devices.place_batch(chunk)))
            images.extend(Image.fromarray(p) for p in pixels[:count])
            done += count
        return images

    def execute(self, batch):
        for item, image in zip(batch, self.decode(np.stack([it[IMAGE_TOKENS] for it in batch]))):
            item[IMAGE] = image
        return batch

    def describe(self):
        c = self.vqgan.config
        return {**super().describe(), "checkpoint": self.checkpoint, "dtype": self.dtype,
                "codebook_size": self.codebook_size, "resolution": c.resolution}


class CLIPRankerStage(Stage):
    """Scores each image against its prompt with CLIP (scaled cosine similarity; higher is better)."""

    kind = "ranker"
    consumes = (PROMPT, IMAGE)
    produces = (SCORE,)

    def initialize(self, context: StageContext) -> None:
        from .ranker import CLIPScorer

        self.checkpoint = context.resolve(self.options["checkpoint"])
        self.dtype = stage_dtype(self.options, context)
        self.scorer = CLIPScorer.from_pretrained(self.checkpoint, dtype=_jnp_dtype(self.dtype))
        self.scorer.model.params = context.devices.place_params(self.scorer.model.params)

    def score(self, prompt: str, images: list[Image.Image]) -> list[float]:
        return [float(s) for s in self.scorer.score(prompt, images)]

    def execute(self, batch):
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for item in batch:
            by_prompt.setdefault(item[PROMPT], []).append(item)
        for prompt, items in by_prompt.items():
            for item, s in zip(items, self.score(prompt, [it[IMAGE] for it in items])):
                item[SCORE] = s
        return batch

    def describe(self):
        return {**super().describe(), "checkpoint": self.checkpoint, "dtype": self.dtype}
