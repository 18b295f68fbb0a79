"""Log lines as text (default) or one JSON object per line, for the server and the access log.

The access log (`qwen_server.access`) writes one line per HTTP request; its fields come in the
record's `fields` attribute so the JSON form keeps them as keys. Image bytes never reach a log.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import msgspec

ACCESS = logging.getLogger("qwen_server.access")
_encoder = msgspec.json.Encoder()


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(name)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


def configure(level: str, fmt: str) -> None:
    """One stderr handler on the `qwen_server` logger tree, in the chosen format."""
    log = logging.getLogger("qwen_server")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _TextFormatter())
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(level.upper())


@dataclass(slots=True)
class RequestRecord:
    """One request as its access line and metrics see it: the HTTP layer creates it and fills in the
    status, the service the counts."""

    request_id: str
    images: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cut: str | None = None  # why the request was ended early: "timeout" or "drain_abort"
    status: int | None = None  # the response's, once it has started
    finished: bool = False  # the response's last body message was sent

    def fields(self, latency_s: float) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "status": self.status or 500,  # nothing sent: the app failed before its response
            "latency_ms": round(latency_s * 1000, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "images": self.images,
            "cut": self.cut,
        }
