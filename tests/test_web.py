"""The committed web page (server/web) and TypeScript client (web/src/gen) are what `make web` builds now."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WEB = REPO / "web"
PAGE = REPO / "server" / "web"
GENERATED = Path("palette") / "v1" / "palette_pb.ts"


def test_committed_page_is_what_make_web_builds(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; .ci/run installs it, and `make web` rebuilds the page with it")
    if not (WEB / "node_modules" / ".package-lock.json").exists():
        pytest.fail("web/node_modules is missing: run `make web-deps` (npm ci in web/; `make test` does it)")
    result = subprocess.run([node, "build.mjs", "--out", str(tmp_path / "page"), "--gen", str(tmp_path / "gen")],
                            cwd=WEB, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"the build failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "gen" / GENERATED).read_text() == (WEB / "src" / "gen" / GENERATED).read_text(), \
        "web/src/gen is out of date with palette.proto; run: make web"
    built = sorted(p.name for p in (tmp_path / "page").iterdir())
    assert built == sorted(p.name for p in PAGE.iterdir()), "server/web holds other files than the build makes"
    stale = [name for name in built if not filecmp.cmp(tmp_path / "page" / name, PAGE / name, shallow=False)]
    assert not stale, f"{stale} in server/web are out of date with web/; run: make web"
