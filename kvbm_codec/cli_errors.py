"""Operator mistakes as one or two lines saying what is wrong and how to fix it, never a traceback.

An operator who mistypes a config key at 3 a.m. needs "config: unknown key 'replicas' (did you mean
...)", not 60 lines of pydantic internals; and a ``serve`` that logs JSON must report its failure as a
JSON line too, or the log pipeline drops it. ``ReportingTyper`` is the ``kvbm-codec`` app: it runs the
command with click's standalone mode off and turns every exception into ``error: ...`` / ``hint: ...``
on stderr (or one JSON object when ``serve`` logs JSON), exit status 2 for usage and configuration
mistakes, 1 for anything else. ``--debug`` (or ``KVBM_CODEC_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import typer

try:  # typer vendors its own click; its exceptions are not click's
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - an older typer on the real click
    from click import exceptions as click  # type: ignore[no-redef]

DOCS = "docs/operations.md"


class OperatorError(Exception):
    """A mistake with a known fix: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message, self.hint, self.exit_code = message, hint, exit_code


class _State:
    debug = os.environ.get("KVBM_CODEC_DEBUG", "") not in ("", "0")
    json = False  # serve sets this when its logs are JSON


def set_debug(on: bool) -> None:
    _State.debug = _State.debug or on


def set_json(on: bool) -> None:
    _State.json = on


def _pydantic(e: Any) -> tuple[str, str]:
    lines = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            near = _near(e, err["loc"][:-1], key)
            lines.append(f"unknown key '{loc}'" + (f" (did you mean '{near}'?)" if near else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}")
    more = e.error_count() - len(lines)
    what = "; ".join(lines) + (f"; and {more} more" if more > 0 else "")
    return f"config: {what}", f"every key and its format: {DOCS}#configure"


def _near(e: Any, parent: Sequence[Any], key: str) -> str | None:
    """The closest valid key at that level of ServiceConfig, for a typo."""
    from pydantic import BaseModel

    from kvbm_codec.service.config import ServiceConfig

    model: Any = ServiceConfig
    for part in parent:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    names = list(getattr(model, "model_fields", {}))
    got = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return got[0] if got else None


def explain(exc: BaseException) -> tuple[str, str | None, int]:
    """(what is wrong, how to fix it, exit status) for an exception that reached the command line."""
    from pydantic import ValidationError

    if isinstance(exc, OperatorError):
        return exc.message, exc.hint, exc.exit_code
    if isinstance(exc, click.NoArgsIsHelpError):
        return exc.format_message(), None, 0
    if isinstance(exc, click.UsageError):
        cmd = exc.ctx.command_path if exc.ctx is not None else "kvbm-codec"
        return exc.format_message().replace("Value error, ", ""), f"see '{cmd} --help'", 2
    if isinstance(exc, click.ClickException):
        return exc.format_message(), None, exc.exit_code
    if isinstance(exc, ValidationError):
        what, hint = _pydantic(exc)
        return what, hint, 2
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        if "config file" in str(exc):
            return str(exc), "pass --config PATH to an existing TOML or YAML ServiceConfig file", 2
        return f"file not found: {name}", "check the path (relative paths start in the current directory)", 2
    if isinstance(exc, IsADirectoryError | PermissionError | NotADirectoryError):
        return f"cannot read {exc.filename}: {exc.strerror}", "check the path and its permissions", 2
    if isinstance(exc, ValueError) and str(exc).startswith("unknown model"):
        return (
            str(exc),
            "name a registered model, a local model folder or a .gguf file (--model, models[].source)",
            2,
        )
    if isinstance(exc, ValueError):
        return str(exc), f"check the configuration ({DOCS}#configure)", 2
    if isinstance(exc, OSError) and exc.errno == 98:  # EADDRINUSE
        return f"address in use: {exc}", "another process holds the port; pick another with --port", 2
    code = getattr(exc, "code", None)
    if isinstance(code, str) and hasattr(exc, "message"):  # CodecError / ServiceError: stable codes
        return f"{code}: {exc.message}", None, 2  # type: ignore[attr-defined]
    return (
        f"{type(exc).__name__}: {exc}",
        "a bug or an unexpected condition; rerun with --debug for the traceback",
        1,
    )


def report(exc: BaseException) -> int:
    what, hint, status = explain(exc)
    if isinstance(exc, click.NoArgsIsHelpError):  # `kvbm-codec` alone: the help, not an error
        print(what, file=sys.stderr)
        return status
    if _State.json:
        record = {"level": "error", "logger": "kvbm_codec.cli", "msg": what}
        if hint:
            record["hint"] = hint
        if _State.debug:
            record["exc"] = "".join(traceback.format_exception(exc))
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"  # as service/logging.py stamps
        print(json.dumps({"ts": ts, **record}, separators=(",", ":")), file=sys.stderr)
    else:
        if _State.debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"error: {what}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
    return status


def host_port(value: str | None) -> str | None:
    """``--target`` callback: HOST:PORT (``[v6]:PORT``) with a real port; gRPC's silent :443 is refused."""
    if value is None:
        return value
    host, sep, port = value.rpartition(":")
    if value.startswith("[") and not value.rsplit("]", 1)[-1].startswith(":"):
        sep = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50151); a port is required")
    return value


class ReportingTyper(typer.Typer):
    """A Typer app whose console entry point reports errors with ``report`` instead of a traceback.

    ``CliRunner`` and other programmatic callers use the click command directly and still see the
    exception itself; only ``app()`` (the console script, ``python -m kvbm_codec``) reports.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        argv = list(kwargs.pop("args", None) or (args[0] if args else sys.argv[1:]))
        cmd = typer.main.get_command(self)
        try:
            rc = cmd.main(args=argv, prog_name="kvbm-codec", standalone_mode=False, **kwargs)
        except typer.Exit as e:
            rc = e.exit_code
        except typer.Abort:
            print("aborted", file=sys.stderr)
            rc = 130
        except KeyboardInterrupt:
            rc = 130
        except Exception as e:
            rc = report(e)
        sys.exit(rc if isinstance(rc, int) else 0)
