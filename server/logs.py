"""Structured logs: one JSON object per line, with the request id and any `extra=` fields."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")


def request_id_from(metadata) -> str:
    """The caller's x-request-id when it is printable ASCII of at most 64 characters, else a new one."""
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str = "json", level: str = "info") -> None:
    """Log to stderr as JSON lines ("json") or plain text ("text"), libraries' warnings included."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # warnings.warn (Pillow's, say) and transformers' own stderr handler would print plain lines.
    logging.captureWarnings(True)
    # transformers advises installing PyTorch on import: Palette uses only its tokenizers and processors.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # gRPC's C core writes plain-text lines of its own (failed TLS handshakes at INFO): errors only.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
