"""Turning a GenerateRequest into sampler work, or an INVALID_ARGUMENT the user can act on."""

from __future__ import annotations

import dataclasses
import secrets

from palette.stages.pipeline import Pipeline, PromptError, PromptTokens, SamplingParams
from palette.v1 import palette_pb2 as pb

from .errors import InvalidArgument
from .images import FORMATS

SEED_SPACE = 2**32 - 1  # seeds are 1..2^32-1; 0 on the wire means "choose one"
DEFAULT_TOP_P = 1.0


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    prompt: str
    prompt_tokens: tuple[PromptTokens, ...]  # one per image (a `<person>` draw follows the image's seed)
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


def check_prompt(pipeline: Pipeline, prompt: str, seeds: list[int] | None = None) -> list[PromptTokens]:
    """The prompt's tokens (one per seed), or INVALID_ARGUMENT saying what is wrong with it."""
    try:
        return pipeline.encode_prompt(prompt, seeds or [0])
    except PromptError as err:
        raise InvalidArgument(str(err)) from None


def parse_generate(request: pb.GenerateRequest, pipeline: Pipeline) -> GenerateSpec:
    """The request as sampler work, or INVALID_ARGUMENT listing every problem with it."""
    limits = pipeline.limits
    problems: list[str] = []

    num_images = request.num_images if request.HasField("num_images") else 1
    if not 1 <= num_images <= limits.max_images_per_request:
        problems.append(f"num_images must be 1..{limits.max_images_per_request}, got {num_images}")
    settings = SamplingParams(
        seed=1, top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else DEFAULT_TOP_P,
        temperature=request.temperature if request.HasField("temperature") else pipeline.default_temperature,
        condition_scale=(request.condition_scale if request.HasField("condition_scale")
                         else pipeline.default_condition_scale))
    problems += settings.problems(pipeline.sampler.max_top_k)
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

    seeds = image_seeds(request.seed or random_seed(), num_images)
    prompt_tokens = check_prompt(pipeline, request.prompt, seeds)
    params = tuple(dataclasses.replace(settings, seed=s) for s in seeds)
    return GenerateSpec(prompt=request.prompt, prompt_tokens=tuple(prompt_tokens), params=params, rank=request.rank,
                        format=request.format, quality=request.quality, preview_every=request.preview_every)
