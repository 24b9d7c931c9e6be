"""Python client of the kvbm-codec gRPC service (bytes path and NIXL path).

Retries: gRPC's built-in retry policy (service config below) replays a call refused with UNAVAILABLE
or RESOURCE_EXHAUSTED, waiting the server's ``grpc-retry-pushback-ms`` hint when it sends one and
not retrying when the hint is negative (refusals that would fail again, e.g. an oversized batch).
Puts are keyed by sequence hash, so a replayed put is harmless.

Errors: a refusal from the server is raised as the same ServiceError subclass the server raised
(``UnknownModelError``, ``OverloadedError`` ...), found by the stable code in trailing metadata, with
``retry_after_s`` and the gRPC ``status`` attached. Failures without a server code (connection,
deadline, gRPC's own message-size limits) raise :class:`RpcFailedError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.api import errors as errs
from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.types import DEFAULT_MODEL, GetResult, PutItem, PutResult
from kvbm_codec.frontends.grpc.get_response import decode_get_response
from kvbm_codec.frontends.grpc.wire import (
    ERROR_CODE_KEY,
    RETRY_AFTER_KEY,
    SERVICE_NAME,
    TENANT_KEY,
    DeadlineError,
    NixlPathError,
    NixlUnavailableError,
)


class RpcFailedError(errs.ServiceError):
    """A call failed without a kvbm-codec error code (transport, deadline, gRPC limits)."""

    code = "rpc_failed"


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_BY_CODE: dict[str, type[errs.ServiceError]] = {
    c.code: c for c in [*_subclasses(errs.ServiceError), DeadlineError, NixlPathError, NixlUnavailableError]
}


# Blocks per chunk of a streamed put (~3 MB of SmolLM2 blocks): small enough that the server starts
# encoding soon, large enough that per-message costs stay small. The server batches its encodes itself
# (``put_stream_encode_blocks``), so the chunk size does not set the codec's batch.
DEFAULT_STREAM_CHUNK_BLOCKS = 4

GRPC_QUEUE_FULL = "Concurrent RPC limit exceeded"  # grpc/_server.py's refusal text
DEFAULT_OVERLOAD_RETRY_S = 0.05


def translate(e: grpc.RpcError) -> errs.ServiceError:
    """The typed error for a failed call; keeps the gRPC status and the server's retry hint."""
    md = dict(e.trailing_metadata() or ())
    code = md.get(ERROR_CODE_KEY)
    retry_ms = md.get(RETRY_AFTER_KEY)
    retry = float(retry_ms) / 1000 if retry_ms is not None else None
    cls = _BY_CODE.get(code or "", RpcFailedError)
    if (
        code is None
        and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and GRPC_QUEUE_FULL in (e.details() or "")
    ):
        # gRPC's own concurrent-RPC cap refused before the service saw the call: an overload too
        cls, retry = errs.OverloadedError, retry if retry is not None else DEFAULT_OVERLOAD_RETRY_S
    err = cls(e.details() or str(e.code()), retry_after_s=retry)
    err.status = e.code()  # type: ignore[attr-defined]
    if cls is RpcFailedError:
        err.message = f"{e.code().name}: {e.details()}"
    return err


def retry_service_config(max_attempts: int = 4, initial_backoff_s: float = 0.05) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": f"{initial_backoff_s}s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                    },
                }
            ]
        }
    )


@dataclass(frozen=True)
class LookupEntry:
    sequence_hash: int
    stored: bool
    stored_bytes: int
    raw_bytes: int
    positions: tuple[int, ...]
    calibration_id: str


