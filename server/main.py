"""`palette serve`: load the pipeline, serve until SIGTERM / SIGINT, then drain gracefully."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from . import logs
from .service import PaletteServer, ServerConfig

log = logging.getLogger("palette.server")


class StartupError(Exception):
    """The server cannot start; the message is the one line the user sees."""


def load_pipeline(config_path: str | None, **pipeline_overrides: Any):
    """The pipeline, or StartupError naming what is wrong with the config or a checkpoint."""
    from palette.stages.base import StageError
    from palette.stages.checkpoint import CheckpointError
    from palette.stages.pipeline import Pipeline

    overrides = {k: v for k, v in pipeline_overrides.items() if v is not None}
    log.info("loading pipeline", extra={"config": config_path or "embedded default", **overrides})
    try:
        return Pipeline.load(config_path, **overrides)
    except (StageError, CheckpointError, OSError, ValueError, KeyError) as err:
        raise StartupError(f"cannot load the pipeline: {err}") from None


def build_server(config_path: str | None, server_config: ServerConfig, **pipeline_overrides: Any) -> PaletteServer:
    """Settings checked before anything heavy loads, then the pipeline, then the server."""
    from .auth import TokenFileError
    from .service import ConfigError
    from .tls import TLSConfigError

    try:
        server_config.check()
        server_config.authenticator()
        server_config.certificates()
    except (ConfigError, TokenFileError, TLSConfigError) as err:
        raise StartupError(str(err)) from None
    return PaletteServer(load_pipeline(config_path, **pipeline_overrides), server_config)


def run(config_path: str | None, server_config: ServerConfig, log_format: str = "json",
        **pipeline_overrides: Any) -> int:
    logs.configure(log_format)
    server = build_server(config_path, server_config, **pipeline_overrides)
    wait_for_signal = handle_stop_signals()
    try:
        server.start()
    except OSError as err:
        raise StartupError(str(err)) from None
    metrics = f", metrics on http://{server_config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    scheme = "TLS" if server.certificates else "plaintext"
    web = ""
    if server.http_port:
        web = f", the web page on {'https' if server.certificates else 'http'}://{server_config.host}:{server.http_port}/"
    log.info(f"palette: serving on {server.address} ({scheme}){metrics}{web}; Ctrl-C or SIGTERM to stop")
    log.info("received %s: draining for up to %.0f s", wait_for_signal(), server_config.grace_s)
    server.stop()
    return 0


def handle_stop_signals() -> Callable[[], str]:
    """Catch SIGTERM and SIGINT from now on. Returns a function that waits for the first of them and
    gives its name; a second one exits at once, without waiting for the drain."""
    stop = threading.Event()
    signals: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signal.Signals(signum).name)
        if stop.is_set():
            log.warning("second %s: exiting now", signals[-1])
            raise SystemExit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def wait() -> str:
        while not stop.wait(1.0):
            pass
        return signals[0]

    return wait
