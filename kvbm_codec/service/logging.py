"""Structured logs for the service: one JSON object per line (or plain text for a terminal).

Only fields passed explicitly through ``extra={"fields": {...}}`` are added to a record, so a log
call cannot leak a request's payload by accident. Callers log counts, sizes, codes and durations;
never block bytes, tokens or credentials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
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
    _log_uncaught(root)


def _log_uncaught(root: logging.Logger) -> None:
    """Uncaught exceptions (main thread and any other) become log records: a JSON line in JSON mode,
    so a log pipeline that parses every line keeps the crash instead of dropping a raw traceback."""

    def main_hook(exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        root.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        root.error(
            "uncaught exception in thread",
            extra=fields(thread=args.thread.name if args.thread else None),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )

    sys.excepthook = main_hook
    threading.excepthook = thread_hook


@contextlib.contextmanager
def heartbeat(log: logging.Logger, what: str, every_s: float = 30.0, **kw: Any) -> Iterator[None]:
    """Log ``what`` at the start, every ``every_s`` while it runs, and at the end: a long silent step
    (calibration at first start takes minutes) otherwise looks like a hung pod."""
    t0 = time.monotonic()
    done = threading.Event()
    log.info(f"{what}: started", extra=fields(**kw))

    def beat() -> None:
        while not done.wait(every_s):
            log.info(f"{what}: still running", extra=fields(seconds=round(time.monotonic() - t0), **kw))

    t = threading.Thread(target=beat, name="kvbm-codec-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(1.0)
        log.info(f"{what}: finished", extra=fields(seconds=round(time.monotonic() - t0, 1), **kw))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("kvbm_codec") else f"kvbm_codec.{name}")


def fields(**kw: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(method="put", blocks=3))``."""
    return {"fields": kw}