class CodecClient:
    def __init__(
        self,
        target: str,
        *,
        model: str = DEFAULT_MODEL,
        tenant: str | None = None,
        token: str | None = None,
        root_cert: Path | bytes | None = None,
        client_cert: Path | bytes | None = None,
        client_key: Path | bytes | None = None,
        timeout_s: float = 30.0,
        max_message_bytes: int = 64 << 20,
        max_attempts: int = 4,
        batch_blocks: int | None = None,
        dtype: str | None = None,
        stream_chunk_blocks: int = DEFAULT_STREAM_CHUNK_BLOCKS,
    ) -> None:
        if stream_chunk_blocks < 0:
            raise ValueError(f"stream_chunk_blocks must be >= 0 (0: unary only), got {stream_chunk_blocks}")
        # Blocks per PutBlocksStream chunk; a batch of at most this many goes as one unary PutBlocks.
        # 0, or a server without the streaming call (found on the first put), keeps every put unary.
        self.stream_chunk_blocks = stream_chunk_blocks
        self.model = model
        self.dtype = dtype  # element type of the raw blocks this client sends and expects
        self.timeout_s = timeout_s
        self.batch_blocks = batch_blocks
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
            # gRPC only replays a call whose request it still buffers (default 256 KiB: less than one
            # raw block), so buffer a whole put, or puts would never be retried.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.service_config", retry_service_config(max(2, max_attempts))),
        ]
        if root_cert is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_cert),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_cert),
            )
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.KvbmCodecStub(self.channel)
        # GetBlocks as received bytes: get_response reads the blocks' data without protobuf's copies
        self._get_wire = self.channel.unary_stream(
            f"/{SERVICE_NAME}/GetBlocks", request_serializer=pb.GetBlocksRequest.SerializeToString
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)
        md: list[tuple[str, str]] = []
        if tenant is not None:
            md.append((TENANT_KEY, tenant))
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        self.metadata = tuple(md)
        self._spec: BlockSpec | None = None
        self._agent: Any = None

    def bind_dtype(self, dtype: str) -> None:
        """Declare the element type of the blocks this client carries (the KVBM tier client does,
        from its spec); sent with every put and get so the server refuses a mismatch."""
        if self.dtype is not None and self.dtype != dtype:
            raise ValueError(f"client already carries {self.dtype} blocks, not {dtype}")
        self.dtype = dtype

    def close(self) -> None:
        self.channel.close()
        if self._agent is not None:
            self._agent.close()

    def __enter__(self) -> CodecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return fn(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise translate(e) from None

    # ---- discovery -------------------------------------------------------------------------------

    def stats(self) -> pb.StatsResponse:
        return self._call(self.stub.Stats, pb.StatsRequest())

    def spec(self) -> BlockSpec:
        """The served model's block spec, as the server reports it (cached)."""
        if self._spec is None:
            for m in self.stats().models:
                if self.model in (m.name, m.fingerprint):
                    self._spec = BlockSpec(m.n_layers, m.page_size, m.n_kv_heads, m.head_dim, m.dtype)
                    break
            else:
                raise errs.UnknownModelError(f"model {self.model!r} is not served at this target")
        return self._spec

    def health(self, service: str = "") -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN, by the standard gRPC health protocol."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # ---- bytes path ------------------------------------------------------------------------------

    def _batch_size(self) -> int:
        """Blocks per call: the server's per-request limit, and what fits its message size limit."""
        if self.batch_blocks is None:
            st = self.stats()
            block = max((m.block_bytes for m in st.models), default=1)
            by_bytes = max(1, int(st.max_message_bytes * 0.9) // (block + 256))
            self.batch_blocks = max(1, min(st.max_blocks_per_request, by_bytes))
        return self.batch_blocks

    def _batches(self, n: int) -> Iterable[range]:
        size = self._batch_size()
        for start in range(0, n, size):
            yield range(start, min(n, start + size))

    @staticmethod
    def _block_msg(it: PutItem) -> pb.Block:
        b = pb.Block(
            sequence_hash=it.sequence_hash,
            first_position=it.first_position,
            encoding=pb.ENCODING_FRAME if it.is_frame else pb.ENCODING_RAW,
            keep_exact=not it.compress,
        )
        if it.positions is not None:
            b.positions.extend(int(p) for p in it.positions.tolist())
        return b

    def _put_request(self, items: Sequence[PutItem], r: range) -> pb.PutBlocksRequest:
        blocks = []
        for i in r:
            b = self._block_msg(items[i])
            b.data = bytes(items[i].data)
            blocks.append(b)
        return pb.PutBlocksRequest(model=self.model, blocks=blocks, dtype=self.dtype or "")

    def put_blocks(self, items: Sequence[PutItem]) -> list[PutResult]:
        """Store blocks (raw or frames), in batches; each batch is all-or-nothing on the server.

        A batch of more than ``stream_chunk_blocks`` blocks goes as one PutBlocksStream of chunks of
        that many, built and sent while the server encodes the chunks before them (a unary put sends
        the whole batch before the server can start); a server without that call gets unary puts."""
        out: list[PutResult] = []
        for r in self._batches(len(items)):
            resp = None
            k = self.stream_chunk_blocks
            if k and len(r) > k:
                resp = self._put_stream(self._chunks(items, r, k))
            if resp is None:
                resp = self._call(self.stub.PutBlocks, self._put_request(items, r))
            out += [PutResult(x.sequence_hash, x.stored_bytes, x.raw_bytes) for x in resp.results]
        return out

    def _chunks(self, items: Sequence[PutItem], r: range, k: int) -> Iterator[pb.PutBlocksRequest]:
        """The stream's chunks, built as gRPC sends them; the first declares the stream's size."""
        for s in range(0, len(r), k):
            req = self._put_request(items, r[s : s + k])
            if s == 0:
                req.stream_blocks = len(r)
            yield req

    def _put_stream(self, chunks: Iterator[pb.PutBlocksRequest]) -> pb.PutBlocksResponse | None:
        """One streamed put, or None (and unary puts from now on) when the server predates it."""
        try:
            return self.stub.PutBlocksStream(chunks, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED and not dict(e.trailing_metadata() or ()).get(
                ERROR_CODE_KEY
            ):
                self.stream_chunk_blocks = 0  # an older server: nothing was stored, send it unary
                return None
            raise translate(e) from None

    def get_blocks(
        self, hashes: Sequence[int], *, as_frames: bool = False, batch_size: int = 0, views: bool = False
    ) -> list[GetResult]:
        """Blocks (raw, or the stored frames) in request order; misses have ``data=None``. With
        ``views`` each ``data`` is a read-only memoryview into the received message instead of its
        own ``bytes``: a caller that copies the blocks into its own memory anyway saves one copy."""
        out: list[GetResult] = []
        for r in self._batches(len(hashes)):
            req = pb.GetBlocksRequest(
                model=self.model,
                sequence_hashes=[hashes[i] for i in r],
                encoding=pb.ENCODING_FRAME if as_frames else pb.ENCODING_RAW,
                batch_size=batch_size,
                dtype=self.dtype or "",
            )
            try:
                for wire in self._get_wire(req, timeout=self.timeout_s, metadata=self.metadata):
                    out += [
                        _get_result(b, d if d is None or views else bytes(d))
                        for b, d in decode_get_response(wire)
                    ]
            except grpc.RpcError as e:
                raise translate(e) from None
            except DecodeError as e:
                raise RpcFailedError(f"unreadable GetBlocks response: {e}") from None
        return out

    def _hashes(self, method: Any, hashes: Sequence[int]) -> Any:
        return self._call(method, pb.HashesRequest(model=self.model, sequence_hashes=list(hashes)))

    def contains(self, hashes: Sequence[int]) -> list[bool]:
        return list(self._hashes(self.stub.Contains, hashes).present)

    def lookup(self, hashes: Sequence[int]) -> list[LookupEntry]:
        return [
            LookupEntry(
                e.sequence_hash, e.stored, e.stored_bytes, e.raw_bytes, tuple(e.positions), e.calibration_id
            )
            for e in self._hashes(self.stub.Lookup, hashes).entries
        ]

    def delete(self, hashes: Sequence[int]) -> int:
        return int(self._hashes(self.stub.Delete, hashes).deleted)

    # ---- NIXL path -------------------------------------------------------------------------------

    def nixl_agent(self) -> Any:
        """This client's NIXL agent (created on first use; one per client, reused for every call)."""
        if self._agent is None:
            import os
            import uuid

            from kvbm_codec.transport.nixl import NixlAgent

            self._agent = NixlAgent(f"kvbm-codec-client-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return self._agent

    @staticmethod
    def _region_msg(reg: Any) -> pb.RemoteRegion:
        r = reg.remote()
        return pb.RemoteRegion(
            agent_name=r.agent_name,
            agent_metadata=r.agent_metadata,
            addr=r.addr,
            nbytes=r.nbytes,
            dev_id=r.dev_id,
            mem_type=r.mem_type,
        )

    def put_blocks_nixl(
        self, registration: Any, items: Sequence[tuple[int, int, int]], *, keep_exact: bool = False
    ) -> list[PutResult]:
        """Store raw blocks the server READs out of ``registration`` (a Registration of nixl_agent()).

        ``items``: (sequence_hash, first_position, byte offset of the block in the registered tensor).
        """
        spec = self.spec()
        region = self._region_msg(registration)
        out: list[PutResult] = []
        for r in self._batches(len(items)):
            blocks = []
            for i in r:
                h, first, off = items[i]
                b = pb.Block(
                    sequence_hash=h, first_position=first, encoding=pb.ENCODING_RAW, keep_exact=keep_exact
                )
                b.nixl.offset = off
                b.nixl.nbytes = spec.nbytes
                blocks.append(b)
            resp = self._call(
                self.stub.PutBlocks,
                pb.PutBlocksRequest(model=self.model, blocks=blocks, region=region, dtype=self.dtype or ""),
            )
            out += [PutResult(x.sequence_hash, x.stored_bytes, x.raw_bytes) for x in resp.results]
        return out

    def get_blocks_nixl(
        self, registration: Any, hashes: Sequence[int], offsets: Sequence[int], *, batch_size: int = 0
    ) -> list[GetResult]:
        """Restore blocks straight into ``registration`` at ``offsets`` (one per hash); results carry
        status and positions, ``data`` is None (the bytes are in the registered tensor)."""
        if len(offsets) != len(hashes):
            raise ValueError("one offset per hash")
        region = self._region_msg(registration)
        out: list[GetResult] = []
        for r in self._batches(len(hashes)):
            req = pb.GetBlocksRequest(
                model=self.model,
                sequence_hashes=[hashes[i] for i in r],
                encoding=pb.ENCODING_RAW,
                batch_size=batch_size,
                region=region,
                nixl_offsets=[offsets[i] for i in r],
                dtype=self.dtype or "",
            )
            try:
                for msg in self.stub.GetBlocks(req, timeout=self.timeout_s, metadata=self.metadata):
                    out += [_get_result(b, None) for b in msg.blocks]
            except grpc.RpcError as e:
                raise translate(e) from None
        return out


def _get_result(b: pb.BlockResult, data: bytes | memoryview | None) -> GetResult:
    status = {pb.BLOCK_STATUS_HIT: "hit", pb.BLOCK_STATUS_MISS: "miss"}.get(b.status, "corrupt")
    return GetResult(b.sequence_hash, status, data, tuple(b.positions))


def _pem(v: Path | bytes | None) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    return Path(v).read_bytes()
