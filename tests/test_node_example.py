"""The README's Node.js example, run for real: @grpc/grpc-js over TLS with a bearer token."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from certificates import CertificateAuthority
from server_fixtures import running_server

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


@pytest.fixture(scope="module")
def node_modules():
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, capture_output=True,
                       timeout=600)


def test_node_generates_over_tls_with_a_token(node_modules, tmp_path):
    ca = CertificateAuthority(tmp_path / "pki")
    issued = ca.server()
    tokens = tmp_path / "tokens"
    tokens.write_text("node-app:node-app-token-42424242\n")
    with running_server(tls_cert=str(issued.cert), tls_key=str(issued.key), auth_tokens=str(tokens),
                        warmup=False) as server:
        address = f"localhost:{server.port}"

        def run(token: str) -> subprocess.CompletedProcess:
            return subprocess.run(["node", "generate.mjs", address, str(ca.pem), "a red circle", str(tmp_path / "out")],
                                  cwd=EXAMPLE, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "PALETTE_TOKEN": token})

        result = run("node-app-token-42424242")
        assert result.returncode == 0, result.stderr
        written = sorted((tmp_path / "out").glob("*.png"))
        assert [p.name for p in written] == ["0-seed7.png", "1-seed8.png"]
        assert all(Image.open(p).size == (64, 64) for p in written)
        assert "best first" in result.stdout
        refused = run("a-token-nobody-issued")
        assert refused.returncode == 1 and "UNAUTHENTICATED: unknown token" in refused.stderr
