"""The service's core, independent of any transport: put/get/contains/delete of KVBM blocks.

gRPC, NIXL and S3 front ends all call this and only this. It owns admission control (a bounded number
of requests in flight, refused with a retry hint beyond it), the codec per served model (encode with
the current calibration, decode with whichever calibration a stored frame names), the store, and the
metrics. It knows blocks and frames, not PCA.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, fields
from typing import TypeVar

import torch

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError, all_finite, block_positions
from kvbm_codec.api.codecs import BlockCodec, UnknownCodecError, get_codec
from kvbm_codec.api.errors import (
    CapacityError,
    CorruptBlockError,
    IncompatibleFrameError,
    InvalidBlockRequestError,
    InvalidRequestError,
    OverloadedError,
    RequestTooLargeError,
    ShuttingDownError,
    UnknownModelError,
)
from kvbm_codec.api.types import GetResult, LookupResult, PutItem, PutResult
from kvbm_codec.codec import block as _builtin_codecs  # noqa: F401  (registers "kvtc")
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.errors import FrameChecksumError, FrameError, FrameSizeError
from kvbm_codec.codec.params import Calibration
from kvbm_codec.core.codec_processes import CodecProcesses, WorkerModel
from kvbm_codec.core.fairness import TenantAdmission
from kvbm_codec.core.metrics import ServiceMetrics
from kvbm_codec.core.parallel import BatchSplitter, available_cores
from kvbm_codec.store.base import BlockKey, BlockStore, BlockTooLargeError, StoreFullError, TierStats

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_inflight_requests: int = 64
    max_inflight_per_tenant: int = 0  # 0: only the global bound; else one tenant's share of it
    max_inflight_bytes_per_tenant: int = 0  # 0: no bound on one tenant's request bytes in flight
    max_blocks_per_request: int = 256
    max_frame_bytes: int = 8 << 20
    retry_after_s: float = 0.05
    tenant_classes: Mapping[str, str] = field(default_factory=dict)  # tenant -> metric class
    batch_threads: int = 0  # threads one request's batch may be split across; 1: never, 0: one per core
    get_prefetch: bool = False  # a streamed get decodes its next batch while the current one is sent
    codec_processes: int = 0  # worker processes that encode/decode (0: the service's own threads)

    @classmethod
    def of(cls, source: object, **other: object) -> Limits:
        """The limits named like a field of ``source`` (the service config), ``other`` for those the
        config names differently, defaults for the rest: no field-by-field copy to keep in step."""
        named = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
        return cls(**{**named, **other})  # type: ignore[arg-type]


class ServedModel:
    """One model the service compresses for: its block spec, target ratio, codec and calibrations.

    ``codec`` names the registered block codec that encodes new blocks; a stored frame is decoded by
    the codec its header names. ``lookup`` fetches an older calibration by id (from the registry) so
    frames written before a calibration upgrade still decode; without it only the current
    calibration's frames do.
    """

    def __init__(
        self,
        name: str,
        calibration: Calibration,
        spec: BlockSpec,
        target_cr: float,
        lookup: Callable[[str], Calibration | None] | None = None,
        *,
        codec: str = "kvtc",
    ) -> None:
        self.name = name
        self.fingerprint = calibration.model_fingerprint
        self.spec = spec
        self.target_cr = target_cr
        self.calibration = calibration
        self.codec_name = codec
        self.encoder: BlockCodec = get_codec(codec)(calibration, spec, target_cr)
        self._lookup = lookup
        self._decoders: dict[tuple[str, str], BlockCodec] = {
            (codec, calibration.calibration_id): self.encoder
        }
        self._lock = threading.Lock()

    def decoder_for(self, calibration_id: str, codec: str | None = None) -> BlockCodec:
        """The codec for a frame written by ``codec`` (default: this model's) with ``calibration_id``."""
        key = (codec or self.codec_name, calibration_id)
        with self._lock:
            dec = self._decoders.get(key)
        if dec is not None:
            return dec
        try:
            factory = get_codec(key[0])
        except UnknownCodecError as e:
            raise IncompatibleFrameError(f"frame was written by codec {key[0]!r}, not served here") from e
        if calibration_id == self.calibration.calibration_id:
            cal: Calibration | None = self.calibration
        else:
            cal = self._lookup(calibration_id) if self._lookup else None
        if cal is None or cal.model_fingerprint != self.fingerprint:
            raise IncompatibleFrameError(
                f"frame needs calibration {calibration_id} of model {self.name}, "
                "which this service cannot load"
            )
        dec = factory(cal, self.spec, self.target_cr)  # decode follows the frame's allocation
        with self._lock:
            self._decoders[key] = dec
        return dec


@dataclass
class _Admission:
    limit: int
    inflight: int = 0
    closed: bool = False
    lock: threading.Condition = field(default_factory=threading.Condition)


class BlockService:
    def __init__(
        self,
        models: Sequence[ServedModel],
        store: BlockStore,
        *,
        limits: Limits | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.store = store
        self.metrics = metrics or ServiceMetrics()
        self._models: dict[str, ServedModel] = {}
        for m in models:
            self._models[m.fingerprint] = m
            self._models[m.name] = m
            self.metrics.calibration_info.labels(model=m.name).info(
                {
                    **m.encoder.describe(),
                    "target_cr": f"{m.target_cr:g}",
                }
            )
        self.metrics.watch_tiers(store.stats)
        self._adm = _Admission(self.limits.max_inflight_requests)
        # with worker processes a part runs in a worker; the splitter's threads only wait on it
        self._procs: CodecProcesses | None = None
        if self.limits.codec_processes > 0:
            self._procs = CodecProcesses(
                [
                    WorkerModel(m.name, m.codec_name, m.calibration, m.spec, m.target_cr)
                    for m in {id(m): m for m in models}.values()
                ],
                self.limits.codec_processes,
            )
            self._procs.start()
        threads = self.limits.batch_threads or (self.limits.codec_processes or available_cores())
        self._split = BatchSplitter(threads)
        self.metrics.watch_split(self._split.threads, self._split.counts)
        procs = self._procs
        self.metrics.watch_processes(self.limits.codec_processes, lambda: procs.restarts if procs else 0)
        # one helper per admitted request at most: a stream prefetches one batch at a time
        self._prefetch = ThreadPoolExecutor(
            self.limits.max_inflight_requests, thread_name_prefix="kvbm-codec-get"
        )
        self._tenants = TenantAdmission(
            self.limits.max_inflight_per_tenant,
            self.limits.max_inflight_bytes_per_tenant,
            self.limits.tenant_classes,
        )
        quotas = getattr(store, "quota_usage", None)
        if quotas is not None:
            self.metrics.watch_quotas(quotas, self._tenants.class_of)

    # ---- admission ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, method: str, tenant: str | None = None, nbytes: int = 0) -> Iterator[None]:
        """Admit one request or refuse it at once (never queue unboundedly); time and count it.

        Every verb enters this itself, so no front end can forget it or admit twice; it stays public
        so a test (or an operator tool) can hold slots. The one point where per-tenant policy
        (``core.fairness``) is applied: with ``tenant``, that tenant's own bounds apply first,
        requests in flight and, with ``nbytes`` (the request's payload size, when the caller knows
        it), bytes in flight."""
        cls = self._tenants.class_of(tenant)
        if tenant is not None:
            refusal = self._tenants.try_enter(tenant, nbytes)
            if refusal is not None:
                self.metrics.refused.labels(reason=refusal.reason, tenant_class=cls).inc()
                raise OverloadedError(refusal.message, retry_after_s=self.limits.retry_after_s)
        try:
            with self._admit(method, cls):
                yield
        finally:
            if tenant is not None:
                self._tenants.leave(tenant, nbytes)

    def _peers(self) -> int:
        """Admitted requests besides the caller's (a racy read is fine: it only steers the split)."""
        return max(0, self._adm.inflight - 1)

    def tenant_class(self, tenant: str | None) -> str:
        """The metric class of ``tenant`` (front ends label their own refusals with it)."""
        return self._tenants.class_of(tenant)

    @contextlib.contextmanager
    def _admit(self, method: str, cls: str) -> Iterator[None]:
        a = self._adm
        with a.lock:
            if a.closed:
                self.metrics.refused.labels(reason=ShuttingDownError.code, tenant_class=cls).inc()
                raise ShuttingDownError("service is draining; retry on another replica")
            if a.inflight >= a.limit:
                self.metrics.refused.labels(reason=OverloadedError.code, tenant_class=cls).inc()
                raise OverloadedError(
                    f"{a.inflight} requests in flight (limit {a.limit})",
                    retry_after_s=self.limits.retry_after_s,
                )
            a.inflight += 1
        self.metrics.inflight.inc()
        t0 = time.perf_counter()
        code = "ok"
        try:
            yield
        except Exception as e:
            code = getattr(e, "code", "internal")
            if code not in ("ok",) and not isinstance(e, OverloadedError | ShuttingDownError):
                self.metrics.refused.labels(reason=code, tenant_class=cls).inc()
            raise
        finally:
            self.metrics.request_seconds.labels(method=method).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(method=method, code=code).inc()
            self.metrics.inflight.dec()
            with a.lock:
                a.inflight -= 1
                a.lock.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait for in-flight requests; True if all finished in time."""
        a = self._adm
        deadline = time.monotonic() + timeout_s
        with a.lock:
            a.closed = True
            while a.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                a.lock.wait(left)
        return True

    # ---- model lookup ---------------------------------------------------------------------------

    def model(self, name_or_fingerprint: str) -> ServedModel:
        if not name_or_fingerprint:
            raise InvalidRequestError("request names no model")
        m = self._models.get(name_or_fingerprint)
        if m is None:
            names = sorted({m.name for m in self._models.values()})
            raise UnknownModelError(f"model {name_or_fingerprint!r} is not served here (served: {names})")
        return m

    def models(self) -> list[ServedModel]:
        return list({id(m): m for m in self._models.values()}.values())

    def check_count(self, n: int) -> None:
        """Refuse a request of more than ``max_blocks_per_request`` blocks (a front end may call it
        before moving any bytes, e.g. before a NIXL READ)."""
        if n > self.limits.max_blocks_per_request:
            raise RequestTooLargeError(
                f"{n} blocks in one request; limit is {self.limits.max_blocks_per_request}"
            )

    # ---- verbs: each admits, times and counts itself under its ``method`` label ------------------

    def put_blocks(
        self,
        tenant: str,
        model: str,
        items: Sequence[PutItem] | Callable[[ServedModel], Sequence[PutItem]],
        *,
        method: str = "put",
        nbytes: int = 0,
    ) -> list[PutResult]:
        """All-or-nothing validation: every item is encoded (or checked) before any is stored.

        ``items`` may be a function of the served model, called once admitted: a front end whose
        blocks arrive by a transfer (a NIXL READ into staging) fetches them inside the request's
        admission, so the transfer is bounded, timed and counted with it."""
        with self.request(method, tenant, nbytes):
            m = self.model(model)
            got = items(m) if callable(items) else items
            return self._put(tenant, m, got)

    def put_stream(
        self,
        tenant: str,
        model: str,
        chunks: Callable[[ServedModel], Iterable[Sequence[PutItem]]],
        *,
        encode_blocks: int = 1,
        method: str = "put",
        nbytes: int = 0,
    ) -> list[PutResult]:
        """``put_blocks`` of blocks that arrive in chunks: the blocks received so far are checked and
        encoded (in batches of at least ``encode_blocks``, the last one smaller) while the front end
        waits for the next chunk, and nothing is stored until ``chunks`` ends. If it raises (a cut
        stream, a deadline) or any block is refused, no block of the stream is stored. The block
        limit (``max_blocks_per_request``) counts the whole stream, as it counts one request."""
        if encode_blocks < 1:
            raise ValueError(f"encode_blocks must be at least 1, got {encode_blocks}")
        with self.request(method, tenant, nbytes):
            m = self.model(model)
            prepared: list[tuple[BlockKey, bytes, int]] = []
            pending: list[PutItem] = []
            count = 0
            for chunk in chunks(m):
                count += len(chunk)
                self.check_count(count)
                pending += chunk
                if len(pending) >= encode_blocks:
                    prepared += self._prepare(tenant, m, pending)
                    pending = []
            prepared += self._prepare(tenant, m, pending)
            return self._store(m, prepared)

    def get_blocks(
        self,
        tenant: str,
        model: str,
        hashes: Sequence[int],
        *,
        as_frames: bool = False,
        with_frames: bool = False,
        method: str = "get",
    ) -> list[GetResult]:
        """Raw blocks (or, ``as_frames``, the verified stored frames undecoded). ``with_frames`` also
        returns each decoded block's frame: an S3 GET names the object by the frame's digest, and
        this way the bytes it serves come from the frame it named, parsed once."""
        with self.request(method, tenant):
            m = self.model(model)
            self.check_count(len(hashes))
            return self._get(tenant, m, hashes, as_frames, with_frames)

    def get_stream(
        self,
        tenant: str,
        model: str,
        hashes: Sequence[int],
        each: Callable[[int, list[GetResult]], T],
        *,
        batch_size: Callable[[ServedModel], int] | int | None = None,
        as_frames: bool = False,
        before_batch: Callable[[], None] | None = None,
        method: str = "get",
        nbytes: int = 0,
    ) -> Iterator[T]:
        """A get served in batches, admitted from the first batch until the last is handed on (or
        the stream is closed): a streaming front end holds one slot for the stream's whole life.

        ``each(start, results)`` turns one batch (the hashes from ``start``) into what the front end
        sends (a protobuf message, a NIXL WRITE); it runs inside the admission, so its failures count
        under their codes like the core's own. ``before_batch`` may refuse the next batch (a passed
        deadline)."""
        with self.request(method, tenant, nbytes):
            m = self.model(model)
            self.check_count(len(hashes))
            n = batch_size(m) if callable(batch_size) else batch_size
            n = max(1, n or len(hashes))
            starts = list(range(0, len(hashes), n))

            def fetch(start: int) -> list[GetResult]:
                if before_batch is not None:
                    before_batch()
                return self._get(tenant, m, hashes[start : start + n], as_frames)

            if not self.limits.get_prefetch or len(starts) < 2:
                for start in starts:
                    yield each(start, fetch(start))
                return
            # Batch i + 1 is read and decoded on a helper thread while batch i is handed on and sent
            # (a gRPC stream sends one message at a time, a NIXL WRITE waits for its transfer): the
            # decoder no longer waits for the wire. At most one batch ahead, so a stream holds two
            # batches at once; every helper has finished before the request leaves its admission.
            ahead: Future[list[GetResult]] | None = None
            try:
                got = fetch(starts[0])
                for k, start in enumerate(starts):
                    if k + 1 < len(starts):
                        ahead = self._prefetch.submit(fetch, starts[k + 1])
                    yield each(start, got)
                    if ahead is not None:
                        got, ahead = ahead.result(), None
            finally:
                if ahead is not None:  # the stream ended early (cancelled, failed): let it finish
                    futures_wait([ahead])

    def lookup(
        self, tenant: str, model: str, hashes: Sequence[int], *, method: str = "lookup"
    ) -> list[LookupResult]:
        """What is stored under each hash, from the frame header alone (nothing is decoded). A frame
        whose header or digest fails reads as not stored: a get would drop it."""
        with self.request(method, tenant):
            m = self.model(model)
            self.check_count(len(hashes))
            out = []
            for h in hashes:
                frame = self.store.get(self._key(tenant, m, h))
                try:
                    lim = self.limits.max_frame_bytes
                    hd = None if frame is None else fr.read_frame(frame, max_frame_bytes=lim).header
                except FrameError:
                    hd = None
                if frame is None or hd is None:
                    out.append(LookupResult(h, False, raw_bytes=m.spec.nbytes))
                    continue
                out.append(
                    LookupResult(
                        h,
                        True,
                        stored_bytes=len(frame),
                        raw_bytes=m.spec.nbytes,
                        calibration_id=hd.calibration_id,
                        positions=tuple(fr.runs_to_positions(hd.positions).tolist()),
                        layers=(hd.layer_start, hd.layer_end),
                    )
                )
            return out

    def contains(
        self, tenant: str, model: str, hashes: Sequence[int], *, method: str = "contains"
    ) -> list[bool]:
        with self.request(method, tenant):
            m = self.model(model)
            self.check_count(len(hashes))
            return [self.store.contains(self._key(tenant, m, h)) for h in hashes]

    def delete(self, tenant: str, model: str, hashes: Sequence[int], *, method: str = "delete") -> int:
        with self.request(method, tenant):
            m = self.model(model)
            self.check_count(len(hashes))
            n = sum(self.store.delete(self._key(tenant, m, h)) for h in hashes)
            self.metrics.blocks_deleted.labels(model=m.name).inc(n)
            return n

    def tier_stats(self, tenant: str | None = None, *, method: str = "stats") -> list[TierStats]:
        """Occupancy of each tier, for a status call (admitted like any request)."""
        with self.request(method, tenant):
            return list(self.store.stats())

    def close(self) -> None:
        """Close the store (after :meth:`drain`): flushes what the disk tier holds."""
        self._split.close()
        self._prefetch.shutdown(wait=True)
        if self._procs is not None:
            self._procs.close()
        self.store.close()

    # ---- the work behind the verbs (already admitted) ------------------------------------------

    def _put(self, tenant: str, m: ServedModel, items: Sequence[PutItem]) -> list[PutResult]:
        self.check_count(len(items))
        return self._store(m, self._prepare(tenant, m, items))

    def _prepare(
        self, tenant: str, m: ServedModel, items: Sequence[PutItem]
    ) -> list[tuple[BlockKey, bytes, int]]:
        """(key, frame, raw bytes) per item, in order: frames checked, raw blocks encoded in one
        batched call; raises on the first refused item, having stored nothing."""
        if not items:
            return []
        keys = [self._key(tenant, m, it.sequence_hash) for it in items]
        frames: dict[int, bytes] = {
            i: self._check_frame(m, it.data) for i, it in enumerate(items) if it.is_frame
        }
        frames.update(self._encode_many(m, [(i, it) for i, it in enumerate(items) if not it.is_frame]))
        return [(keys[i], frames[i], m.spec.nbytes) for i in range(len(items))]

    def _store(self, m: ServedModel, prepared: Sequence[tuple[BlockKey, bytes, int]]) -> list[PutResult]:
        results = []
        for key, frame, raw in prepared:
            try:
                self.store.put(key, frame)
            except StoreFullError as e:
                raise CapacityError(str(e), retry_after_s=1.0) from e
            except BlockTooLargeError as e:
                raise RequestTooLargeError(str(e)) from e
            self.metrics.blocks_put.labels(model=m.name).inc()
            self.metrics.stored_bytes.labels(model=m.name).inc(len(frame))
            self.metrics.compression_ratio.labels(model=m.name).observe(raw / len(frame))
            results.append(PutResult(key.sequence_hash, len(frame), raw))
        return results

    def _get(
        self, tenant: str, m: ServedModel, hashes: Sequence[int], as_frames: bool, with_frames: bool = False
    ) -> list[GetResult]:
        out: list[GetResult | None] = [None] * len(hashes)
        pending: dict[int, tuple[fr.Frame, BlockCodec]] = {}
        keys: dict[int, BlockKey] = {}
        stored: dict[int, bytes] = {}
        for i, h in enumerate(hashes):
            key = keys[i] = self._key(tenant, m, h)
            frame = self.store.get(key)
            if frame is None:
                self.metrics.block_lookups.labels(model=m.name, result="miss").inc()
                out[i] = GetResult(h, "miss")
                continue
            try:  # parsed and verified once here; the codec decodes the parsed frame
                f = fr.read_frame(frame, max_frame_bytes=self.limits.max_frame_bytes)
                dec = m.decoder_for(f.header.calibration_id, f.header.codec)
                if as_frames:
                    f.verify()
                    hd = f.header  # served undecoded, so hold it to what a put of a frame must meet
                    if (hd.layer_start, hd.layer_end, hd.n_tokens, hd.dtype) != (
                        0,
                        m.spec.n_layers,
                        m.spec.page_size,
                        m.spec.dtype,
                    ):
                        raise InvalidBlockError(f"stored frame is not one whole block of {m.spec}")
                    positions = tuple(fr.runs_to_positions(f.header.positions).tolist())
                    out[i] = self._hit(m, h, frame, positions)
                else:
                    pending[i] = (f, dec)
                    stored[i] = frame
            except (FrameError, InvalidBlockError) as e:
                out[i] = self._corrupt(m, key, h, e)
        for i, res in self._decode_pending(m, pending, stored).items():
            h = hashes[i]
            if isinstance(res, Exception):
                out[i] = self._corrupt(m, keys[i], h, res)
            else:
                out[i] = self._hit(m, h, *res, frame=stored[i] if with_frames else None)
        return [r for r in out if r is not None]

    def _decode_pending(
        self, m: ServedModel, pending: dict[int, tuple[fr.Frame, BlockCodec]], raw: Mapping[int, bytes]
    ) -> dict[int, tuple[bytes, tuple[int, ...]] | Exception]:
        """Parsed frames decoded in one batched call per codec: raw bytes and positions, or the
        error of a frame that failed its checks while decoding. With worker processes, a frame of
        the model's current calibration goes to a worker as its stored bytes (``raw``)."""
        by_codec: dict[int, list[int]] = {}
        for i, (_, dec) in pending.items():
            by_codec.setdefault(id(dec), []).append(i)
        done: dict[int, tuple[bytes, tuple[int, ...]] | Exception] = {}
        procs = self._procs
        for idx in by_codec.values():
            dec = pending[idx[0]][1]
            hd = pending[idx[0]][0].header
            in_workers = procs is not None and procs.serves(m.name, hd.codec, hd.calibration_id)

            def decode(
                frames: Sequence[fr.Frame], dec: BlockCodec = dec
            ) -> list[tuple[bytes, tuple[int, ...]] | Exception]:
                # the block's bytes are made in the part too: that copy runs on the part's core
                return [
                    r if isinstance(r, Exception) else (m.spec.to_bytes(r[0]), tuple(r[1].tolist()))
                    for r in dec.decode_many(frames)
                ]

            def decode_in_worker(frames: Sequence[bytes]) -> list[tuple[bytes, tuple[int, ...]] | Exception]:
                assert procs is not None
                return procs.decode(m.name, frames)  # the worker verifies each frame again

            t0 = time.perf_counter()
            if in_workers:
                decoded = self._split.map(decode_in_worker, [raw[i] for i in idx], peers=self._peers())
            else:
                decoded = self._split.map(decode, [pending[i][0] for i in idx], peers=self._peers())
            per_block = (time.perf_counter() - t0) / len(idx)
            for i, res in zip(idx, decoded, strict=True):
                if isinstance(res, FrameError | InvalidBlockError):
                    done[i] = res
                    continue
                if isinstance(res, Exception):
                    raise res
                self.metrics.restore_seconds.labels(model=m.name).observe(per_block)
                self.metrics.raw_bytes.labels(model=m.name, direction="out").inc(len(res[0]))
                done[i] = res
        return done

    def _hit(
        self, m: ServedModel, h: int, data: bytes, positions: tuple[int, ...], frame: bytes | None = None
    ) -> GetResult:
        self.metrics.block_lookups.labels(model=m.name, result="hit").inc()
        return GetResult(h, "hit", data, positions, frame)

    def _corrupt(self, m: ServedModel, key: BlockKey, h: int, e: Exception) -> GetResult:
        """A stored frame that fails its checks is dropped: serving it would be wrong KV."""
        self.store.delete(key)
        source = "store" if isinstance(e, FrameChecksumError) else "store_format"
        self.metrics.checksum_failures.labels(source=source).inc()
        self.metrics.block_lookups.labels(model=m.name, result="corrupt").inc()
        return GetResult(h, "corrupt")

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _key(tenant: str, m: ServedModel, sequence_hash: int) -> BlockKey:
        try:
            return BlockKey(tenant, m.fingerprint, sequence_hash)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e

    def _encode_many(self, m: ServedModel, items: list[tuple[int, PutItem]]) -> dict[int, bytes]:
        """Every block of the request checked, then encoded in one batched codec call."""
        if not items:
            return {}
        blocks, positions = [], []
        for _, it in items:
            try:
                block = m.spec.from_bytes(it.data)
                pos = (
                    it.positions
                    if it.positions is not None
                    else block_positions(it.first_position, m.spec.page_size)
                )
                if not all_finite(block):
                    raise InvalidBlockError("block holds NaN or Inf values")
            except InvalidBlockError as e:
                raise InvalidBlockRequestError(f"block {it.sequence_hash:#x}: {e}") from e
            blocks.append(block)
            positions.append(pos)
        t0 = time.perf_counter()
        work = list(zip(blocks, positions, [it.compress for _, it in items], strict=True))

        def encode(part: Sequence[tuple[torch.Tensor, torch.Tensor, bool]]) -> list[tuple[bytes, object]]:
            b, p, c = zip(*part, strict=True) if part else ((), (), ())
            return list(m.encoder.encode_many(list(b), list(p), list(c)))

        procs = self._procs
        raw = [it.data for _, it in items]  # checked above; a worker takes the bytes, not the tensor

        def encode_in_worker(part: Sequence[tuple[int, torch.Tensor, bool]]) -> list[tuple[bytes, object]]:
            assert procs is not None
            k, p, c = zip(*part, strict=True) if part else ((), (), ())
            return [(f, None) for f in procs.encode(m.name, [bytes(raw[i]) for i in k], list(p), list(c))]

        try:
            if procs is not None and procs.serves(m.name, m.codec_name, m.calibration.calibration_id):
                indexed = [(k, p, c) for k, (_, p, c) in enumerate(work)]
                encoded = self._split.map(encode_in_worker, indexed, peers=self._peers())
            else:
                encoded = self._split.map(encode, work, peers=self._peers())
        except InvalidBlockError as e:
            raise InvalidBlockRequestError(str(e)) from e
        per_block = (time.perf_counter() - t0) / len(items)
        out = {}
        for (i, it), (frame, _) in zip(items, encoded, strict=True):
            if len(frame) > self.limits.max_frame_bytes:  # else stored, then refused by every get
                raise RequestTooLargeError(
                    f"block {it.sequence_hash:#x} encodes to {len(frame)} bytes, "
                    f"limit {self.limits.max_frame_bytes}"
                )
            self.metrics.encode_seconds.labels(model=m.name).observe(per_block)
            self.metrics.raw_bytes.labels(model=m.name, direction="in").inc(len(it.data))
            out[i] = frame
        return out

    def _check_frame(self, m: ServedModel, data: bytes | memoryview) -> bytes:
        """A client-compressed frame is stored only if it is intact and a whole block of this model."""
        try:
            f = fr.read_frame(data, max_frame_bytes=self.limits.max_frame_bytes)
            f.verify()
        except FrameSizeError as e:  # too big is a limit, not damage: no checksum-failure count
            raise RequestTooLargeError(f"submitted frame refused: {e}") from e
        except FrameError as e:
            self.metrics.checksum_failures.labels(source="request").inc()
            raise CorruptBlockError(f"submitted frame refused: {e}") from e
        h = f.header
        if h.model_fingerprint != m.fingerprint:
            raise IncompatibleFrameError(f"frame is for model {h.model_fingerprint}, not {m.fingerprint}")
        m.decoder_for(h.calibration_id, h.codec)
        if (h.layer_start, h.layer_end, h.n_tokens) != (0, m.spec.n_layers, m.spec.page_size):
            raise InvalidBlockRequestError(
                f"frame covers layers [{h.layer_start}, {h.layer_end}) x {h.n_tokens} tokens, "
                f"not one whole block ({m.spec.n_layers} layers x {m.spec.page_size} tokens)"
            )
        if h.dtype != m.spec.dtype:
            raise InvalidBlockRequestError(f"frame dtype {h.dtype} is not the served {m.spec.dtype}")
        return bytes(data)


class ServiceTransport:
    """The in-process :class:`BlockService` as a ``BlockTransport``: tenant and model bound, nothing
    else (each verb admits itself)."""

    def __init__(self, service: BlockService, tenant: str, model: str) -> None:
        self.service, self.tenant, self.model = service, tenant, model

    def put_blocks(self, items: Sequence[PutItem]) -> list[PutResult]:
        return self.service.put_blocks(self.tenant, self.model, items)

    def get_blocks(self, hashes: Sequence[int], *, views: bool = False) -> list[GetResult]:
        return self.service.get_blocks(self.tenant, self.model, hashes)  # already its own bytes

    def contains(self, hashes: Sequence[int]) -> list[bool]:
        return self.service.contains(self.tenant, self.model, hashes)

    def delete(self, hashes: Sequence[int]) -> int:
        return self.service.delete(self.tenant, self.model, hashes)
