"""Operator mistakes on the command line give one or two lines (or one JSON line from a JSON-logging
``serve``) that name what is wrong and how to fix it: no traceback unless ``--debug``.

Each case runs the real console entry point (``kvbm_codec.cli.app``, what ``kvbm-codec`` and
``python -m kvbm_codec`` call) in-process, with stderr captured.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from kvbm_codec.cli import app


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        app(args=list(argv))
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


@pytest.fixture(autouse=True)
def _restore_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve configures logging, which installs exception hooks; put them back after each case."""
    import logging

    from kvbm_codec import cli_errors

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(cli_errors._State, "debug", False)
    monkeypatch.setattr(cli_errors._State, "json", False)
    root = logging.getLogger("kvbm_codec")
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "propagate", root.propagate)


def _short(err: str) -> list[str]:
    lines = [x for x in err.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 2, err
    assert "Traceback" not in err, err
    return lines


def test_missing_config_file_is_one_json_line_from_serve(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "serve", "--config", "/no/such/config.yaml")
    (line,) = _short(err)
    rec = json.loads(line)
    assert rc == 2 and rec["level"] == "error"
    assert "/no/such/config.yaml" in rec["msg"] and "--config" in rec["hint"]


def test_typod_key_names_it_and_suggests_the_right_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("replicas: 3\nnixl:\n  stagingbytes: 1\n")
    rc, _, err = _run(capsys, "serve", "--config", str(cfg), "--log-format", "text")
    what, hint = _short(err)
    assert rc == 2
    assert "unknown key 'replicas'" in what and "'nixl.stagingbytes' (did you mean 'staging_bytes'?)" in what
    assert hint.startswith("hint: ") and "operations.md#configure" in hint


def test_bad_size_and_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("memory_capacity_bytes: 8 gigs\n")
    _, _, err = _run(capsys, "serve", "--config", str(cfg), "--log-format", "text")
    assert "memory_capacity_bytes" in _short(err)[0] and "8GiB" in err
    cfg.write_text(
        "models: [{name: no-such-model}]\nmetrics_port: null\nprobes: {port: null}\nnixl: {enabled: false}\n"
    )
    rc, _, err = _run(capsys, "serve", "--config", str(cfg), "--log-format", "text", "--port", "0")
    lines = [x for x in err.splitlines() if x.startswith(("error:", "hint:"))]
    assert rc == 2 and lines[0].startswith("error: unknown model 'no-such-model'") and "Traceback" not in err
    assert lines[1].startswith("hint: ")


def test_missing_frame_and_debug_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "inspect", "/no/such/frame.kvtc")
    assert rc == 2 and _short(err)[0] == "error: file not found: /no/such/frame.kvtc"
    rc, _, err = _run(capsys, "--debug", "inspect", "/no/such/frame.kvtc")
    assert (
        rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-2].startswith("error: file not found")
    )


@pytest.mark.parametrize("url", ["s3:/typo-bucket/prefix", "gs://bucket", "/no/such/registry", "s3://"])
def test_typod_registry_url_is_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "registry", "list", "--registry", url)
    assert rc == 2 and not out
    assert _short(err)[0].startswith("error: registry ")


@pytest.mark.parametrize("target", ["127.0.0.1", "[::1]", "localhost:http", "host:0"])
def test_target_without_a_port_is_refused(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "client", "stats", "--target", target)
    what = _short(err)[0]
    assert rc == 2 and "--target" in what and "port" in what


def test_log_format_must_be_json_or_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "serve", "--log-format", "xml")
    assert rc == 2 and "'xml'" in _short(err)[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm_codec import __version__

    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"kvbm-codec {__version__}"


def test_json_logs_carry_uncaught_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm_codec.service import logging as slog

    slog.configure("json", "INFO")

    def boom() -> None:
        raise RuntimeError("handler exploded")

    t = threading.Thread(target=boom, name="worker-1")
    t.start()
    t.join(10)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    rec = json.loads(line)
    assert rec["msg"] == "uncaught exception in thread" and rec["thread"] == "worker-1"
    assert "RuntimeError: handler exploded" in rec["exc"]


def test_calibration_heartbeat_logs_while_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from kvbm_codec.service import logging as slog

    slog.configure("json", "INFO")
    with slog.heartbeat(slog.get_logger("test"), "calibrating", every_s=0.05, model="m"):
        time.sleep(0.2)
    msgs = [json.loads(x)["msg"] for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert msgs[0] == "calibrating: started" and msgs[-1] == "calibrating: finished"
    assert "calibrating: still running" in msgs
