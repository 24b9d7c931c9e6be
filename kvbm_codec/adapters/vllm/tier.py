"""kvbm-codec as an out-of-tree secondary tier of vLLM's tiered KV offloading.

vLLM loads it by module path (``"type": "KvbmCodecTier", "module_path":
"kvbm_codec.adapters.vllm.tier"`` in ``secondary_tiers``, docs/vllm.md). Stores cascade from vLLM's
CPU primary tier to the service, loads promote back into it:

- Every method vLLM calls runs on the scheduler thread and returns at once. ``submit_store`` and
  ``submit_load`` only queue the job; ``on_schedule_end`` (called once per scheduler step, after
  vLLM's own submissions) sends that step's stores as one ``PutBlocks`` request and its loads as one
  ``GetBlocks`` request, on a worker thread (split into ``parallel_requests`` concurrent calls so the
  service codes the blocks on several workers). Existence lookups run on vLLM's async lookup thread,
  one ``Contains`` per request per step.
- Each chunk is converted exactly from vLLM's CPU page layout to the service's KVBM block
  (``kvbm_codec/api/vllm_layout.py``) and sent with its first token position (vLLM records each key's
  end token), so KVTC can undo RoPE. A key without a recorded position is stored exact (no position needed).
- Backpressure: at most ``max_pending_stores`` store jobs in flight; beyond that a store fails at
  once (vLLM keeps the chunk in its CPU tier and counts the failed cascade) instead of queueing
  without bound. A service refusal (overload, capacity) fails the job the same way. vLLM's own
  latency-based detector, when configured, sees each job's transfer time.
- Object names: vLLM's own ``FileMapper`` name of the key (model, config hash, rank, group, block
  hash), hashed to the service's 64-bit sequence hash, so two models or configs never alias.
- Several replicas (``target`` a list, e.g. one 1-CPU ``serve`` per core, docs/operations.md "Scale"):
  each block goes to its consistent-hash owner (``kvbm_codec.cluster.sharding.ShardedClient``) and a
  request's shares are in flight at once, over NIXL (the staging buffer registered with every
  replica's client) or gRPC bytes. A replica that goes away takes its blocks with it: loads of them
  miss (vLLM recomputes), stores go to the survivors.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingHistogramMetadata,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from kvbm_codec.api.types import GetResult, PutItem, PutResult
from kvbm_codec.api.vllm_layout import VllmCpuLayout
from kvbm_codec.cluster.sharding import ShardedClient, StaticMembership
from kvbm_codec.frontends.grpc.client import CodecClient

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

log = logging.getLogger(__name__)

M = "vllm:kv_offload_kvbm_codec_"
BLOCKS_STORED = M + "blocks_stored"
BLOCKS_LOADED = M + "blocks_loaded"
BLOCKS_MISSED = M + "blocks_missed"
RAW_BYTES = M + "raw_bytes"
STORED_BYTES = M + "stored_bytes"
STORES_DROPPED = M + "stores_dropped"
JOB_FAILURES = M + "job_failures"
REQUEST_SECONDS = M + "request_seconds"
NIXL_BLOCKS = M + "nixl_blocks"
TRANSPORT_FALLBACKS = M + "transport_fallbacks"


_LIVE: weakref.WeakSet[KvbmCodecTier] = weakref.WeakSet()


def live_tiers() -> list[KvbmCodecTier]:
    """The tiers alive in this process: an in-process engine's (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
    counters for the demo and tests, which cannot reach vLLM's scheduler objects otherwise."""
    return list(_LIVE)


