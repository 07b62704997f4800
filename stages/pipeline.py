"""A pipeline: stages assembled from a TOML config, sharing one device state.

    [pipeline]
    dtype = "auto"               # compute dtype unless a stage says otherwise: auto = bf16 on GPU/TPU, fp32 on CPU
    max_images_per_request = 16
    condition_scale = 10.0       # used when a request leaves it unset
    temperature = 1.0            # used when a request leaves it unset

    [[stages]]                   # in execution order
    name = "text"
    type = "text"                # entry point in group palette.stages, or "module:Class"
    checkpoint = "dallebart"     # relative to this file, absolute, or a hub id

    [[stages]]
    name = "sampler"
    type = "bart_sampler"
    checkpoint = "dallebart"
    num_slots = 8                # rows decoded together (continuous batching)
    chunk_steps = 16             # tokens per engine step (cancellation and preview granularity)
    ...

The wiring is checked when the pipeline is built: every value a stage consumes
must be a pipeline input or produced by an earlier stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .base import (IMAGE, IMAGE_TOKENS, PIPELINE_INPUTS, PROMPT, PROMPT_TOKENS, SAMPLING, SCORE, Stage,
                   StageContext, StageError, find_stage_class)
from .builtin import PromptError
from .devices import DeviceState
from .sampler import PromptTokens, SamplerEngine, SamplingParams, SlotProgress

__all__ = ["Pipeline", "Limits", "PromptError", "PromptTokens", "SamplingParams", "SlotProgress", "SamplerEngine",
           "default_config_path", "StageError"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_config_path() -> Path:
    """The embedded default model set (PALETTE_MODELS_DIR overrides the folder)."""
    root = Path(os.environ.get("PALETTE_MODELS_DIR", REPO_ROOT / "models" / "default"))
    return root / "pipeline.toml"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_prompt_chars: int
    max_prompt_tokens: int
    max_images_per_request: int
    num_slots: int
    image_length: int
    image_size: tuple[int, int]  # (height, width)


PIPELINE_SETTINGS = ("dtype", "max_images_per_request", "model_parallel", "condition_scale", "temperature")
DEFAULT_CONDITION_SCALE = 10.0  # DALL·E Mini's; a pipeline may set its own under [pipeline]
DEFAULT_TEMPERATURE = 1.0  # likewise


def sampling_defaults(settings: dict[str, Any]) -> tuple[float, float]:
    """(condition_scale, temperature) a request gets when it leaves them unset; StageError if unusable."""
    try:
        scale = float(settings.get("condition_scale", DEFAULT_CONDITION_SCALE))
        temperature = float(settings.get("temperature", DEFAULT_TEMPERATURE))
    except (TypeError, ValueError) as err:
        raise StageError(f"[pipeline] condition_scale and temperature must be numbers: {err}") from None
    problems = SamplingParams(seed=1, temperature=temperature, condition_scale=scale).problems()
    if problems:
        raise StageError(f"[pipeline] {'; '.join(problems)}")
    return scale, temperature


def _model_parallel(settings: dict[str, Any], stages: Sequence[Stage], base_dir: Path) -> int:
    """`model_parallel` from the config: a number, or "auto" (default): 1 while a replica of every
    stage's weights fits one device, else the smallest split over the local devices that fits."""
    import jax

    wanted = settings.get("model_parallel", "auto")
    if wanted != "auto":
        return int(wanted)
    count = jax.local_device_count()
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if count == 1 or not limit:
        return 1  # CPU reports no limit: weights live in host memory
    weights = 0
    for stage in stages:
        ref = stage.options.get("checkpoint")
        weights_file = (base_dir / ref / "flax_model.msgpack") if ref else None
        if weights_file and weights_file.is_file():
            weights += weights_file.stat().st_size
    for split in (n for n in range(1, count + 1) if count % n == 0):
        if weights / split < 0.6 * limit:  # room left for activations and the decode caches
            return split
    return count


def check_wiring(stages: Sequence[Stage]) -> None:
    """Every value a stage consumes must be a pipeline input or produced by an earlier stage."""
    available = set(PIPELINE_INPUTS)
    for stage in stages:
        missing = [name for name in stage.consumes if name not in available]
        if missing:
            raise StageError(f"stage {stage.name!r} consumes {missing}, which no earlier stage produces "
                             f"(available: {sorted(available)})")
        available.update(stage.produces)


