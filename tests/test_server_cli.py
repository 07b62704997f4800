"""The `palette` command end to end: serve in a subprocess, generate / rank / info against it, SIGTERM drain."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from palette.client import Done, GeneratedImage, PaletteClient, PaletteError, Progress
from palette.v1 import palette_pb2 as pb
from server_fixtures import CHUNK_STEPS, NUM_SLOTS

PALETTE = str(Path(sys.executable).with_name("palette"))


class ServeProcess:
    """`palette serve` on free ports; stderr is collected on a thread (JSON log lines + the ready line)."""

    def __init__(self, *extra: str):
        self.proc = subprocess.Popen(
            [PALETTE, "serve", "--port", "0", "--metrics-port", "0", "--num-slots", str(NUM_SLOTS),
             "--chunk-steps", str(CHUNK_STEPS), "--grace-s", "60", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.address = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"serving on (\S+?:\d+)", line)
            if match:
                self.address = match.group(1)
                self.ready.set()

    def wait_ready(self, timeout=180):
        if not self.ready.wait(timeout):
            self.proc.kill()
            pytest.fail("palette serve did not come up:\n" + "".join(self.lines[-30:]))
        return self.address


@pytest.fixture(scope="module")
def serve():
    server = ServeProcess()
    server.wait_ready()
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(30)


def palette(*args, timeout=120):
    return subprocess.run([PALETTE, *args], capture_output=True, text=True, timeout=timeout)


def test_info(serve):
    result = palette("info", "--server", serve.address)
    assert result.returncode == 0, result.stderr
    assert "sampler" in result.stdout and f"{NUM_SLOTS} sampler rows" in result.stdout
    as_json = json.loads(palette("info", "--server", serve.address, "--json").stdout)
    assert as_json["limits"]["num_slots"] == NUM_SLOTS
    before_command = palette("--server", serve.address, "--timeout", "10", "info")  # the Makefile's form
    assert before_command.returncode == 0 and "sampler" in before_command.stdout


def test_generate_writes_pngs_and_a_grid_then_rank_reads_them(serve, tmp_path):
    out = tmp_path / "images"
    result = palette("generate", "a red fox in the snow", "-n", "3", "--out", str(out), "--rank", "--seed", "5",
                     "--server", serve.address)
    assert result.returncode == 0, result.stderr
    pngs = sorted(out.glob("0*-seed*.png"))
    assert [p.name for p in pngs] == ["00-seed5.png", "01-seed6.png", "02-seed7.png"]
    for p in pngs:
        assert Image.open(p).format == "PNG"
    grid = Image.open(out / "grid.png")
    assert grid.width > Image.open(pngs[0]).width
    assert "best first" in result.stdout and "score" in result.stdout
    assert "wrote" in result.stderr  # each file is reported as it is written

    ranked = palette("rank", "a red fox in the snow", *map(str, pngs), "--json", "--server", serve.address)
    assert ranked.returncode == 0, ranked.stderr
    rows = json.loads(ranked.stdout)
    assert sorted(r["path"] for r in rows) == sorted(map(str, pngs))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_generate_reports_bad_input_plainly(serve, tmp_path):
    result = palette("generate", "a fox", "-n", "40", "--out", str(tmp_path), "--server", serve.address)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: num_images must be 1..16, got 40" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_without_a_server_says_so(tmp_path):
    result = palette("info", "--server", "127.0.0.1:1", "--timeout", "5")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr


def test_serve_without_the_server_extra_says_how_to_install():
    code = ("import sys; sys.modules['jax'] = None; from palette.client.cli import main; "
            "sys.exit(main(['serve', '--port', '0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'palette[server]'" in result.stderr and "Traceback" not in result.stderr


def test_a_cancel_storm_and_a_huge_image_header_leave_the_server_well(serve):
    """Calls cancelled as they start must not stay counted in flight (the drain below would wait for
    them), and an image whose header claims 96 million pixels is refused without Pillow printing its
    own warning line (the log stays JSON: see the last test)."""
    import grpc

    request = pb.GenerateRequest(prompt="a storm of cancels", num_images=2, seed=1).SerializeToString()
    with grpc.insecure_channel(serve.address) as channel:
        stub = channel.unary_stream("/palette.v1.Palette/Generate")
        for i in range(150):
            call = stub(request)
            time.sleep(0.001 * (i % 3))
            call.cancel()
    buf = io.BytesIO()
    Image.new("L", (12000, 8000)).save(buf, format="PNG")
    with PaletteClient(serve.address, timeout=60) as client, pytest.raises(PaletteError) as err:
        client.rank_scores("a red circle", [buf.getvalue()])
    assert err.value.code.name == "INVALID_ARGUMENT" and "96000000 pixels" in err.value.details


def test_sigterm_drains_in_flight_requests_then_exits(serve):
    """Runs last in this module: it stops the shared server."""
    with PaletteClient(serve.address, timeout=120) as client:
        calls = [client.generate(f"drain test {i}", 16, seed=100 + i) for i in range(6)]
        streams = [iter(c) for c in calls]
        for s in streams:
            assert isinstance(next(s), Progress)
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(PaletteError) as err:  # new work is refused during the drain
            client.generate_images("too late", 1, seed=1)
        assert err.value.code.name in ("UNAVAILABLE", "CANCELLED")
        for s in streams:
            rest = list(s)
            assert isinstance(rest[-1], Done)
            assert sum(isinstance(e, GeneratedImage) for e in rest) == 16
    work_done = time.monotonic()
    assert serve.proc.wait(60) == 0
    assert time.monotonic() - work_done < 15, "the drain outlasted the work (grace is 60 s)"
    not_json = [line for line in serve.lines if not line.startswith("{")]
    assert not not_json, f"log lines that are not JSON: {not_json[:5]}"
    logs = [json.loads(line) for line in serve.lines]
    messages = [entry["msg"] for entry in logs]
    assert any("draining" in m for m in messages) and "stopped" in messages
    assert any(entry.get("request_id") for entry in logs if entry["msg"].startswith("Generate"))


@pytest.mark.parametrize("config, message", [
    (None, "missing.toml not found"),
    ("[pipeline\nname = ", "is not valid TOML"),
    ('[[stages]]\nname = "text"\ntype = "text"\ncheckpoint = "no-such-folder"\n', "no-such-folder"),
])
def test_startup_failures_are_one_clear_line(tmp_path, config, message):
    path = tmp_path / "missing.toml"
    if config is not None:
        path.write_text(config)
    result = subprocess.run([PALETTE, "serve", "--config", str(path), "--port", "0", "--no-metrics"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and errors[0].startswith("palette: error:") and message in errors[0], result.stderr
