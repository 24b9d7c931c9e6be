"""`kvbm-codec serve` as the README demo starts it (server/process.py): pointed at a calibration by
registry, fingerprint and id, it serves that calibration without loading the model, and
``wait_healthy`` returns once it answers SERVING (the health RPC waits for the open port, so the
channel never backs off)."""

from __future__ import annotations

import pytest

from kvbm_codec.calibration.registry import Registry
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.server.process import ServiceProcess

pytestmark = pytest.mark.slow


def test_demo_service_serves_its_calibration_without_loading_the_model(small_calibration, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cal = small_calibration
    Registry.from_url(tmp_path / "registry").publish(cal)  # not promoted: the id alone selects it
    model = {
        "name": cal.model_name,
        "target_cr": 20.0,
        "registry": str(tmp_path / "registry"),
        "fingerprint": cal.model_fingerprint,
        "calibration": cal.calibration_id,
    }
    svc = ServiceProcess(
        20.0,
        tmp_path / "serve.log",
        models=[model],
        settings={"KVBM_CODEC_CACHE_DIR": str(tmp_path / "cache"), "DYN_KVBM_CODEC_NIXL__ENABLED": "false"},
    )
    client = CodecClient(svc.target, timeout_s=30.0)
    try:
        up = svc.wait_healthy(client, timeout_s=180)
        assert up > 0 and client.health() == "SERVING"
        served = client.stats().models[0]
        assert (served.name, served.calibration_id) == (cal.model_name, cal.calibration_id)
        assert served.fingerprint == cal.model_fingerprint
    finally:
        client.close()
        code = svc.stop()
    assert code == 0
    log = svc.log_path.read_text()
    assert "Loading weights" not in log and "calibration ready" not in log  # no model load, no calibrating
    assert not (tmp_path / "cache").exists()  # nothing converted or calibrated


def test_wait_healthy_reports_a_service_that_exits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = ServiceProcess(
        20.0,
        tmp_path / "serve.log",
        models=[{"name": "smollm2-135m", "registry": str(tmp_path / "empty"), "fingerprint": "0" * 32}],
        settings={"DYN_KVBM_CODEC_NIXL__ENABLED": "false"},
    )
    client = CodecClient(svc.target, timeout_s=5.0)
    try:
        with pytest.raises(RuntimeError, match="service exited"):
            svc.wait_healthy(client, timeout_s=120)
    finally:
        client.close()
        svc.stop()
