"""The package as a user installs it: a wheel into a fresh virtual environment, served from an empty
folder (the embedded default model set is package data), with `palette generate` against it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
import venv
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def source_copy(dst: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones it does not ignore): a wheel built
    in the checkout itself would pick up stale files from an old build/ folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.mark.slow
def test_the_wheel_serves_the_embedded_models_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    source = source_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("palette-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    installed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[server]"],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-2000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    server = subprocess.Popen([str(bin_dir / "palette"), "serve", "--port", "0", "--http-port", "0", "--no-metrics",
                               "--num-slots", "4"],
                              cwd=empty, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    address: list[str] = []

    def read() -> None:
        for line in server.stderr:
            lines.append(line)
            if match := re.search(r"serving on (\S+?:\d+).*the web page on (\S+/)", line):
                address.extend(match.groups())
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300), "the installed server did not come up:\n" + "".join(lines[-20:])
        out = empty / "out"
        generated = subprocess.run([str(bin_dir / "palette"), "--server", address[0], "generate", "a red circle",
                                    "-n", "2", "--seed", "3", "--out", str(out), "-q"],
                                   cwd=empty, capture_output=True, text=True, timeout=300)
        assert generated.returncode == 0, generated.stderr
        images = sorted(out.glob("0*-seed*.png"))
        assert [p.name for p in images] == ["00-seed3.png", "01-seed4.png"]
        assert all(Image.open(p).size == (64, 64) for p in images)
        with urllib.request.urlopen(address[1], timeout=30) as page:  # http://127.0.0.1:<port>/, package data too
            assert b"<title>Palette" in page.read()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert not any("Traceback" in line for line in lines), "".join(lines)
