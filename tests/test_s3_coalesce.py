"""Concurrent S3 requests of one tenant's bucket served as one batch (``frontends/s3/coalesce.py``).

The batching rules on their own (an event loop and a plain batch function), then the endpoint over
127.0.0.1 with boto3 clients in threads and real model KV: concurrent PUTs and GETs, range GETs,
a damaged frame and a wrong-layout block among them, each refused alone. No timing thresholds:
the windows are long enough that concurrent requests share a batch, and what is asserted is who
got which answer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import _smollm2
import pytest
import torch
from _s3_client import path_style_client
from _smollm2 import MODEL, SPEC
from botocore.exceptions import ClientError

from kvbm_codec.api.vllm_layout import VllmCpuLayout
from kvbm_codec.core.service import BlockService
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
from kvbm_codec.frontends.s3.buckets import sequence_hash
from kvbm_codec.frontends.s3.coalesce import Coalescer
from kvbm_codec.frontends.s3.errors import S3Error
from kvbm_codec.store.base import BlockKey
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

# ---- the batching rules ------------------------------------------------------------------------


class Recorder:
    """A batch function that answers each item with its square (or fails the ones named), records
    every batch it ran, and can be held until released."""

    def __init__(self, fail: set[int] | None = None, raise_all: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail or set()
        self.raise_all = raise_all
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, lane: object, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        assert self.release.wait(30)
        if self.raise_all:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"item {i}") if i in self.fail else i * i for i in items]


def _run(coro_fn):
    pool = ThreadPoolExecutor(4)
    try:
        return asyncio.run(asyncio.wait_for(coro_fn(pool), 60))
    finally:
        pool.shutdown(wait=True)


def test_concurrent_items_share_one_batch_and_get_their_own_answers():
    rec = Recorder()

    async def main(pool):
        c = Coalescer(rec, pool, window_s=0.05, max_batch=32, max_running=1, max_pending=64)
        got = await asyncio.gather(*(c.submit("lane", i) for i in range(10)))
        return got, c.stats()

    got, stats = _run(main)
    assert got == [i * i for i in range(10)]
    assert rec.batches == [list(range(10))]
    assert (stats.batches, stats.items, stats.largest) == (1, 10, 10)


def test_batches_are_bounded_and_lanes_never_mix():
    rec = Recorder()

    async def main(pool):
        c = Coalescer(rec, pool, window_s=0.05, max_batch=4, max_running=2, max_pending=64)
        a = [c.submit("a", i) for i in range(10)]
        b = [c.submit("b", 100 + i) for i in range(3)]
        return await asyncio.gather(*a, *b)

    got = _run(main)
    assert got == [i * i for i in range(10)] + [(100 + i) ** 2 for i in range(3)]
    assert all(len(b) <= 4 for b in rec.batches)
    assert all(all(i < 100 for i in b) or all(i >= 100 for i in b) for b in rec.batches)
    assert sorted(i for b in rec.batches for i in b) == [*range(10), 100, 101, 102]


def test_a_failed_item_fails_only_its_own_request():
    rec = Recorder(fail={3})

    async def main(pool):
        c = Coalescer(rec, pool, window_s=0.05, max_batch=32, max_running=1, max_pending=64)
        return await asyncio.gather(*(c.submit("lane", i) for i in range(6)), return_exceptions=True)

    got = _run(main)
    assert isinstance(got[3], ValueError) and str(got[3]) == "item 3"
    assert [g for i, g in enumerate(got) if i != 3] == [0, 1, 4, 16, 25]


def test_a_failed_batch_fails_each_of_its_requests():
    rec = Recorder(raise_all=True)

    async def main(pool):
        c = Coalescer(rec, pool, window_s=0.05, max_batch=32, max_running=1, max_pending=64)
        return await asyncio.gather(*(c.submit("lane", i) for i in range(3)), return_exceptions=True)

    got = _run(main)
    assert all(isinstance(g, RuntimeError) for g in got)


def test_arrivals_during_a_batch_join_the_next_and_the_queue_is_bounded():
    rec = Recorder()
    rec.release.clear()

    async def main(pool):
        c = Coalescer(rec, pool, window_s=0.0, max_batch=4, max_running=1, max_pending=4)
        first = asyncio.ensure_future(c.submit("lane", 0))
        while not rec.started.is_set():  # the first batch is running (held)
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(c.submit("lane", i)) for i in range(1, 5)]
        await asyncio.sleep(0.05)  # every queued submit has reached the queue
        with pytest.raises(S3Error) as e:
            await c.submit("lane", 99)  # the fifth waiter: refused at once, not queued
        rec.release.set()
        return await first, await asyncio.gather(*queued), e.value

    first, queued, refusal = _run(main)
    assert (first, queued) == (0, [1, 4, 9, 16])
    assert refusal.status == 503 and refusal.code == "SlowDown"
    assert rec.batches == [[0], [1, 2, 3, 4]]  # what waited a batch went together, no window


def test_separated_items_never_share_a_batch():
    rec = Recorder()

    async def main(pool):
        same = lambda a, b: a == b  # noqa: E731
        c = Coalescer(rec, pool, window_s=0.05, max_batch=32, max_running=1, max_pending=64, separate=same)
        return await asyncio.gather(*(c.submit("lane", i) for i in (1, 2, 1, 3)))

    assert _run(main) == [1, 4, 1, 9]
    assert all(len(b) == len(set(b)) for b in rec.batches)
    assert len(rec.batches) == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Coalescer(Recorder(), ThreadPoolExecutor(1), window_s=-1, max_batch=1, max_running=1, max_pending=1)
    with pytest.raises(ValueError):
        S3Config(credentials=[], max_batch_blocks=64, max_queued_per_bucket=8)


# ---- the endpoint over 127.0.0.1 ----------------------------------------------------------------

BUCKET = "kvbm-smollm2-135m"
AK, SK = "AKCOALESCE", "coalesce-secret"
TENANT = "tenant-c"
N = 6
FIRST = 20  # blocks at positions 640.. (past the attention sinks)


@pytest.fixture(scope="module")
def blocks(smollm) -> list[torch.Tensor]:
    return _smollm2.blocks(smollm, N + 1, first=FIRST)


@pytest.fixture(scope="module")
def server(small_calibration):
    svc = BlockService([_smollm2.served(small_calibration)], TieredStore([MemoryTier(1 << 28)]))
    cfg = S3Config(
        credentials=[CredentialConfig(access_key=AK, secret_key=SK, tenant=TENANT)],
        buckets=[BucketBinding(max_position=4096)],
        workers=2,
        coalesce_window_s=0.1,  # long: the threads' requests land in one window on a loaded machine
        max_batch_blocks=16,
    )
    handle = start_s3_server(svc, cfg)
    yield handle
    handle.stop()


def _client(server):
    # read_timeout: a bounded wait; every request is answered (or fails) within it
    return path_style_client(server.url, AK, SK, read_timeout=300, max_pool_connections=16)


def _together(fns):
    """Run the calls from threads released at once; each call's result or exception, in order."""
    barrier = threading.Barrier(len(fns))

    def one(fn):
        barrier.wait(30)
        try:
            return fn()
        except Exception as e:  # the caller asserts which calls failed and how
            return e

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(one, fns))


