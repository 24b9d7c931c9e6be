"""`kvbm-codec bench throughput --quick`: one real run (model KV, codec, gRPC/NIXL/S3 servers on
127.0.0.1) whose JSON carries every figure the issue names. Values are checked for sanity (finite,
positive, every path and op present, ratios in the range real frames give), never against timings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from typer.testing import CliRunner

from kvbm_codec.bench.throughput import obj_unavailable
from kvbm_codec.cli import app

KEYS = (
    "roofline_gflops",
    "codec_encode_mbps_per_core",
    "codec_decode_mbps_per_core",
    "service",
    "block_stored_ratio",
    "context_stored_ratio",
)


def test_quick_throughput_json_has_every_figure(small_calibration, tmp_path: Path) -> None:
    from kvbm_codec.calibration.artifact import save_calibration

    cal_path = tmp_path / "small.kvtc"
    save_calibration(small_calibration, cal_path)
    out = tmp_path / "throughput.json"
    res = CliRunner().invoke(
        app,
        [
            *("bench", "throughput", "--quick", "--calibration", str(cal_path), "--json", str(out)),
            *("--scaling-clients", "2", "--scaling-rounds", "1", "--repeats", "2"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    for k in KEYS:
        assert k in data, k
    assert math.isfinite(data["roofline_gflops"]) and data["roofline_gflops"] > 0
    for op in ("codec_encode_mbps_per_core", "codec_decode_mbps_per_core"):
        assert set(data[op]) == {"context", "1", "8"}
        assert all(math.isfinite(v) and v > 0 for v in data[op].values())
    seen = {(r["path"], r["op"], r["clients"]) for r in data["service"]}
    paths = {r["path"] for r in data["service"]}
    assert {"grpc", "s3"} <= paths  # nixl too where the library loads
    # obj: NIXL's OBJ client (the one vLLM's OBJ tier drives) against the same S3 endpoint
    assert ("obj" in paths) == (obj_unavailable() is None)
    assert seen == {(p, op, n) for p in paths for op in ("put", "get") for n in (1, 2)}
    assert all(math.isfinite(r["mbps"]) and r["mbps"] > 0 for r in data["service"])
    # timed as the codec-only figures: warm, then the best of --repeats rounds (median beside it)
    assert all(r["rounds"] == 2 and 0 < r["mbps_median"] <= r["mbps"] for r in data["service"])
    assert data["fp32_matmul"] in ("ieee", "onednn-bf16", "bf16-rounded")
    # lossy frames of real KV compress; a block carries more overhead than the whole context
    assert 1.5 < data["block_stored_ratio"] <= data["context_stored_ratio"] * 1.05
    assert "roofline" in res.output and "of codec" in res.output
    # `kvbm-codec serve` as its own process, pinned to one core, then to every core (2+ cores only)
    sc = data["core_scaling"]
    if len(os.sched_getaffinity(0)) < 2:
        assert sc is None
        return
    cores = {r["cores"] for r in sc["rows"]}
    assert cores == {1, len(os.sched_getaffinity(0))}
    # every path, S3 included: its endpoint in the pinned `serve`, its boto3 clients in this process
    assert {(r["path"], r["op"], r["clients"]) for r in sc["rows"]} == {
        (p, op, 2) for p in paths for op in ("put", "get")
    }
    assert all(math.isfinite(r["mbps"]) and r["mbps"] > 0 and r["ratio_to_codec"] > 0 for r in sc["rows"])
    # CPU the pinned service (its codec workers included) and the clients used over each timed run;
    # read in clock ticks (10 ms), so a quick run's few-ms levels can read 0 or above the core count
    assert all(
        math.isfinite(r[k]) and r[k] >= 0 for r in sc["rows"] for k in ("server_cores", "client_cores")
    )
    assert len(sc["ratios"]) == len(sc["rows"]) // 2 and all(r["ratio"] > 0 for r in sc["ratios"])


def test_throughput_options_are_bounded() -> None:
    res = CliRunner().invoke(app, ["bench", "throughput", "--quick", "--batches", "1,99", "--paths", ""])
    assert res.exit_code != 0
    assert "batches" in res.output
