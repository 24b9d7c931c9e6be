"""`kvbm-codec serve` as a child process with an explicit lifetime, for the demos and the benches
that must measure the service as an operator runs it (its own process, configured by environment)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbm_codec.api.types import DEFAULT_MODEL

STARTUP_TIMEOUT_S = 600.0  # first start may load the GGUF model and calibrate (minutes on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`kvbm-codec serve` in a child process with explicit lifetime: start, wait healthy, SIGTERM.

    Configured through the environment only (``DYN_KVBM_CODEC_*``, which the service reads over its
    defaults), so every demo and bench starts the service the same way; ``models`` replaces the
    one-model default entry, ``settings`` adds further variables (e.g. the S3 endpoint's buckets) and
    ``cores`` pins the process to those CPUs.
    """

    def __init__(
        self,
        target_cr: float,
        log_path: Path,
        model: str = DEFAULT_MODEL,
        *,
        models: list[dict[str, Any]] | None = None,
        settings: dict[str, str] | None = None,
        cores: Sequence[int] | None = None,
    ) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ)
        env.update(
            {
                "DYN_KVBM_CODEC_HOST": "127.0.0.1",
                "DYN_KVBM_CODEC_GRPC_PORT": str(self.port),
                "DYN_KVBM_CODEC_METRICS_PORT": str(self.metrics_port),
                "DYN_KVBM_CODEC_LOGGING__FORMAT": "text",
                "DYN_KVBM_CODEC_MODELS": json.dumps(models or [{"name": model, "target_cr": target_cr}]),
                "PYTHONUNBUFFERED": "1",
                **(settings or {}),
            }
        )
        self.model = models[0]["name"] if models else model  # the first model it serves
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.cores = tuple(cores) if cores is not None else None
        pin = self.cores
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvbm_codec", "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # before exec, so every thread the service creates (torch, gRPC, UCX) inherits the mask
            preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin is not None else None,
        )
        self.target = f"127.0.0.1:{self.port}"

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def wait_healthy(self, client: Any, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        """Seconds until the service answers SERVING. The health RPC is only sent once the gRPC port
        accepts connections: a channel that meets a closed port backs off before reconnecting
        (1 s, then 1.6x per attempt), which added ~5 s to a 10 s start."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; log: {self.log_path}")
            if not self._port_open():
                time.sleep(0.1)
                continue
            try:
                if client.health() == "SERVING":
                    return time.monotonic() - t0
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"service not SERVING after {timeout_s:.0f} s; log: {self.log_path}")

    def labelled_metrics(self) -> dict[str, float]:
        """The service's own series, read from its real /metrics endpoint, keyed by name and labels."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        out: dict[str, float] = {}
        for line in text.decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        return out

    def metrics(self) -> dict[str, float]:
        """Unlabelled sums of the service's own counters."""
        out: dict[str, float] = {}
        for name, value in self.labelled_metrics().items():
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + value
        return out

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)
