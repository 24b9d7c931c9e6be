"""`kvbm-codec serve` start-up as the README demo sees it, side by side: the service resolving its
default calibration itself (it loads the model for the fingerprint) and health-polled from the first
moment (the demo before), against the service pointed at the same calibration by registry, fingerprint
and id (no model load) and polled once its port accepts connections (the demo now). Rounds alternate
the two, so load drift hits both alike. Prints one JSON line per start and a summary.

    python bench/serve_startup.py --rounds 3 --out bench/results/serve_startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvbm_codec.calibration.cache import load_or_calibrate
from kvbm_codec.calibration.registry import default_root
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.server.process import ServiceProcess


def _poll_from_start(svc: ServiceProcess, client: CodecClient, timeout_s: float = 300.0) -> float:
    """The demo's wait before this change: a health RPC every 0.5 s from the spawn on."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"service exited; log: {svc.log_path}")
        try:
            if client.health() == "SERVING":
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError("not SERVING")


def start_once(variant: str, name: str, fingerprint: str, calibration_id: str) -> dict[str, Any]:
    logdir = Path(tempfile.mkdtemp(prefix="serve-startup-"))
    models = None
    if variant != "before":
        models = [
            {
                "name": name,
                "target_cr": 20.0,
                "registry": str(default_root()),
                "fingerprint": fingerprint,
                "calibration": calibration_id,
            }
        ]
    t0 = time.monotonic()
    svc = ServiceProcess(20.0, logdir / "serve.log", model=name, models=models)
    client = CodecClient(svc.target, timeout_s=30.0)
    try:
        up = svc.wait_healthy(client) if variant == "after" else _poll_from_start(svc, client)
        spawn_to_serving = time.monotonic() - t0
        served = client.stats().models[0].calibration_id
    finally:
        client.close()
        code = svc.stop()
    return {
        "variant": variant,
        "serving_after_s": round(up, 2),
        "spawn_to_serving_s": round(spawn_to_serving, 2),
        "calibration_id": served,
        "exit_code": code,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)
    rows = []
    for r in range(a.rounds):
        for variant in ("before", "after") if r % 2 == 0 else ("after", "before"):
            row = start_once(variant, lm.info.name, lm.info.fingerprint, cal.calibration_id)
            row["round"] = r
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {
        v: statistics.median(x["serving_after_s"] for x in rows if x["variant"] == v)
        for v in ("before", "after")
    }
    same = len({x["calibration_id"] for x in rows}) == 1
    print(json.dumps({"median_serving_after_s": summary, "same_calibration_served": same}), flush=True)
    if a.out is not None:
        report = {"rows": rows, "median_serving_after_s": summary, "same_calibration_served": same}
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
