"""Hostile or unlucky disk states against the tier chain the server builds (issue 18): a restart
after reads must lose nothing that was on disk, and the startup scan must not hang on a FIFO or
follow a symlink planted in the tier's directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from kvbm_codec.core.metrics import ServiceMetrics
from kvbm_codec.server.app import build_store
from kvbm_codec.service.config import NixlConfig, ServiceConfig
from kvbm_codec.store.base import BlockKey
from kvbm_codec.store.disk import DiskTier


def _key(i: int) -> BlockKey:
    return BlockKey("tenant-a", "f" * 16, i)


def _blob(i: int) -> bytes:
    return bytes([i % 251]) * (1000 + i)


def test_item08_restart_after_reads_loses_nothing_on_disk(tmp_path: Path) -> None:
    d = tmp_path / "disk"
    first = DiskTier(d, 1 << 20, fsync=False)  # blocks that survived one crash: on disk only
    for i in range(20):
        first.put(_key(i), _blob(i))
    first.close()
    cfg = ServiceConfig.load(grpc_port=0, metrics_port=0, disk_path=d, nixl=NixlConfig(enabled=False))
    store = build_store(cfg, ServiceMetrics())  # the default configuration: memory over disk
    for i in range(20):  # read (and so promote) every one of them
        assert store.get(_key(i)) == _blob(i)
        assert store.contains(_key(i))
    store.close()  # memory is gone, as in a crash
    again = DiskTier(d, 1 << 20, fsync=False)
    try:
        assert sum(again.contains(_key(i)) for i in range(20)) == 20
        assert all(again.get(_key(i)) == _blob(i) for i in range(20))
    finally:
        again.close()


def test_item09_startup_scan_ignores_fifos_and_symlinks(tmp_path: Path) -> None:
    d = tmp_path / "disk"
    t = DiskTier(d, 1 << 20, fsync=False)
    t.put(_key(1), _blob(1))
    real = t.path_of(_key(1))
    t.close()
    shard = real.parent
    fifo = shard / ("0" * 64 + ".blk")
    os.mkfifo(fifo)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(real.read_bytes())  # a valid block file, but not the tier's
    link = shard / ("1" * 64 + ".blk")
    link.symlink_to(outside)
    out: dict[str, object] = {}

    def reopen() -> None:
        try:
            out["tier"] = DiskTier(d, 1 << 20, fsync=False)
        except Exception as e:  # reported below
            out["error"] = e

    th = threading.Thread(target=reopen, daemon=True)
    th.start()
    th.join(20)
    if th.is_alive():  # unblock the hung open so the thread can end, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        th.join(5)
        raise AssertionError("startup scan hung on a FIFO named *.blk")
    assert "error" not in out, out
    tier = out["tier"]
    try:
        assert tier.contains(_key(1)) and tier.get(_key(1)) == _blob(1)  # type: ignore[attr-defined]
        assert tier.stats().blocks == 1  # type: ignore[attr-defined]
        assert outside.exists() and link.is_symlink() and fifo.exists()  # nothing outside touched
    finally:
        tier.close()  # type: ignore[attr-defined]
