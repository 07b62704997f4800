"""Checkers for the `vqgan_decode` and `vqgan_encode` reference cases.

Sizes come from the case's checkpoint config and the arrays, so any folder of
the same format (other VQGAN sizes) is checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palette.stages.models.vqgan import VQGAN
from reference_checks import assert_close


def _assert_outputs(case_dir: Path, case: dict, io: dict, got: dict) -> None:
    for name in case["outputs"]:
        assert name in got, f"{case_dir.name}: the checker does not produce output {name!r} (it has {sorted(got)})"
        assert_close(name, got[name], io[name], case)


def check_decode(case_dir: Path, case: dict, io: dict) -> None:
    vq = VQGAN.from_pretrained(case_dir / "checkpoint")
    images = np.asarray(vq.decode_code(io["codes"]))
    _assert_outputs(case_dir, case, io, {"images": images})


def check_encode(case_dir: Path, case: dict, io: dict) -> None:
    vq = VQGAN.from_pretrained(case_dir / "checkpoint")
    quantized, indices, latents = (np.asarray(a) for a in vq.encode(io["images"]))
    _assert_outputs(case_dir, case, io, {"quantized": quantized, "indices": indices, "latents": latents})


CHECKS = {"vqgan_decode": check_decode, "vqgan_encode": check_encode}
