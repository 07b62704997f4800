"""`palette serve`: load the pipeline, serve until SIGTERM / SIGINT, then drain gracefully."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

from . import logs
from .service import PaletteServer, ServerConfig

log = logging.getLogger("palette.server")


def run(config_path: str | None, server_config: ServerConfig, log_format: str = "json",
        **pipeline_overrides: Any) -> int:
    logs.configure(log_format)
    from palette.stages.pipeline import Pipeline

    overrides = {k: v for k, v in pipeline_overrides.items() if v is not None}
    log.info("loading pipeline", extra={"config": config_path or "embedded default", **overrides})
    pipeline = Pipeline.load(config_path, **overrides)
    server = PaletteServer(pipeline, server_config)
    stop = threading.Event()
    signals: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signal.Signals(signum).name)
        if stop.is_set():  # a second signal: stop waiting for the drain
            log.warning("second %s: exiting now", signals[-1])
            raise SystemExit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    metrics = f", metrics on http://{server_config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"palette: serving on {server.address}{metrics} (Ctrl-C or SIGTERM to stop)", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    log.info("received %s: draining for up to %.0f s", signals[0], server_config.grace_s)
    server.stop()
    return 0
