"""gRPC front end of the service: protobuf <-> BlockService, errors -> gRPC status, NIXL data path.

Each RPC calls one core verb, which admits, times and counts it (``method`` label). A ServiceError
becomes the gRPC status ``wire.status_of`` maps its code to, with the message as details and, in
trailing metadata, the stable code (``kvbm-error-code``) and any retry hint (``retry-after-ms``, and
``grpc-retry-pushback-ms``, which gRPC's own retry policy obeys; ``-1`` there tells it not to retry a
refusal that would fail again).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvbm_codec import __version__
from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.api.errors import (
    InvalidRequestError,
    ServiceError,
)
from kvbm_codec.api.types import GetResult, LookupResult, PutItem, PutResult
from kvbm_codec.core.fairness import UNKNOWN_CLASS
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.frontends.grpc.get_response import add_servicer, encode_get_response
from kvbm_codec.frontends.grpc.wire import (
    ERROR_CODE_KEY,
    SERVICE_NAME,
    DeadlineError,
    NixlPathError,
    NixlUnavailableError,
    abort,
    status_of,
)
from kvbm_codec.service.config import ServiceConfig
from kvbm_codec.service.logging import fields, get_logger

_MAX_POSITION = 1 << 62

log = get_logger(__name__)

Authenticate = Callable[[grpc.ServicerContext], str]


def no_auth(tenant: str = "default") -> Authenticate:
    """Every caller is ``tenant``: the hook the auth module replaces with token / mTLS identity."""

    def authenticate(_context: grpc.ServicerContext) -> str:
        return tenant

    return authenticate


SPARE_HANDLER_THREADS = 8


@dataclass
class _Deadline:
    at: float

    @classmethod
    def of(cls, context: grpc.ServicerContext, default_s: float, cap_s: float | None = None) -> _Deadline:
        """The client's deadline, or ``default_s`` without one, never longer than ``cap_s``."""
        left = context.time_remaining()  # no client deadline reads as None or a huge number
        budget = default_s if left is None or not math.isfinite(left) or left > 1e8 else left
        if cap_s is not None:
            budget = min(budget, cap_s)
        return cls(time.monotonic() + budget)

    def enforce(self, context: grpc.ServicerContext) -> threading.Timer:
        """Cancel the call when the (capped) deadline passes, even while its handler is blocked
        sending to a client that does not read; the caller cancels the timer when done."""
        t = threading.Timer(max(self.left(), 0.0), context.cancel)
        t.daemon = True
        t.start()
        return t

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise DeadlineError(f"deadline passed before {what}")


def _nixl_error(e: Exception) -> ServiceError:
    from kvbm_codec.transport.nixl import NixlTimeoutError

    if isinstance(e, NixlTimeoutError):
        return DeadlineError(f"NIXL transfer timed out: {e}")
    return NixlPathError(str(e))


