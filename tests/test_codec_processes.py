"""The codec in worker processes: the same frames and restores as in the service's own threads,
damaged frames refused, errors kept, a dead worker failing only its own calls and then replaced."""

from __future__ import annotations

import os
import signal
import time

import _smollm2
import pytest
from _smollm2 import MODEL, SPEC, assert_same_restore
from prometheus_client import generate_latest

from kvbm_codec.api.blocks import InvalidBlockError, block_positions
from kvbm_codec.api.errors import CodecUnavailableError
from kvbm_codec.api.types import PutItem
from kvbm_codec.codec.errors import FrameChecksumError, FrameTruncatedError
from kvbm_codec.core.codec_processes import CodecProcesses, WorkerModel, rebuild
from kvbm_codec.core.service import BlockService, Limits
from kvbm_codec.store.base import BlockKey
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

TENANT = "t"
N = 6


def _service(cal, processes: int) -> BlockService:
    store = TieredStore([MemoryTier(1 << 27)])
    return BlockService(
        [_smollm2.served(cal)], store, limits=Limits(codec_processes=processes, batch_threads=2)
    )


@pytest.fixture(scope="module")
def raw(smollm) -> list[bytes]:
    return _smollm2.block_bytes(smollm, N)


@pytest.fixture(scope="module")
def services(small_calibration):
    in_threads, in_workers = _service(small_calibration, 0), _service(small_calibration, 2)
    yield in_threads, in_workers
    in_threads.close()
    in_workers.close()


def _items(raw: list[bytes], base: int) -> list[PutItem]:
    return [PutItem(base + i, b, first_position=i * SPEC.page_size) for i, b in enumerate(raw)]


def test_workers_store_and_restore_what_threads_do(services, raw) -> None:
    in_threads, in_workers = services
    assert in_workers._procs is not None and in_threads._procs is None
    scrape = generate_latest(in_workers.metrics.registry).decode()
    assert "kvbm_codec_codec_processes 2.0" in scrape
    assert "kvbm_codec_codec_process_restarts_total 0.0" in scrape
    put_t = in_threads.put_blocks(TENANT, MODEL, _items(raw, 100))
    put_w = in_workers.put_blocks(TENANT, MODEL, _items(raw, 100))
    # a worker runs one torch thread: a float32 matmul may round its last bit otherwise, and a
    # coefficient at a quantization step then lands one step off (see _smollm2.SAME_RESTORE)
    for w, t in zip(put_w, put_t, strict=True):
        assert abs(w.stored_bytes - t.stored_bytes) <= t.stored_bytes // 200
    got_t = in_threads.get_blocks(TENANT, MODEL, [100 + i for i in range(N)])
    got_w = in_workers.get_blocks(TENANT, MODEL, [100 + i for i in range(N)])
    for t, w, original in zip(got_t, got_w, raw, strict=True):
        assert t.status == w.status == "hit" and w.positions == t.positions
        assert_same_restore(bytes(w.data), bytes(t.data), original)
    # a frame written by the workers is an ordinary frame: the threaded service decodes it too
    fp = in_workers.model(MODEL).fingerprint
    frame = in_workers.store.get(BlockKey(TENANT, fp, 100))
    in_threads.put_blocks(TENANT, MODEL, [PutItem(900, frame, is_frame=True)])
    back = in_threads.get_blocks(TENANT, MODEL, [900])[0]
    assert_same_restore(bytes(back.data), bytes(got_w[0].data), raw[0])


