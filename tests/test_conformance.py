"""Conformance with the original implementations, case by case.

Runs every case folder in $PALETTE_REFERENCE_DIR (default tests/reference, the golden cases kept in the repo).
`make conformance REF=<dir>` runs just this module against another folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_case, reference_cases
from reference_checks import clip as clip_checks
from reference_checks import dallebart as dallebart_checks
from reference_checks import text as text_checks
from reference_checks import vqgan as vqgan_checks

CHECKS = {**dallebart_checks.CHECKS, **vqgan_checks.CHECKS, **clip_checks.CHECKS, **text_checks.CHECKS}

CASES = reference_cases()


def test_reference_folder_has_cases(reference_root):
    assert CASES, f"no case folders (with case.json) under {reference_root}"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_reference_case(case_dir):
    case = load_case(case_dir)
    kind = case["kind"]
    assert kind in CHECKS, f"{case_dir.name}: unknown case kind {kind!r} (known: {sorted(CHECKS)})"
    io = {}
    if (case_dir / "io.npz").exists():
        with np.load(case_dir / "io.npz") as data:
            io = {name: data[name] for name in data.files}
    for name in case.get("inputs", []) + case.get("outputs", []):
        assert name in io, f"{case_dir.name}: io.npz lacks {name!r}"
    CHECKS[kind](case_dir, case, io)
