"""DalleBart cases: teacher-forced forward (within tolerance) and greedy generation (exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palette.stages.models.dallebart import DalleBart
from palette.stages.sampler import SamplingParams, generate

from . import assert_close


def check_forward(case_dir: Path, case: dict, io: dict) -> None:
    model = DalleBart.from_pretrained(case_dir / "checkpoint")
    logits, enc = model(io["input_ids"], io["attention_mask"], io["decoder_input_ids"])
    got = {"logits": np.asarray(logits), "encoder_last_hidden_state": np.asarray(enc)}
    for name in case["outputs"]:
        assert_close(name, got[name], io[name], case)


def check_generate(case_dir: Path, case: dict, io: dict) -> None:
    model = DalleBart.from_pretrained(case_dir / "checkpoint")
    for run in case["runs"]:
        kwargs = run["generate_kwargs"]
        rows = io["input_ids"].shape[0]
        params = [
            SamplingParams(
                seed=0,
                top_k=kwargs.get("top_k") or 0,
                top_p=kwargs.get("top_p") or 1.0,
                temperature=kwargs.get("temperature") or 1.0,
                condition_scale=kwargs["condition_scale"],
            )
            for _ in range(rows)
        ]
        sequences = generate(
            model,
            io["input_ids"],
            io["attention_mask"],
            io["input_ids_uncond"],
            io["attention_mask_uncond"],
            params,
        )
        assert_close(run["output"], sequences, io[run["output"]], case)


CHECKS = {"dallebart_forward": check_forward, "dallebart_generate": check_generate}
