"""Turning a GenerateRequest into sampler work, or an INVALID_ARGUMENT the user can act on."""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading

from palette.stages.pipeline import Pipeline, PromptError, PromptTokens, SamplingParams
from palette.v1 import palette_pb2 as pb

from .errors import InvalidArgument
from .images import FORMATS

SEED_SPACE = 2**32 - 1  # seeds are 1..2^32-1; 0 on the wire means "choose one"
DEFAULT_TOP_P = 1.0


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    prompt: str
    prompt_tokens: PromptTokens
    params: tuple[SamplingParams, ...]  # one per image, index order
    rank: bool
    format: int
    quality: int
    preview_every: int


def image_seeds(base: int, count: int) -> list[int]:
    """Image i gets (base + i - 1) mod (2^32 - 1) + 1: consecutive, never 0, so each is reproducible alone."""
    return [(base - 1 + i) % SEED_SPACE + 1 for i in range(count)]


def random_seed() -> int:
    return secrets.randbelow(SEED_SPACE) + 1


# RPC threads validate prompts concurrently; a Hugging Face fast tokenizer changes its padding and
# truncation settings per call, so concurrent calls can get each other's padding. One at a time.
_encode_lock = threading.Lock()


def check_prompt(pipeline: Pipeline, prompt: str) -> PromptTokens:
    try:
        with _encode_lock:
            return pipeline.encode_prompt(prompt)
    except PromptError as err:
        raise InvalidArgument(str(err)) from None


def parse_generate(request: pb.GenerateRequest, pipeline: Pipeline) -> GenerateSpec:
    limits = pipeline.limits
    problems: list[str] = []

    num_images = request.num_images if request.HasField("num_images") else 1
    if not 1 <= num_images <= limits.max_images_per_request:
        problems.append(f"num_images must be 1..{limits.max_images_per_request}, got {num_images}")
    if not 0 <= request.top_k <= pipeline.sampler.max_top_k:
        problems.append(f"top_k must be 0..{pipeline.sampler.max_top_k} (0 = the model default), got {request.top_k}")
    top_p = request.top_p if request.HasField("top_p") else DEFAULT_TOP_P
    if not 0.0 < top_p <= 1.0:  # also refuses NaN
        problems.append(f"top_p must be in (0, 1], got {top_p:g}")
    temperature = request.temperature if request.HasField("temperature") else pipeline.default_temperature
    if not (temperature > 0.0 and math.isfinite(temperature)):
        problems.append(f"temperature must be a finite number > 0, got {temperature:g}")
    scale = request.condition_scale if request.HasField("condition_scale") else pipeline.default_condition_scale
    if not math.isfinite(scale):
        problems.append(f"condition_scale must be a finite number, got {scale:g}")
    if request.format not in FORMATS:
        problems.append(f"format must be IMAGE_FORMAT_PNG (1), IMAGE_FORMAT_JPEG (2) or IMAGE_FORMAT_WEBP (3) "
                        f"(0 = PNG), got {request.format}")
    if request.quality > 100:
        problems.append(f"quality must be 1..100 (0 = default 90), got {request.quality}")
    if request.preview_every > limits.image_length:
        problems.append(f"preview_every must be 0..{limits.image_length} tokens (0 = off), "
                        f"got {request.preview_every}")
    if request.rank and not pipeline.has_ranker:
        problems.append("rank is not available: this server's pipeline has no ranker stage")
    if problems:
        raise InvalidArgument("; ".join(problems))

    prompt_tokens = check_prompt(pipeline, request.prompt)
    seeds = image_seeds(request.seed or random_seed(), num_images)
    params = tuple(SamplingParams(seed=s, top_k=request.top_k, top_p=float(top_p), temperature=float(temperature),
                                  condition_scale=float(scale)) for s in seeds)
    return GenerateSpec(prompt=request.prompt, prompt_tokens=prompt_tokens, params=params, rank=request.rank,
                        format=request.format, quality=request.quality, preview_every=request.preview_every)
