"""The committed generated code matches palette.proto; the client stays free of jax and numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
GENERATED = ("palette_pb2.py", "palette_pb2.pyi", "palette_pb2_grpc.py", "palette_connect.py")
REGENERATE = "make proto"


def test_generated_code_is_current(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the dev extra")
    plugin = Path(sys.executable).parent / "protoc-gen-connectrpc"
    assert plugin.exists(), "protoc-gen-connectrpc (the dev extra) is not installed next to this Python"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", f"--plugin=protoc-gen-connectrpc={plugin}",
                      f"--connectrpc_out={tmp_path}", "--connectrpc_opt=protobuf=google",
                      str(PROTOS / "palette" / "v1" / "palette.proto")])
    assert rc == 0, "protoc failed on palette.proto"
    stale = [name for name in GENERATED
             if (tmp_path / "palette" / "v1" / name).read_text() != (PROTOS / "palette" / "v1" / name).read_text()]
    assert not stale, (f"{stale} are out of date with palette.proto (or other grpcio-tools / protoc-gen-connectrpc "
                       f"versions made them); run: {REGENERATE}")


def test_client_imports_without_jax_or_numpy():
    code = ("import sys, palette.client, palette.client.cli, palette.client.sheet; "
            "bad = sorted(m for m in ('jax', 'numpy', 'flax', 'palette.server', 'palette.stages') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the client pulled in server-side modules: {result.stdout} {result.stderr}"


def test_every_element_is_documented(tmp_path):
    """The proto is the API documentation: every service, rpc, message, field, enum and value has a comment."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the dev extra")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "palette.pb"
    assert protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}", "--include_source_info",
                        str(PROTOS / "palette" / "v1" / "palette.proto")]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (f,) = fds.file
    commented = {tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()}
    # Paths per descriptor.proto: 4 = message_type, 2 = field; 5 = enum_type, 2 = value; 6 = service, 2 = method.
    wanted = {}
    for m, message in enumerate(f.message_type):
        wanted[(4, m)] = message.name
        for i, field in enumerate(message.field):
            wanted[(4, m, 2, i)] = f"{message.name}.{field.name}"
    for e, enum in enumerate(f.enum_type):
        wanted[(5, e)] = enum.name
        for i, value in enumerate(enum.value):
            wanted[(5, e, 2, i)] = value.name
    for s_, service in enumerate(f.service):
        wanted[(6, s_)] = service.name
        for i, method in enumerate(service.method):
            wanted[(6, s_, 2, i)] = f"{service.name}.{method.name}"
    missing = sorted(name for path, name in wanted.items() if path not in commented)
    assert not missing, f"undocumented in palette.proto: {missing}"
