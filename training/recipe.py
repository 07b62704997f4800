"""The default set's recipe: VQGAN, then DalleBart, then CLIP, on one pool, within one time budget.

`train_default` (`palette train default`) runs the three phases; `retrain`
(`palette train vqgan|dallebart|clip`) runs one of them on an existing set. Both
go through `train_phase` with the same pool, codes and settings, so one phase
retrained with the same seed and steps gives the same weights as that phase of
`train default`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from palette.stages.models.vqgan import VQGAN

from . import model_set, patch_codes
from .clip_trainer import train_clip
from .dallebart_trainer import train_dallebart
from .loop import DONE_FILE, LoopConfig, is_done
from .negatives import clip_images
from .pool import Pool, make_pool, tokenizer_corpus
from .vqgan_trainer import train_vqgan

log = logging.getLogger(__name__)

PHASES = ("vqgan", "dallebart", "clip")
#: Shares of the time budget, in order: VQGAN, DalleBart, CLIP (the rest is data and saving).
#: DalleBart gets the most: it has 256 codes per caption to learn.
BUDGET_SHARES = (0.36, 0.48, 0.12)
#: The optimiser settings of each phase.
PHASE_LOOPS = {"vqgan": {"batch_size": 16, "lr": 2e-3, "warmup": 50},
               "dallebart": {"batch_size": 16, "lr": 2e-3, "warmup": 100},
               "clip": {"batch_size": 128, "lr": 1e-3, "warmup": 50}}
POOL_SIZE = 8000
MODEL_SET_ENTRIES = ("dallebart", "vqgan", "clip", "pipeline.toml")


@dataclasses.dataclass
class PhaseInputs:
    """What every phase trains on: the pool and its patch codes."""

    pool: Pool
    vocabulary: patch_codes.PatchVocabulary
    codes: np.ndarray  # int32 [N, GRID * GRID]


def phase_inputs(seed: int, pool_size: int) -> PhaseInputs:
    pool = make_pool(seed, pool_size)
    vocabulary = patch_codes.PatchVocabulary.for_images(model_set.IMAGE_SIZE, model_set.GRID)
    return PhaseInputs(pool, vocabulary, patch_codes.patch_codes(pool.images, pool.scenes, vocabulary))


def phase_loop(name: str, steps: int, minutes: float | None, seed: int, progress: bool,
               batch_size: int | None = None) -> LoopConfig:
    settings = dict(PHASE_LOOPS[name])
    if batch_size:
        settings["batch_size"] = batch_size
    return LoopConfig(steps=steps, minutes=minutes, seed=seed, progress=progress, **settings)


def train_phase(name: str, out_dir: Path, run_dir: Path, inputs: PhaseInputs, loop: LoopConfig) -> None:
    """Train one model of the set in `out_dir` (which holds the tokenizers; CLIP also needs the VQGAN)."""
    pool, vocabulary, codes = inputs.pool, inputs.vocabulary, inputs.codes
    if name == "vqgan":
        train_vqgan(out_dir, run_dir, pool, codes, vocabulary, loop)
    elif name == "dallebart":
        config = model_set.dallebart_config(model_set.vocab_size(out_dir / "dallebart"), vocabulary.size)
        train_dallebart(out_dir, run_dir, pool, codes, vocabulary, loop, config)
    elif name == "clip":
        if not (out_dir / "vqgan" / "config.json").is_file():
            raise FileNotFoundError(f"{out_dir / 'vqgan'} holds no VQGAN: CLIP trains on its paintings, "
                                    f"so train the VQGAN first (palette train vqgan --out {out_dir})")
        paintings, negatives = clip_images(VQGAN.from_pretrained(out_dir / "vqgan"), pool, codes, loop.seed,
                                           vocabulary)
        config = model_set.clip_config(model_set.vocab_size(out_dir / "clip"))
        train_clip(out_dir, run_dir, pool, paintings, negatives, loop, config)
    else:
        raise ValueError(f"no phase {name!r}; the phases are {', '.join(PHASES)}")


def write_text_files(out_dir: Path, seed: int, replace: bool) -> None:
    """The tokenizers (unless they exist and not `replace`) and CLIP's preprocessor_config.json."""
    if replace or not all((out_dir / name / "vocab.json").is_file() for name in ("dallebart", "clip")):
        model_set.write_tokenizers(out_dir, tokenizer_corpus(seed))
    model_set.write_clip_preprocessor(out_dir)