class Pipeline:
    def __init__(self, stages: Sequence[Stage], devices: DeviceState, settings: dict[str, Any],
                 config_path: Path | None = None):
        self.stages = list(stages)
        self.devices = devices
        self.settings = settings
        self.config_path = config_path
        check_wiring(self.stages)
        self.text = self._one(lambda s: PROMPT_TOKENS in s.produces, "a text stage (produces prompt_tokens)")
        sampler_stage = self._one(lambda s: IMAGE_TOKENS in s.produces, "a sampler stage (produces image_tokens)")
        self.sampler: SamplerEngine = sampler_stage.engine
        self.decoder = self._one(lambda s: IMAGE in s.produces and IMAGE_TOKENS in s.consumes,
                                 "an image decoder (image_tokens -> image)")
        self.image_stages = [s for s in self.stages if s.consumes == (IMAGE,) and s.produces == (IMAGE,)]
        rankers = [s for s in self.stages if SCORE in s.produces]
        self.ranker = rankers[0] if rankers else None
        # Used when a request leaves condition_scale unset: small models want less than Mini's 10.
        # Likewise the temperature: a small model's long tail draws specks that a cooler softmax avoids.
        self.default_condition_scale, self.default_temperature = sampling_defaults(settings)
        side = int(round(self.sampler.image_length ** 0.5))
        probe = self.decoder.decode(np.zeros((1, self.sampler.image_length), np.int32))[0]
        self.limits = Limits(
            max_prompt_chars=self.text.max_prompt_chars,
            max_prompt_tokens=self.text.max_prompt_tokens,
            max_images_per_request=int(settings.get("max_images_per_request", 16)),
            num_slots=self.sampler.num_slots,
            image_length=self.sampler.image_length,
            image_size=(probe.height, probe.width),
        )
        if side * side != self.sampler.image_length:
            raise StageError(f"image_length {self.sampler.image_length} is not a square grid")

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def load(cls, config_path: str | os.PathLike | None = None, devices: DeviceState | None = None,
             **overrides: Any) -> "Pipeline":
        """Build from a TOML file (None: the embedded default). `overrides` replace options of every
        stage that has them (e.g. num_slots=4, chunk_steps=8) and [pipeline] settings."""
        path = Path(config_path) if config_path else default_config_path()
        if not path.is_file():
            raise StageError(f"pipeline config {path} not found")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise StageError(f"pipeline config {path} is not valid TOML: {err}") from err
        settings = dict(raw.get("pipeline", {}))
        settings.update({k: v for k, v in overrides.items() if k in PIPELINE_SETTINGS})
        specs = raw.get("stages", [])
        if not specs:
            raise StageError(f"pipeline config {path} has no [[stages]]")
        stages = []
        for spec in specs:
            spec = dict(spec)
            try:
                name, type_name = spec.pop("name"), spec.pop("type")
            except KeyError as err:
                raise StageError(f"a stage in {path} lacks {err.args[0]!r}") from None
            cls_ = find_stage_class(type_name)
            # An override replaces an option the stage already has, or one it declares it takes.
            spec.update({k: v for k, v in overrides.items() if k in spec or k in cls_.tunable})
            stages.append(cls_(name, spec))
        check_wiring(stages)  # before any weights are loaded
        sampling_defaults(settings)
        devices = devices or DeviceState.create(model_parallel=_model_parallel(settings, stages, path.parent))
        context = StageContext(devices=devices, base_dir=path.parent, dtype=settings.get("dtype", "auto"))
        for stage in stages:
            log.info("initialising stage %s (%s)", stage.name, type(stage).__name__)
            stage.initialize(context)
        return cls(stages, devices, settings, config_path=path)

    def _one(self, predicate, what: str) -> Any:
        found = [s for s in self.stages if predicate(s)]
        if len(found) != 1:
            raise StageError(f"a pipeline needs exactly one {what}; found {[s.name for s in found]}")
        return found[0]

    # -- what the server calls ----------------------------------------------------------------

    @property
    def has_ranker(self) -> bool:
        return self.ranker is not None

    def encode_prompt(self, prompt: str, seeds: Sequence[int] = (0,)) -> list[PromptTokens]:
        """The prompt's tokens for each image seed (PromptError when the model cannot take it)."""
        return self.text.encode(prompt, seeds)

    def decode(self, tokens: np.ndarray) -> list[Image.Image]:
        """[N, image_length] image tokens -> N images (VQGAN, then every image -> image stage)."""
        images = self.decoder.decode(np.asarray(tokens))
        for stage in self.image_stages:
            items = stage.execute([{IMAGE: im} for im in images])
            images = [item[IMAGE] for item in items]
        return images

    def preview(self, tokens: np.ndarray, steps_done: int) -> Image.Image:
        """A partial grid as an image: positions not sampled yet repeat the last sampled token."""
        tokens = np.array(tokens, np.int32)
        if 0 < steps_done < len(tokens):
            tokens[steps_done:] = tokens[steps_done - 1]
        return self.decode(tokens[None])[0]

    def rank(self, prompt: str, images: list[Image.Image]) -> list[float]:
        if self.ranker is None:
            raise StageError("this pipeline has no ranker stage")
        return self.ranker.score(prompt, images)

    def run(self, prompt: str, params: Sequence[SamplingParams], rank: bool = False) -> list[dict[str, Any]]:
        """The whole pipeline in process, one image per params entry: items with image (and score)."""
        items = [{PROMPT: prompt, SAMPLING: p} for p in params]
        for stage in self.stages:
            if stage is self.ranker and not rank:
                continue
            items = stage.execute(items)
        return items

    def warmup(self, rank_batch: int = 8) -> None:
        """Compile everything serving will need before the first request: the sampler's shapes, each
        decode batch size up to num_slots and each rank batch size up to `rank_batch`, and a preview."""
        (prompt,) = self.encode_prompt("warm up")
        grid = np.stack([self.sampler.warmup(prompt)] * max(self.sampler.num_slots, rank_batch))
        for n in sorted({min(1 << i, len(grid)) for i in range(len(grid).bit_length() + 1)}):
            images = self.decode(grid[:n])
            if self.has_ranker:
                self.rank("warm up", images)
        self.preview(grid[0], 1)

    def info(self) -> dict[str, Any]:
        return {
            "config": str(self.config_path) if self.config_path else None,
            "stages": [s.describe() for s in self.stages],
            **self.devices.describe(),
            "limits": dataclasses.asdict(self.limits),
            "settings": self.settings,
            "default_condition_scale": self.default_condition_scale,
            "default_temperature": self.default_temperature,
        }
