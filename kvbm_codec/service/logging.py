"""Structured logs for the service: one JSON object per line (or plain text for a terminal).

Only fields passed explicitly through ``extra={"fields": {...}}`` are added to a record, so a log
call cannot leak a request's payload by accident. Callers log counts, sizes, codes and durations;
never block bytes, tokens or credentials.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict) and fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


def configure(fmt: str = "json", level: str = "INFO") -> None:
    """Route the ``kvbm_codec`` loggers to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("kvbm_codec")
    for h in list(root.handlers):
        if getattr(h, "_kvbm_codec", False):
            root.removeHandler(h)
    handler._kvbm_codec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("kvbm_codec") else f"kvbm_codec.{name}")


def fields(**kw: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(method="put", blocks=3))``."""
    return {"fields": kw}