def test_a_damaged_frame_is_refused_by_the_worker(services, raw) -> None:
    _, svc = services
    svc.put_blocks(TENANT, MODEL, _items(raw[:2], 200))
    key = BlockKey(TENANT, svc.model(MODEL).fingerprint, 200)
    frame = bytearray(svc.store.get(key))
    frame[len(frame) // 2] ^= 0x10  # one bit in the payload: the worker's checksum must catch it
    svc.store.delete(key)
    svc.store.put(key, bytes(frame))
    before = svc.metrics.checksum_failures.labels(source="store")._value.get()
    got = svc.get_blocks(TENANT, MODEL, [200, 201])
    assert [g.status for g in got] == ["corrupt", "hit"] and got[0].data is None
    assert svc.metrics.checksum_failures.labels(source="store")._value.get() == before + 1
    assert not svc.store.contains(key)


def test_worker_errors_come_back_as_the_codec_classes() -> None:
    e = rebuild(("FrameChecksumError", "chunk 3 digest mismatch", "section k0"))
    assert (
        isinstance(e, FrameChecksumError)
        and e.where == "section k0"
        and e.message == "chunk 3 digest mismatch"
    )
    assert isinstance(rebuild(("FrameTruncatedError", "short", "")), FrameTruncatedError)
    assert isinstance(rebuild(("InvalidBlockError", "bad shape", "")), InvalidBlockError)
    assert type(rebuild(("OSError", "boom", ""))) is RuntimeError


def test_a_dead_worker_fails_its_call_and_is_replaced(small_calibration, raw) -> None:
    cal = small_calibration
    procs = CodecProcesses([WorkerModel(MODEL, "kvtc", cal, SPEC, 20.0)], 1, timeout_s=60)
    try:
        procs.start()
        positions = [block_positions(0, SPEC.page_size)]
        assert len(procs.encode(MODEL, raw[:1], positions, [True])) == 1
        (pid,) = list(procs._pool._processes)  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        with pytest.raises(CodecUnavailableError, match="died"):
            while time.monotonic() < deadline:  # the pool notices the death within moments
                procs.encode(MODEL, raw[:1], positions, [True])
        assert procs.restarts == 1
        assert len(procs.encode(MODEL, raw[:1], positions, [True])) == 1  # a fresh worker
    finally:
        procs.close()
    with pytest.raises(CodecUnavailableError, match="shut down"):
        procs.encode(MODEL, raw[:1], positions, [True])


def test_processes_must_be_positive(small_calibration) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CodecProcesses([], 0)


@pytest.mark.slow
def test_serve_runs_its_codec_in_workers_and_ends_them(small_calibration, raw, tmp_path) -> None:
    """`kvbm-codec serve` with DYN_KVBM_CODEC_CODEC_PROCESSES: its workers are its children, blocks
    round-trip through them over gRPC, and a stop leaves no worker behind."""
    import psutil

    from kvbm_codec.calibration.registry import Registry
    from kvbm_codec.frontends.grpc.client import CodecClient
    from kvbm_codec.server.process import ServiceProcess

    cal = small_calibration
    Registry.from_url(tmp_path / "registry").publish(cal)
    model = {
        "name": MODEL,
        "target_cr": 20.0,
        "registry": str(tmp_path / "registry"),
        "fingerprint": cal.model_fingerprint,
        "calibration": cal.calibration_id,
    }
    settings = {"DYN_KVBM_CODEC_NIXL__ENABLED": "false", "DYN_KVBM_CODEC_CODEC_PROCESSES": "2"}
    svc = ServiceProcess(20.0, tmp_path / "serve.log", models=[model], settings=settings)
    client = CodecClient(svc.target, model=MODEL, timeout_s=60.0)
    reference = _service(cal, 0)
    try:
        svc.wait_healthy(client, timeout_s=180)
        workers = psutil.Process(svc.proc.pid).children(recursive=True)
        assert len(workers) >= 2  # the two codec workers (and multiprocessing's resource tracker)
        client.put_blocks(_items(raw, 300))
        got = client.get_blocks([300 + i for i in range(N)])
        reference.put_blocks(TENANT, MODEL, _items(raw, 300))
        want = reference.get_blocks(TENANT, MODEL, [300 + i for i in range(N)])
        for g, w, original in zip(got, want, raw, strict=True):
            assert g.status == "hit" and g.positions == w.positions
            assert_same_restore(bytes(g.data), bytes(w.data), original)
    finally:
        client.close()
        reference.close()
        code = svc.stop()
    assert code == 0
    assert "codec_processes=2" in svc.log_path.read_text()  # the `starting` line says so
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"codec workers outlived the service: {alive}"