def test_concurrent_puts_and_gets_each_get_their_own_object(server, blocks):
    s3 = _client(server)
    data = [SPEC.to_bytes(b) for b in blocks[:N]]
    wrong = VllmCpuLayout(SPEC).block_to_chunk(blocks[N]).numpy().tobytes()  # same length, wrong layout
    writes_before = server.endpoint.writes.stats()
    puts = _together(
        [lambda i=i: s3.put_object(Bucket=BUCKET, Key=str(1000 + i), Body=data[i]) for i in range(N)]
        + [lambda: s3.put_object(Bucket=BUCKET, Key="1999", Body=wrong)]
    )
    assert isinstance(puts[-1], ClientError) and puts[-1].response["Error"]["Code"] == "InvalidArgument"
    assert "does not fit" in puts[-1].response["Error"]["Message"]
    for i, r in enumerate(puts[:N]):
        assert not isinstance(r, Exception), r
        headers = r["ResponseMetadata"]["HTTPHeaders"]
        assert headers["x-kvbm-codec-first-position"] == str(32 * (FIRST + i))
        assert s3.head_object(Bucket=BUCKET, Key=str(1000 + i))["ETag"] == r["ETag"]
    with pytest.raises(ClientError):
        s3.head_object(Bucket=BUCKET, Key="1999")  # the refused block stored nothing
    writes = server.endpoint.writes.stats()
    assert writes.items - writes_before.items == N + 1
    assert writes.largest >= 2  # the concurrent PUTs were encoded together

    # each object alone (a batch of one), then all of them at once, with ranges: the same bytes
    alone = [s3.get_object(Bucket=BUCKET, Key=str(1000 + i))["Body"].read() for i in range(N)]
    for i, got in enumerate(alone):
        back = SPEC.from_bytes(got).float()
        assert float((back - blocks[i].float()).norm() / blocks[i].float().norm()) < 0.5
    reads_before = server.endpoint.reads.stats()
    ranges = [(0, 99), (4096, 8191), (len(data[0]) - 10, len(data[0]) - 1)]
    calls = [lambda i=i: s3.get_object(Bucket=BUCKET, Key=str(1000 + i))["Body"].read() for i in range(N)]
    calls += [
        lambda a=a, b=b: s3.get_object(Bucket=BUCKET, Key="1002", Range=f"bytes={a}-{b}")["Body"].read()
        for a, b in ranges
    ]
    got = _together(calls)
    assert got[:N] == alone
    assert got[N:] == [alone[2][a : b + 1] for a, b in ranges]
    reads = server.endpoint.reads.stats()
    assert reads.items - reads_before.items == N + len(ranges)
    assert reads.largest >= 2


def test_a_damaged_frame_among_concurrent_gets_fails_alone(server, blocks):
    s3 = _client(server)
    svc = server.endpoint.svc
    keys = [str(2000 + i) for i in range(4)]
    for i, k in enumerate(keys):
        s3.put_object(Bucket=BUCKET, Key=k, Body=SPEC.to_bytes(blocks[i]))
    good = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    store_key = BlockKey(TENANT, svc.model(MODEL).fingerprint, sequence_hash(keys[1]))
    frame = bytearray(svc.store.get(store_key))
    frame[len(frame) // 2] ^= 0xFF
    svc.store.put(store_key, bytes(frame))
    failures = svc.metrics.checksum_failures.labels(source="store")._value.get()

    got = _together([lambda k=k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys])
    assert isinstance(got[1], ClientError) and got[1].response["Error"]["Code"] == "NoSuchKey"
    assert [got[i] for i in (0, 2, 3)] == [good[keys[i]] for i in (0, 2, 3)]
    assert svc.metrics.checksum_failures.labels(source="store")._value.get() == failures + 1
    with pytest.raises(ClientError):  # dropped, never served as wrong KV
        s3.head_object(Bucket=BUCKET, Key=keys[1])