def train_default(
    out_dir: str | Path,
    time_budget_minutes: float = 56.0,
    seed: int = 0,
    run_dir: str | Path | None = None,
    pool_size: int = POOL_SIZE,
    max_steps: tuple[int, int, int] = (100_000, 100_000, 100_000),
    progress: bool = True,
) -> dict:
    """Train the whole default set into `out_dir` within about `time_budget_minutes`.

    Each phase stops at the end of its share of the budget (`BUDGET_SHARES`, cumulative from the
    start) or at its step cap. Resumable: a finished phase (its run folder holds done.json) is
    skipped, an unfinished one continues from its checkpoint. The set is assembled in
    `<run_dir>/out` and copied to `out_dir` only when complete, so `out_dir` never holds a
    half-trained mix. Returns a summary (also written to `<run_dir>/summary.json`).
    """
    t0 = time.monotonic()
    final_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"train-{final_dir.name}"
    out_dir = run_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    ends = np.cumsum(BUDGET_SHARES) * 60.0 * float(time_budget_minutes) + t0
    summary: dict[str, Any] = {"seed": seed, "budget_minutes": time_budget_minutes, "pool_size": pool_size,
                               "max_steps": list(max_steps)}
    write_text_files(out_dir, seed, replace=True)
    inputs = phase_inputs(seed, pool_size)
    vocabulary = inputs.vocabulary
    summary["codes"] = {"masks": vocabulary.num_masks, "codebook": vocabulary.size,
                        "used": int(len(np.unique(inputs.codes)))}
    log.info("pool of %d samples ready after %.1f s", len(inputs.pool), time.monotonic() - t0)
    for i, name in enumerate(PHASES):
        t = time.monotonic()
        run = run_dir / name
        if not is_done(run):
            minutes = max(0.1, (ends[i] - time.monotonic()) / 60.0)
            train_phase(name, out_dir, run, inputs, phase_loop(name, max_steps[i], minutes, seed, progress))
        summary[name] = {**json.loads((run / DONE_FILE).read_text()), "minutes": round((time.monotonic() - t) / 60, 2)}
    summary["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    steps = ", ".join(f"{label} {summary[name]['step']}"
                      for label, name in (("VQGAN", "vqgan"), ("DalleBart", "dallebart"), ("CLIP", "clip")))
    model_set.write_pipeline_config(out_dir, f"trained by `palette train default` (seed {seed}; steps: {steps})")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    publish_model_set(out_dir, final_dir)
    summary["out"] = str(final_dir)
    return summary


def retrain(name: str, out_dir: str | Path, steps: int, minutes: float | None = None, seed: int = 0,
            run_dir: str | Path | None = None, pool_size: int = POOL_SIZE, batch_size: int | None = None,
            progress: bool = True) -> None:
    """Train one model of the set in `out_dir` as `train_default` trains it, the others left as they are."""
    out_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"train-{out_dir.name}" / name
    write_text_files(out_dir, seed, replace=False)
    train_phase(name, out_dir, run_dir, phase_inputs(seed, pool_size),
                phase_loop(name, steps, minutes, seed, progress, batch_size))
    if not (out_dir / "pipeline.toml").is_file():
        model_set.write_pipeline_config(out_dir, f"trained by `palette train` (seed {seed})")


def publish_model_set(src: str | Path, dst: str | Path) -> Path:
    """Replace the model-set entries of `dst` by those of `src` (other files in `dst` are kept)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SET_ENTRIES:
        new, target = dst / f".{name}.new", dst / name
        if new.is_dir():
            shutil.rmtree(new)
        if (src / name).is_dir():
            shutil.copytree(src / name, new)
            if target.is_dir():
                shutil.rmtree(target)
        else:
            shutil.copy2(src / name, new)
        os.replace(new, target)
    return dst
