"""Shared fixtures. Tests run on the CPU; the reference folder comes from PALETTE_REFERENCE_DIR."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_DIR = REPO_ROOT / "tests" / "reference"  # the public golden cases, kept in the repo


def reference_dir() -> Path:
    return Path(os.environ.get("PALETTE_REFERENCE_DIR", DEFAULT_REFERENCE_DIR)).expanduser().resolve()


def reference_cases() -> list[Path]:
    """Every case folder (one holding case.json) under the reference dir, sorted by name."""
    root = reference_dir()
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/case.json"))


def load_case(case_dir: Path) -> dict:
    with open(case_dir / "case.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def reference_root() -> Path:
    root = reference_dir()
    if not root.is_dir():
        pytest.fail(f"reference folder {root} not found; set PALETTE_REFERENCE_DIR")
    return root