def sequence_hash(name: str) -> int:
    """The service's u64 key for a vLLM object name (BLAKE2b: stable across processes)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


@dataclass
class TierCounters:
    """What the tier did, for tests and the demo (vLLM's metrics get the same numbers)."""

    blocks_stored: int = 0
    blocks_loaded: int = 0
    blocks_missed: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    stores_dropped: int = 0
    job_failures: int = 0
    put_requests: int = 0
    get_requests: int = 0
    lookups: int = 0
    exact_for_lack_of_position: int = 0
    nixl_blocks: int = 0
    transport_fallbacks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class _Lookups(AsyncLookupManager):
    def __init__(self, tier: KvbmCodecTier) -> None:
        super().__init__(tier_type=tier.tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        self._tier.counters.add(lookups=len(keys))
        return self._tier.client.contains([self._tier.hash_of(k) for k in keys])


class KvbmCodecTier(SecondaryTierManager):
    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        target: str | list[str] = "127.0.0.1:50051",
        model: str = "smollm2-135m",
        tenant: str | None = None,
        token: str | None = None,
        key_order: str = "dt",
        max_pending_stores: int = 8,
        parallel_requests: int = 4,
        timeout_s: float = 120.0,
        transport: str = "auto",
        nixl_staging_blocks: int = 64,
        namespace: str = "",
        backpressure_detector: BackpressureDetector | None = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        if max_pending_stores < 1 or parallel_requests < 1:
            raise ValueError("max_pending_stores and parallel_requests must be >= 1")
        self.targets = _targets(target)
        self.client: CodecClient | ShardedClient
        if len(self.targets) == 1:
            self.client = CodecClient(
                self.targets[0], model=model, tenant=tenant, token=token, timeout_s=timeout_s
            )
            spec = self.client.spec()
        else:
            self.client = ShardedClient(
                StaticMembership({t: t for t in self.targets}),
                lambda _key, t: CodecClient(t, model=model, tenant=tenant, token=token, timeout_s=timeout_s),
            )
            try:
                spec = self.client.agreed(lambda t: t.spec(), f"the block spec of {model}")
            except Exception:
                self.client.close()
                raise
        if key_order not in ("dt", "td"):
            raise ValueError(f"key_order must be 'dt' or 'td', got {key_order!r}")
        self.layout = VllmCpuLayout(spec, key_order)  # type: ignore[arg-type]
        if self.block_size_bytes != self.layout.chunk_bytes:
            self.client.close()
            raise ValueError(
                f"vLLM offload chunks are {self.block_size_bytes} B but a {spec.page_size}-token "
                f"{spec.dtype} chunk of {model} served at {','.join(self.targets)} is "
                f"{self.layout.chunk_bytes} B: "
                "the engine's dtype, block_size or model does not match the service's"
            )
        n = len(primary_kv_view)
        self._primary = torch.frombuffer(primary_kv_view, dtype=torch.uint8).view(n, self.block_size_bytes)
        self._names = FileMapper.from_offloading_spec("", offloading_spec, parallel_agnostic=True)
        # prefixes every object name: engines that must not share a prefix (runs compared against each
        # other, or deployments sharing a service without auth tenants) pick different namespaces
        self.namespace = namespace
        self.max_pending_stores = max_pending_stores
        self.counters = TierCounters()
        self._stats = OffloadingConnectorStats()
        self._stats_lock = threading.Lock()
        self._label = (tier_type,)
        # One worker: a step's PutBlocks and GetBlocks go out in submission order, never two at once
        # from this engine (the service batches within a request).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-codec-tier")
        # A step's request is split into this many concurrent calls, so the service encodes/decodes
        # its blocks on that many of its workers instead of one after the other.
        self._calls = ThreadPoolExecutor(parallel_requests, thread_name_prefix="kvbm-codec-call")
        self.parallel_requests = parallel_requests
        self._step_stores: list[TransferJob] = []
        self._step_loads: list[TransferJob] = []
        self._inflight: set[Future[None]] = set()
        self._store_jobs: set[int] = set()  # store jobs submitted, result not yet taken by vLLM
        self._done: queue.SimpleQueue[JobResult] = queue.SimpleQueue()
        self._lookups = _Lookups(self)
        if transport not in ("auto", "nixl", "grpc"):
            raise ValueError(f"transport must be 'auto', 'nixl' or 'grpc', got {transport!r}")
        self._staging: _NixlStaging | None = None
        if transport != "grpc":
            try:
                self._staging = _NixlStaging(self.client, spec, nixl_staging_blocks)
            except Exception as e:
                if transport == "nixl":
                    self.client.close()
                    raise
                self._fallback(f"NIXL unavailable ({type(e).__name__}: {e})")
        _LIVE.add(self)
        log.info(
            "kvbm-codec tier: %s at %s, chunk %d B, %d primary chunks, block data over %s",
            model,
            ",".join(self.targets),
            self.block_size_bytes,
            n,
            "NIXL" if self._staging is not None else "gRPC",
        )

    def _fallback(self, why: str) -> None:
        """From here on block bytes go in gRPC messages; said once in the log, counted every time."""
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        self.counters.add(transport_fallbacks=1)
        self._count(TRANSPORT_FALLBACKS, 1)
        log.warning("kvbm-codec tier: block data falls back to gRPC bytes: %s", why)

    @property
    def transport(self) -> str:
        return "nixl" if self._staging is not None else "grpc"

    # ---- names -----------------------------------------------------------------------------------

    def hash_of(self, key: OffloadKey) -> int:
        return sequence_hash(self.namespace + self._names.get_file_name(key))

    # ---- vLLM's scheduler-thread API -------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def submit_store(self, job_metadata: TransferJob) -> None:
        if len(self._store_jobs) >= self.max_pending_stores:
            self.counters.add(stores_dropped=1)
            self._count(STORES_DROPPED, 1)
            self._done.put(JobResult(job_metadata.job_id, success=False))
            return
        self._store_jobs.add(job_metadata.job_id)
        self._step_stores.append(job_metadata)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._step_loads.append(job_metadata)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()
        self._flush()

    def has_pending_work(self) -> bool:
        return bool(self._step_stores or self._step_loads or self._inflight)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._inflight = {f for f in self._inflight if not f.done()}
        out: list[JobResult] = []
        while True:
            try:
                res = self._done.get_nowait()
            except queue.Empty:
                return out
            self._store_jobs.discard(res.job_id)
            out.append(res)

    def drain_jobs(self) -> None:
        self._flush()
        for f in list(self._inflight):
            f.result()
        self._inflight.clear()

    def shutdown(self) -> None:
        self.drain_jobs()
        self._lookups.shutdown()
        self._pool.shutdown(wait=True)
        self._calls.shutdown(wait=True)
        if self._staging is not None:
            self._staging.close()
        self.client.close()
        self._primary = None  # type: ignore[assignment]  # releases the export so vLLM can unmap
        log.info("kvbm-codec tier shut down: %s", self.counters.snapshot())

    # ---- metrics ---------------------------------------------------------------------------------

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, OffloadingMetricMetadata]:
        lab = ("tier",)
        counters = {
            BLOCKS_STORED: "Chunks stored in kvbm-codec",
            BLOCKS_LOADED: "Chunks restored from kvbm-codec",
            BLOCKS_MISSED: "Chunks a load asked for that kvbm-codec no longer held",
            RAW_BYTES: "Raw KV bytes sent to kvbm-codec",
            STORED_BYTES: "Bytes kvbm-codec keeps for them (compressed)",
            STORES_DROPPED: "Store jobs refused because max_pending_stores were in flight",
            JOB_FAILURES: "Store or load jobs that failed (service refusal or error)",
            NIXL_BLOCKS: "Chunks whose bytes moved over NIXL (the rest went in gRPC messages)",
            TRANSPORT_FALLBACKS: "Times the tier fell back from NIXL to gRPC bytes",
        }
        out: dict[str, OffloadingMetricMetadata] = {
            k: OffloadingCounterMetadata(documentation=v, labelnames=lab) for k, v in counters.items()
        }
        out[REQUEST_SECONDS] = OffloadingHistogramMetadata(
            documentation="Seconds per PutBlocks/GetBlocks request to kvbm-codec",
            labelnames=("tier", "op"),
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        return out

    def get_stats(self) -> OffloadingConnectorStats | None:
        with self._stats_lock:
            stats, self._stats = self._stats, OffloadingConnectorStats()
        return None if stats.is_empty() else stats

    def _count(self, name: str, value: float) -> None:
        with self._stats_lock:
            self._stats.increase_counter(name, value, self._label)

    # ---- the worker thread -----------------------------------------------------------------------

    def _flush(self) -> None:
        stores, loads = self._step_stores, self._step_loads
        self._step_stores, self._step_loads = [], []
        if stores:
            self._inflight.add(self._pool.submit(self._run_stores, stores))
        if loads:
            self._inflight.add(self._pool.submit(self._run_loads, loads))

    def _split(self, call: Any, items: list[Any]) -> list[Any]:
        """``call`` over ``items`` as up to ``parallel_requests`` concurrent calls, results in order."""
        n = min(self.parallel_requests, len(items))
        if n <= 1:
            return list(call(items))
        size = -(-len(items) // n)
        parts = [self._calls.submit(call, items[i : i + size]) for i in range(0, len(items), size)]
        return [r for f in parts for r in f.result()]

    def _finish(self, job: TransferJob, ok: bool, t0: float, nbytes: int, keys: Any = None) -> None:
        if not ok:
            self.counters.add(job_failures=1)
            self._count(JOB_FAILURES, 1)
        self._done.put(JobResult(job.job_id, ok, keys, time.perf_counter() - t0, nbytes))

    def _run_stores(self, jobs: list[TransferJob]) -> None:
        t0 = time.perf_counter()
        plan: list[tuple[int, int, bool, int]] = []  # (hash, first position, compress, primary chunk)
        spans: list[int] = []
        page = self.layout.spec.page_size
        try:
            for job in jobs:
                for key, chunk in zip(job.keys, job.chunk_ids.tolist(), strict=True):
                    end = job.req_context.get_offload_key_position(key)
                    exact = end is None or end < page
                    if exact:
                        self.counters.add(exact_for_lack_of_position=1)
                    first = 0 if exact else int(end) - page  # type: ignore[operator]
                    plan.append((self.hash_of(key), first, not exact, chunk))
                spans.append(len(job.keys))
            results = self._store(plan)
            ok = True
        except Exception as e:  # every job must finish, or vLLM's drain waits forever
            log.warning("kvbm-codec store of %d chunks failed: %s: %s", len(plan), type(e).__name__, e)
            ok, results = False, []
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self._stats.observe_histogram(REQUEST_SECONDS, dt, (*self._label, "put"))
        if ok:
            raw = sum(r.raw_bytes for r in results)
            stored = sum(r.stored_bytes for r in results)
            self.counters.add(blocks_stored=len(results), raw_bytes=raw, stored_bytes=stored, put_requests=1)
            self._count(BLOCKS_STORED, len(results))
            self._count(RAW_BYTES, raw)
            self._count(STORED_BYTES, stored)
        for job, n in zip(jobs, spans + [0] * (len(jobs) - len(spans)), strict=True):
            self._finish(job, ok, t0, n * self.block_size_bytes)

    def _store(self, plan: list[tuple[int, int, bool, int]]) -> list[Any]:
        if self._staging is not None:
            try:
                return self._store_nixl(plan, self._staging)
            except Exception as e:  # the bytes path still works: this job and the next use it
                self._fallback(f"NIXL store failed ({type(e).__name__}: {e})")
        lay = self.layout
        items = [
            PutItem(h, lay.spec.to_bytes(lay.chunk_to_block(self._primary[c])), first_position=f, compress=z)
            for h, f, z, c in plan
        ]
        return self._split(self.client.put_blocks, items)

    def _store_nixl(self, plan: list[tuple[int, int, bool, int]], st: _NixlStaging) -> list[Any]:
        """Chunks re-laid straight into the registered staging buffer; the service READs them."""
        out: list[Any] = [None] * len(plan)
        for w in range(0, len(plan), st.n_blocks):
            window = list(enumerate(plan[w : w + st.n_blocks]))
            for i, (_, _, _, chunk) in window:
                self.layout.chunk_to_block(self._primary[chunk], out=st.block(i))
            for compress in (True, False):  # keep_exact is per request
                part = [(i, h, first) for i, (h, first, z, _) in window if z == compress]
                if not part:
                    continue
                res = self._split(
                    lambda p, c=compress: self._put_nixl(
                        st, [(h, f, i * st.block_bytes) for i, h, f in p], keep_exact=not c
                    ),
                    part,
                )
                for (i, _, _), r in zip(part, res, strict=True):
                    out[w + i] = r
            self.counters.add(nixl_blocks=len(window))
            self._count(NIXL_BLOCKS, len(window))
        return out

    def _put_nixl(
        self, st: _NixlStaging, items: list[tuple[int, int, int]], *, keep_exact: bool
    ) -> list[PutResult]:
        if isinstance(self.client, ShardedClient):
            return self.client.put_blocks_staged(st.registration, items, keep_exact=keep_exact)
        return self.client.put_blocks_nixl(st.registration(self.client), items, keep_exact=keep_exact)

    def _get_nixl(self, st: _NixlStaging, hashes: list[int], offsets: list[int]) -> list[GetResult]:
        if isinstance(self.client, ShardedClient):
            return self.client.get_blocks_staged(st.registration, hashes, offsets)
        return self.client.get_blocks_nixl(st.registration(self.client), hashes, offsets)

    def _run_loads(self, jobs: list[TransferJob]) -> None:
        t0 = time.perf_counter()
        flat = [
            (job, key, chunk)
            for job in jobs
            for key, chunk in zip(job.keys, job.chunk_ids.tolist(), strict=True)
        ]
        try:
            got = self._load(flat)
        except Exception as e:  # every job must finish, or vLLM's drain waits forever
            log.warning("kvbm-codec load of %d chunks failed: %s: %s", len(flat), type(e).__name__, e)
            for job in jobs:
                self._finish(job, False, t0, 0)
            return
        with self._stats_lock:
            self._stats.observe_histogram(REQUEST_SECONDS, time.perf_counter() - t0, (*self._label, "get"))
        self.counters.add(get_requests=1)
        loaded = sum(len(v) for v in got.values())
        self.counters.add(blocks_loaded=loaded, blocks_missed=len(flat) - loaded)
        self._count(BLOCKS_LOADED, loaded)
        if loaded < len(flat):
            self._count(BLOCKS_MISSED, len(flat) - loaded)
        for job in jobs:
            keys = got[job.job_id]
            ok = len(keys) == len(job.keys)
            self._finish(job, ok, t0, len(keys) * self.block_size_bytes, None if ok else keys)

    def _load(self, flat: list[tuple[TransferJob, OffloadKey, int]]) -> dict[int, list[OffloadKey]]:
        """Hits, converted back to vLLM's chunk layout, into their primary-tier slots; keys placed per job.

        A step's loads go as ONE GetBlocks (per staging window): the service decodes all of them in
        one batched codec call, which beats splitting them over concurrent calls on a few cores.
        """
        got: dict[int, list[OffloadKey]] = {job.job_id: [] for job, _, _ in flat}
        hashes = [self.hash_of(k) for _, k, _ in flat]
        if self._staging is not None:
            st = self._staging
            try:
                for w in range(0, len(flat), st.n_blocks):
                    part = flat[w : w + st.n_blocks]
                    res = self._get_nixl(
                        st, hashes[w : w + len(part)], [i * st.block_bytes for i in range(len(part))]
                    )
                    for i, ((job, key, chunk), r) in enumerate(zip(part, res, strict=True)):
                        if r.status == "hit":
                            self.layout.block_to_chunk(st.block(i), out=self._primary[chunk])
                            got[job.job_id].append(key)
                    self.counters.add(nixl_blocks=len(part))
                    self._count(NIXL_BLOCKS, len(part))
                return got
            except Exception as e:  # retried over the bytes path (a load is idempotent)
                self._fallback(f"NIXL load failed ({type(e).__name__}: {e})")
                got = {job.job_id: [] for job, _, _ in flat}
        for (job, key, chunk), res in zip(flat, self.client.get_blocks(hashes), strict=True):
            if res.status != "hit" or res.data is None:
                continue
            self.layout.block_to_chunk(self.layout.spec.from_bytes(res.data), out=self._primary[chunk])
            got[job.job_id].append(key)
        return got


def _targets(target: str | list[str]) -> list[str]:
    """One ``host:port`` or several (a list, or one string with commas), in order, each once."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    out = list(dict.fromkeys(str(t).strip() for t in parts if str(t).strip()))
    if not out:
        raise ValueError("target must name at least one kvbm-codec service (host:port)")
    return out


class _NixlStaging:
    """A buffer of ``n_blocks`` service blocks registered with the client's NIXL agent: the service
    READs stores out of it and WRITEs loads into it (UCX; cma between processes of one host), so block
    bytes never travel inside gRPC messages. vLLM's chunks need re-laying anyway (a different layout),
    and that one copy goes straight into / out of this buffer.

    With several replicas each one's client has its own agent, so the one buffer is registered with
    each of them (``registration``, on first use; a replica's new client after a reconnect gets a
    new registration). Every registration is closed by ``close``."""

    def __init__(self, client: CodecClient | ShardedClient, spec: Any, n_blocks: int) -> None:
        if n_blocks < 1:
            raise ValueError("nixl_staging_blocks must be >= 1")
        clients = client.on_each_replica(lambda t: t) if isinstance(client, ShardedClient) else {"": client}
        off = [key or "the service" for key, c in clients.items() if not c.stats().nixl_enabled]
        if off:
            raise RuntimeError(
                f"{', '.join(off)} does not serve NIXL ([nixl] enabled = false or no nixl library)"
            )
        self.spec, self.n_blocks, self.block_bytes = spec, n_blocks, spec.nbytes
        self.buf = torch.empty((n_blocks, spec.nbytes), dtype=torch.uint8)
        self._regs: dict[CodecClient, Any] = {}
        self._lock = threading.Lock()
        for c in clients.values():  # registered now, so a NIXL that cannot register falls back at start
            self.registration(c)

    def registration(self, client: CodecClient) -> Any:
        with self._lock:
            reg = self._regs.get(client)
            if reg is None or reg.closed:  # closed: that client's agent was closed
                self._regs = {c: r for c, r in self._regs.items() if not r.closed}
                reg = self._regs[client] = client.nixl_agent().register(self.buf)
            return reg

    def block(self, i: int) -> torch.Tensor:
        return self.buf[i].view(self.spec.torch_dtype).view(self.spec.shape)

    def close(self) -> None:
        with self._lock:
            regs, self._regs = list(self._regs.values()), {}
        for reg in regs:
            if not reg.closed:
                reg.close()
