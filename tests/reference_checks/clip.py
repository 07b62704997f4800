"""CLIP case: FlaxCLIPModel(input_ids, attention_mask, pixel_values) from case_dir/checkpoint."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from reference_checks import assert_close


def check_clip(case_dir: pathlib.Path, case: dict, io: dict[str, np.ndarray]) -> None:
    from palette.stages.models.clip import CLIP

    model = CLIP.from_pretrained(case_dir / "checkpoint")
    # Full float32 matmuls: on GPUs the default precision may use TF32, which would not meet 1e-4.
    with jax.default_matmul_precision("float32"):
        out = model(io["input_ids"], io["attention_mask"], io["pixel_values"])
    for name in case["outputs"]:
        assert name in out, f"clip: the model does not produce output {name!r} (it gives {sorted(out)})"
        assert_close(name, np.asarray(out[name]), io[name], case)


CHECKS = {"clip": check_clip}