class KvbmCodecServicer(pb_grpc.KvbmCodecServicer):
    def __init__(
        self,
        svc: BlockService,
        cfg: ServiceConfig,
        *,
        authenticate: Authenticate | None = None,
        staging: Any | None = None,  # transport.staging.StagingPool, when NIXL is enabled and loads
    ) -> None:
        self.svc = svc
        self.cfg = cfg
        self.authenticate = authenticate or no_auth(cfg.auth.tenant)
        self.staging = staging

    # ---- plumbing --------------------------------------------------------------------------------

    def _run(
        self,
        method: str,
        context: grpc.ServicerContext,
        fn: Callable[[str, _Deadline], Any],
    ) -> Any:
        t0 = time.perf_counter()
        try:
            tenant = self._tenant(context)
            deadline = _Deadline.of(context, self.cfg.request_timeout_s, self.cfg.max_deadline_s)
            deadline.check(method)
            return fn(tenant, deadline)
        except ServiceError as e:
            self._log_refusal(method, e, t0)
            abort(context, e)
        except Exception as e:  # a bug: report INTERNAL without leaking internals to the caller
            log.exception("unhandled error", extra=fields(method=method, error=type(e).__name__))
            context.set_trailing_metadata(((ERROR_CODE_KEY, "internal"),))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")

    def _tenant(self, context: grpc.ServicerContext) -> str:
        try:
            return self.authenticate(context)
        except ServiceError as e:  # counted here whatever the hook: an attack shows on the dashboard
            self.svc.metrics.auth_failures.labels(
                frontend="grpc", reason=e.code, tenant_class=UNKNOWN_CLASS
            ).inc()
            raise

    @staticmethod
    def _log_refusal(method: str, e: ServiceError, t0: float) -> None:
        log.info(
            "request refused",
            extra=fields(
                method=method,
                code=e.code,
                status=status_of(e).name,
                ms=round((time.perf_counter() - t0) * 1000, 2),
                detail=e.message[:200],
            ),
        )

    @staticmethod
    def _dtype(m: ServedModel, dtype: str) -> None:
        """Bytes of another element type are refused, never reinterpreted (bf16 read as fp16 is
        wrong KV that decodes fine). Empty: a client from before the field; the served dtype."""
        if dtype and dtype != m.spec.dtype:
            raise InvalidRequestError(
                f"blocks of dtype {dtype!r}; model {m.name} is served as {m.spec.dtype}"
            )

    # ---- puts ------------------------------------------------------------------------------------

    def _item(self, m: ServedModel, b: pb.Block, data: bytes | memoryview) -> PutItem:
        if b.layout not in (pb.LAYOUT_UNSPECIFIED, pb.LAYOUT_FULLY_CONTIGUOUS):
            raise InvalidRequestError(f"block {b.sequence_hash:#x}: unsupported layout {b.layout}")
        if b.HasField("layers") and (b.layers.start, b.layers.end) not in ((0, 0), (0, m.spec.n_layers)):
            raise InvalidRequestError(
                f"block {b.sequence_hash:#x}: layers [{b.layers.start}, {b.layers.end}) is not the whole "
                f"model [0, {m.spec.n_layers}); the service stores whole blocks"
            )
        if b.encoding not in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW, pb.ENCODING_FRAME):
            raise InvalidRequestError(f"block {b.sequence_hash:#x}: unknown encoding {b.encoding}")
        positions = None
        if b.positions:
            if any(p >= _MAX_POSITION for p in b.positions):
                raise InvalidRequestError(f"block {b.sequence_hash:#x}: position out of range")
            positions = torch.tensor(list(b.positions), dtype=torch.int64)
        elif b.first_position + m.spec.page_size >= _MAX_POSITION:
            raise InvalidRequestError(f"block {b.sequence_hash:#x}: first_position out of range")
        return PutItem(
            sequence_hash=b.sequence_hash,
            data=data,
            positions=positions,
            first_position=b.first_position,
            is_frame=b.encoding == pb.ENCODING_FRAME,
            compress=not b.keep_exact,
        )

    def PutBlocks(self, request: pb.PutBlocksRequest, context: grpc.ServicerContext) -> pb.PutBlocksResponse:
        def put(tenant: str, deadline: _Deadline) -> pb.PutBlocksResponse:
            path = "nixl" if request.HasField("region") else "grpc"

            def items(m: ServedModel) -> list[PutItem]:  # called by the core once admitted
                self._dtype(m, request.dtype)
                self.svc.check_count(len(request.blocks))
                if path == "nixl":
                    payloads = self._nixl_read(m, request, deadline)
                else:
                    payloads = self._inline(request.blocks)
                self.svc.metrics.transfer_bytes.labels(path=path, direction="in").inc(
                    sum(len(d) for d in payloads)
                )
                out = [self._item(m, b, d) for b, d in zip(request.blocks, payloads, strict=True)]
                deadline.check("encoding")
                return out

            results = self.svc.put_blocks(tenant, request.model, items, nbytes=request.ByteSize())
            return self._put_response(results)

        return self._run("put", context, put)

    def PutBlocksStream(
        self, request_iterator: Iterator[pb.PutBlocksRequest], context: grpc.ServicerContext
    ) -> pb.PutBlocksResponse:
        def put(tenant: str, deadline: _Deadline) -> pb.PutBlocksResponse:
            timer = deadline.enforce(context)  # a client that stops sending is cut at the deadline
            try:
                first = self._next_chunk(request_iterator, context, deadline)
                if first is None:
                    raise InvalidRequestError("PutBlocksStream ended before its first chunk")
                declared = first.stream_blocks
                if declared == 0:
                    raise InvalidRequestError("a PutBlocksStream's first chunk must set stream_blocks")
                self.svc.check_count(declared)  # refused before any block is encoded

                def chunks(m: ServedModel) -> Iterator[list[PutItem]]:  # called by the core once admitted
                    self._dtype(m, first.dtype)
                    req: pb.PutBlocksRequest | None = first
                    seen = 0
                    while req is not None:
                        if req.model not in ("", first.model) or req.dtype not in ("", first.dtype):
                            raise InvalidRequestError(
                                "a PutBlocksStream chunk names another model or dtype than its first"
                            )
                        if req.stream_blocks not in (0, declared):
                            raise InvalidRequestError("a PutBlocksStream chunk changes stream_blocks")
                        seen += len(req.blocks)
                        if seen > declared:
                            raise InvalidRequestError(
                                f"PutBlocksStream carries more than its {declared} blocks"
                            )
                        if req.HasField("region"):
                            raise InvalidRequestError(
                                "PutBlocksStream carries inline blocks; a NIXL put is a unary PutBlocks"
                            )
                        payloads = self._inline(req.blocks)
                        self.svc.metrics.transfer_bytes.labels(path="grpc", direction="in").inc(
                            sum(len(d) for d in payloads)
                        )
                        yield [self._item(m, b, d) for b, d in zip(req.blocks, payloads, strict=True)]
                        deadline.check("encoding")
                        req = self._next_chunk(request_iterator, context, deadline)
                    if seen != declared:  # gRPC ended the stream early: never a complete put
                        raise InvalidRequestError(
                            f"PutBlocksStream ended after {seen} of its {declared} blocks; nothing stored"
                        )

                # bytes held at once: the chunk being encoded and the one arriving behind it
                results = self.svc.put_stream(
                    tenant,
                    first.model,
                    chunks,
                    encode_blocks=self.cfg.put_stream_encode_blocks,
                    nbytes=min(2 * first.ByteSize(), self.cfg.max_message_bytes),
                )
            finally:
                timer.cancel()
            return self._put_response(results)

        return self._run("put", context, put)

    @staticmethod
    def _put_response(results: Sequence[PutResult]) -> pb.PutBlocksResponse:
        return pb.PutBlocksResponse(
            results=[
                pb.PutResult(
                    sequence_hash=r.sequence_hash, stored_bytes=r.stored_bytes, raw_bytes=r.raw_bytes
                )
                for r in results
            ]
        )

    @staticmethod
    def _next_chunk(
        requests: Iterator[pb.PutBlocksRequest], context: grpc.ServicerContext, deadline: _Deadline
    ) -> pb.PutBlocksRequest | None:
        """The stream's next chunk, None once the client half-closed. A stream that broke raises, so
        the put stores nothing: gRPC ends the request iterator the same way for a half-close and
        for a call it failed itself (a chunk over the message limit), so an ended stream also counts
        as complete only while the call is still active."""
        try:
            req = next(requests, None)
        except grpc.RpcError as e:
            req, err = None, e
        else:
            if req is not None or context.is_active():
                return req
            err = None
        if deadline.left() <= 0:
            raise DeadlineError("deadline passed while receiving the put stream") from err
        raise InvalidRequestError("the put stream broke before it ended; nothing stored") from err

    @staticmethod
    def _inline(blocks: Sequence[pb.Block]) -> list[bytes]:
        out = []
        for b in blocks:
            if b.WhichOneof("payload") != "data":
                raise InvalidRequestError(
                    f"block {b.sequence_hash:#x} has no inline data (a NIXL span needs the request's region)"
                )
            out.append(b.data)
        return out

    def _staging(self) -> Any:
        if self.staging is None:
            raise NixlUnavailableError("this server does not serve the NIXL data path")
        return self.staging

    def _region(self, r: pb.RemoteRegion) -> Any:
        from kvbm_codec.transport.nixl import RemoteRegion

        # A client's region names the client's agent. Naming the server's own agent would make the
        # transport treat it as loopback into the server's registrations, whose spans are checked only
        # against the size the caller declares: it could read or overwrite other requests' staging
        # slots. No client is the server, so refuse it outright.
        own = getattr(getattr(self.staging, "agent", None), "name", None)
        if own is not None and r.agent_name == own:
            raise InvalidRequestError("NIXL region names this server's own agent; name the client's agent")
        try:
            return RemoteRegion(
                r.agent_name, r.agent_metadata, r.addr, r.nbytes, r.dev_id, r.mem_type or "DRAM"
            )
        except ValueError as e:
            raise InvalidRequestError(f"bad NIXL region: {e}") from e

    def _nixl_read(self, m: ServedModel, request: pb.PutBlocksRequest, deadline: _Deadline) -> list[bytes]:
        staging = self._staging()
        remote = self._region(request.region)
        spans: list[tuple[int, int]] = []
        for b in request.blocks:
            if b.WhichOneof("payload") != "nixl":
                raise InvalidRequestError(f"block {b.sequence_hash:#x}: a NIXL put carries spans, not data")
            n = b.nixl.nbytes or m.spec.nbytes
            if b.encoding != pb.ENCODING_FRAME and n != m.spec.nbytes:
                raise InvalidRequestError(
                    f"block {b.sequence_hash:#x}: span of {n} bytes, a raw block is {m.spec.nbytes}"
                )
            spans.append((b.nixl.offset, n))
        out: list[bytes] = []
        with staging.slot() as slot:
            for idx in staging.chunks([n for _, n in spans], slot):
                deadline.check("NIXL read")
                try:
                    out += staging.read(remote, [spans[i] for i in idx], slot)
                except ServiceError:
                    raise
                except Exception as e:
                    raise _nixl_error(e) from e
        return out

    # ---- gets ------------------------------------------------------------------------------------

    def GetBlocks(
        self, request: pb.GetBlocksRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetBlocksResponse | bytes]:
        # A generator cannot return through _run (streaming is what avoids collecting every message
        # first); the core's get_stream keeps the request admitted until the last batch is sent.
        t0 = time.perf_counter()
        try:
            tenant = self._tenant(context)
            deadline = _Deadline.of(context, self.cfg.request_timeout_s, self.cfg.max_deadline_s)
            deadline.check("get")
            timer = deadline.enforce(context)
            try:
                yield from self._get(tenant, request, deadline)
            finally:
                timer.cancel()
        except ServiceError as e:
            self._log_refusal("get", e, t0)
            abort(context, e)
        except Exception as e:
            log.exception("unhandled error", extra=fields(method="get", error=type(e).__name__))
            context.set_trailing_metadata(((ERROR_CODE_KEY, "internal"),))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")

    def _get_bytes(self, request: pb.GetBlocksRequest) -> int:
        """Bytes a get holds at once, for per-tenant byte admission: its raw blocks, but never more
        than two messages (a stream sends one while it decodes the next); 0 for a model not served
        here, which ``_get`` then refuses by name."""
        try:
            nbytes = self.svc.model(request.model).spec.nbytes
        except ServiceError:
            return 0
        held = 2 if self.svc.limits.get_prefetch else 1
        return min(nbytes * len(request.sequence_hashes), held * self.cfg.max_message_bytes)

    def _get(
        self, tenant: str, request: pb.GetBlocksRequest, deadline: _Deadline
    ) -> Iterator[pb.GetBlocksResponse | bytes]:
        hashes = list(request.sequence_hashes)
        as_frames = request.encoding == pb.ENCODING_FRAME
        if request.encoding not in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW, pb.ENCODING_FRAME):
            raise InvalidRequestError(f"unknown encoding {request.encoding}")
        nixl = request.HasField("region")
        remote = None
        if nixl:
            if as_frames:
                raise InvalidRequestError("NIXL gets return raw blocks; ask for frames over the gRPC path")
            if len(request.nixl_offsets) != len(hashes):
                raise InvalidRequestError(
                    f"{len(request.nixl_offsets)} nixl_offsets for {len(hashes)} hashes; need one per hash"
                )
            remote = self._region(request.region)

        def batch_size(m: ServedModel) -> int:
            self._dtype(m, request.dtype)  # called once admitted, with the served model
            # one streamed message must fit max_message_bytes: a raw block is spec.nbytes (+ positions
            # and framing), so cap the batch instead of failing mid-stream with no error trailer
            per_block = m.spec.nbytes + 16 * m.spec.page_size + 64
            want = request.batch_size or self.cfg.get_batch_size
            return max(1, min(want, (self.cfg.max_message_bytes - 1024) // per_block))

        encoding = pb.ENCODING_FRAME if as_frames else pb.ENCODING_RAW
        with contextlib.ExitStack() as stack:
            slots: list[Any] = []

            def before_batch() -> None:  # inside the admission: a staging refusal counts like others
                deadline.check("decoding")
                if nixl and not slots:
                    slots.append(stack.enter_context(self._staging().slot()))

            def send(start: int, got: list[GetResult]) -> pb.GetBlocksResponse | bytes:
                moved = sum(len(g.data) for g in got if g.data is not None)
                out: pb.GetBlocksResponse | bytes
                if nixl:
                    offsets = list(request.nixl_offsets[start : start + len(got)])
                    out = pb.GetBlocksResponse(
                        blocks=self._nixl_write(remote, got, offsets, slots[0], deadline)
                    )
                else:  # the blocks' data is joined into the wire bytes once (get_response.py)
                    out = encode_get_response((self._result(g, encoding), g.data) for g in got)
                self.svc.metrics.transfer_bytes.labels(path="nixl" if nixl else "grpc", direction="out").inc(
                    moved
                )
                return out

            yield from self.svc.get_stream(
                tenant,
                request.model,
                hashes,
                send,
                batch_size=batch_size,
                as_frames=as_frames,
                before_batch=before_batch,
                nbytes=self._get_bytes(request),
            )

    @staticmethod
    def _status(g: GetResult) -> int:
        return {"hit": pb.BLOCK_STATUS_HIT, "miss": pb.BLOCK_STATUS_MISS}.get(
            g.status, pb.BLOCK_STATUS_CORRUPT
        )

    def _result(self, g: GetResult, encoding: int) -> pb.BlockResult:
        """The result's fields but its data, which encode_get_response appends."""
        r = pb.BlockResult(sequence_hash=g.sequence_hash, status=self._status(g))
        if g.data is not None:
            r.encoding = encoding
            r.positions.extend(g.positions)
        return r

    def _nixl_write(
        self, remote: Any, got: list[GetResult], offsets: list[int], slot: Any, deadline: _Deadline
    ) -> list[pb.BlockResult]:
        staging = self.staging
        hits = [(i, g) for i, g in enumerate(got) if g.data is not None]
        for idx in staging.chunks([len(g.data) for _, g in hits], slot):
            deadline.check("NIXL write")
            try:
                staging.write(remote, [(offsets[hits[j][0]], hits[j][1].data) for j in idx], slot)
            except ServiceError:
                raise
            except Exception as e:
                raise _nixl_error(e) from e
        out = []
        for i, g in enumerate(got):
            r = pb.BlockResult(sequence_hash=g.sequence_hash, status=self._status(g))
            if g.data is not None:
                r.encoding = pb.ENCODING_RAW
                r.positions.extend(g.positions)
                r.nixl.offset = offsets[i]
                r.nixl.nbytes = len(g.data)
            out.append(r)
        return out

    # ---- metadata calls -------------------------------------------------------------------------

    def Contains(self, request: pb.HashesRequest, context: grpc.ServicerContext) -> pb.ContainsResponse:
        def run(tenant: str, _d: _Deadline) -> pb.ContainsResponse:
            present = self.svc.contains(tenant, request.model, list(request.sequence_hashes))
            return pb.ContainsResponse(present=present)

        return self._run("contains", context, run)

    def Lookup(self, request: pb.HashesRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        def run(tenant: str, _d: _Deadline) -> pb.LookupResponse:
            found = self.svc.lookup(tenant, request.model, list(request.sequence_hashes))
            return pb.LookupResponse(entries=[self._entry(r) for r in found])

        return self._run("lookup", context, run)

    @staticmethod
    def _entry(r: LookupResult) -> pb.LookupEntry:
        e = pb.LookupEntry(sequence_hash=r.sequence_hash, raw_bytes=r.raw_bytes)
        if r.stored:
            e.stored = True
            e.stored_bytes = r.stored_bytes
            e.calibration_id = r.calibration_id
            e.positions.extend(r.positions)
            e.layers.start, e.layers.end = r.layers
        return e

    def Delete(self, request: pb.HashesRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        def run(tenant: str, _d: _Deadline) -> pb.DeleteResponse:
            return pb.DeleteResponse(
                deleted=self.svc.delete(tenant, request.model, list(request.sequence_hashes))
            )

        return self._run("delete", context, run)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        def run(tenant: str, _d: _Deadline) -> pb.StatsResponse:
            models = [
                pb.ModelInfo(
                    name=m.name,
                    fingerprint=m.fingerprint,
                    calibration_id=m.calibration.calibration_id,
                    target_cr=m.target_cr,
                    n_layers=m.spec.n_layers,
                    page_size=m.spec.page_size,
                    n_kv_heads=m.spec.n_kv_heads,
                    head_dim=m.spec.head_dim,
                    dtype=m.spec.dtype,
                    block_bytes=m.spec.nbytes,
                )
                for m in self.svc.models()
            ]
            tiers = [
                pb.TierInfo(
                    name=s.name,
                    used_bytes=s.used_bytes,
                    capacity_bytes=s.capacity_bytes,
                    blocks=s.blocks,
                    evictions=s.evictions,
                )
                for s in self.svc.tier_stats(tenant)
            ]
            return pb.StatsResponse(
                models=models,
                tiers=tiers,
                max_inflight_requests=self.svc.limits.max_inflight_requests,
                max_blocks_per_request=self.svc.limits.max_blocks_per_request,
                max_message_bytes=self.cfg.max_message_bytes,
                nixl_enabled=self.staging is not None,
                version=__version__,
            )

        return self._run("stats", context, run)


class CodecServer:
    """The gRPC server, health and reflection services, metrics endpoint and NIXL staging, as one unit."""

    def __init__(
        self,
        svc: BlockService,
        cfg: ServiceConfig,
        *,
        authenticate: Authenticate | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.svc = svc
        self.cfg = cfg
        self.staging = self._staging() if cfg.nixl.enabled else None
        if credentials is not None and cfg.probes.port is not None:
            from kvbm_codec.service.probes import plaintext_guard  # the loopback probe port is plaintext

            authenticate = plaintext_guard(authenticate or no_auth(cfg.auth.tenant))
        self.servicer = KvbmCodecServicer(svc, cfg, authenticate=authenticate, staging=self.staging)
        self.health = health.HealthServicer()
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        # Admission control (the core's max_inflight_requests) must see a request to refuse it with a
        # code and retry hint, so there are more handler threads than admitted requests: the spare
        # ones answer refusals and health checks at once. Beyond that, gRPC's own cap bounds the queue
        # (its refusal carries no trailers; the client maps it to `overloaded` too).
        threads = max(cfg.workers, cfg.max_inflight_requests + SPARE_HANDLER_THREADS)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads),
            options=opts,
            maximum_concurrent_rpcs=2 * threads,
        )
        add_servicer(self.servicer, self.server, SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        addr = f"{cfg.host}:{cfg.grpc_port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(addr)
        else:
            self.port = self.server.add_secure_port(addr, credentials)
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {addr}")
        # The probes reach the server through this loopback plaintext port (health only under TLS).
        probing = cfg.probes.port is not None
        self.loopback_port = self.server.add_insecure_port("127.0.0.1:0") if probing else 0
        self.probes: Any = None
        svc.metrics.data_path_active.labels(path="grpc").set(1)
        if cfg.nixl.enabled:  # 0 = configured but fell back to gRPC (the nixl library or UCX is missing)
            svc.metrics.data_path_active.labels(path="nixl").set(1 if self.staging is not None else 0)
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.drained: bool | None = None

    def _staging(self) -> Any:
        n = self.cfg.nixl
        try:
            from kvbm_codec.transport.staging import StagingPool

            return StagingPool.create(
                n.agent_name,
                n.staging_bytes,
                n.slot_bytes,
                timeout_s=n.transfer_timeout_s,
                retry_after_s=self.cfg.retry_after_s,
            )
        except Exception as e:  # nixl missing or no UCX: serve the gRPC path only, and say so
            log.warning("NIXL data path disabled", extra=fields(error=f"{type(e).__name__}: {e}"[:300]))
            return None

    def start(self) -> CodecServer:
        if self.cfg.metrics_port is not None:
            from kvbm_codec.service.metrics_http import read_token, start_metrics_server

            tf = self.cfg.metrics_token_file
            refused = self.svc.metrics.auth_failures.labels(
                frontend="metrics", reason="unauthenticated", tenant_class=UNKNOWN_CLASS
            )
            self._metrics_httpd = start_metrics_server(
                self.cfg.metrics_host or self.cfg.host,
                self.cfg.metrics_port,
                self.svc.metrics.registry,
                token=read_token(tf) if tf is not None else None,
                on_refused=refused.inc,
            )
            self.metrics_port = self._metrics_httpd.server_port
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.probes.port is not None:
            from kvbm_codec.service.probes import ProbeServer, Progress

            self.probes = ProbeServer(
                self.cfg.host,
                self.cfg.probes.port,
                f"127.0.0.1:{self.loopback_port}",
                progress=Progress.of_metrics(self.svc.metrics, self.cfg.probes.stuck_after_s),
                check_timeout_s=self.cfg.probes.check_timeout_s,
                set_not_serving=self.set_not_serving,
            ).start()
        log.info(
            "serving",
            extra=fields(
                host=self.cfg.host,
                grpc_port=self.port,
                metrics_port=self.metrics_port,
                models=[m.name for m in self.svc.models()],
                nixl=self.staging is not None,
                workers=self.cfg.workers,
                probes_port=self.probes.port if self.probes is not None else None,
            ),
        )
        return self

    def set_not_serving(self) -> None:
        """Readiness off, admission still open: the preStop step before SIGTERM's drain."""
        log.info("NOT_SERVING on request (preStop); still serving until SIGTERM")
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace_s: float | None = None) -> bool:
        """NOT_SERVING, drain the core, stop gRPC, close store and NIXL; True if every request finished."""
        with self._stop_lock:
            if self._stopped.is_set():
                return bool(self.drained)
            t0 = time.monotonic()
            self.health.enter_graceful_shutdown()
            drained = self.svc.drain(self.cfg.drain_timeout_s)
            grace = self.cfg.drain_timeout_s if grace_s is None else grace_s
            self.server.stop(max(0.0, grace - (time.monotonic() - t0))).wait()
            try:
                self.svc.close()
            finally:
                if self.staging is not None:
                    self.staging.close()
                if self._metrics_httpd is not None:
                    self._metrics_httpd.shutdown()
                    self._metrics_httpd.server_close()
                if self.probes is not None:
                    self.probes.stop()
            self.drained = drained
            self._stopped.set()
            log.info("stopped", extra=fields(drained=drained, seconds=round(time.monotonic() - t0, 3)))
            return drained

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the server gracefully (from a thread: handlers must return quickly)."""

        def handler(signum: int, _frame: object) -> None:
            log.info("signal received; draining", extra=fields(signal=signal.Signals(signum).name))
            threading.Thread(target=self.stop, name="kvbm-codec-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)
