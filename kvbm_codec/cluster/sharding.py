"""Client-side sharding of blocks over service replicas: a consistent hash ring keyed by sequence hash.

Each replica owns the arcs of the ring before its virtual nodes, so adding or removing one replica moves
only the blocks it gains or loses (about 1/N of them), and every client with the same membership routes a
block to the same replica with no coordination. The tier is a cache: a replica that dies takes its
blocks with it, and the client reports them as misses (the engine recomputes), never as errors and never
as another replica's data.

Membership comes from a :class:`Membership` source (``kvbm_codec.cluster.discovery.DynamoDiscovery`` in
production, a fixed map in tests). A replica that fails a call with a transport error (UNAVAILABLE,
connection refused, deadline) is marked dead at once and left off the ring until discovery stops listing
it (its Dynamo lease lapses) or ``dead_retry_s`` passes; puts that failed are re-routed to the new owner.

A request spread over several replicas calls them concurrently (up to ``fanout`` at once), so it takes
as long as its slowest share, not the sum of them. That is also what makes one replica per core a way
to use a node's cores without one process' GIL: on a 2-core VM two 1-core replicas behind this client
served one client's puts at 1.44-1.52x the MB/s of one 2-core process (docs/benchmarks.md, "Session
23"); calling them in turn, the same layout was slower than the one process.
"""

from __future__ import annotations

import bisect
import contextlib
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import xxhash

from kvbm_codec.api.errors import ServiceError, ShuttingDownError
from kvbm_codec.api.types import BlockTransport, GetResult, PutItem, PutResult
from kvbm_codec.service.logging import fields, get_logger

log = get_logger(__name__)
T = TypeVar("T")
DEFAULT_VNODES = 160
MAX_PUT_ROUNDS = 8
DEFAULT_FANOUT = 16
"""Replicas one client calls at once for one request (the rest of a wider request waits for a slot)."""


class NoReplicaError(ServiceError):
    """No live replica is known: nothing can be stored (reads are misses)."""

    code = "no_replica"


def _point(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class HashRing:
    """Consistent hashing with ``vnodes`` virtual nodes per member.

    Keys are re-hashed before lookup: KVBM sequence hashes are already uniform, but a caller's own keys
    (tests, sequential ids) may not be.
    """

    def __init__(self, nodes: Iterable[str] = (), vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes <= 0:
            raise ValueError("vnodes must be positive")
        self.vnodes = vnodes
        self._nodes: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []
        for n in nodes:
            self.add(n)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def _rebuild(self) -> None:
        pts = sorted((_point(f"{n}#{i}".encode()), n) for n in self._nodes for i in range(self.vnodes))
        self._points = [p for p, _ in pts]
        self._owners = [n for _, n in pts]

    def add(self, node: str) -> None:
        if node not in self._nodes:
            self._nodes.add(node)
            self._rebuild()

    def remove(self, node: str) -> None:
        if node in self._nodes:
            self._nodes.discard(node)
            self._rebuild()

    def set_nodes(self, nodes: Iterable[str]) -> bool:
        """Replace the membership; True if it changed."""
        new = set(nodes)
        if new == self._nodes:
            return False
        self._nodes = new
        self._rebuild()
        return True

    def owner(self, key: int) -> str:
        if not self._points:
            raise NoReplicaError("the ring is empty: no live replica")
        h = _point(struct.pack("<Q", key % 2**64))
        i = bisect.bisect_right(self._points, h)
        return self._owners[i % len(self._owners)]


class Membership(Protocol):
    """Live replicas: key -> something with a ``grpc_target`` (e.g. discovery's ``Member``)."""

    def members(self) -> Mapping[str, Any]: ...


class StaticMembership:
    """A fixed set of replicas (no discovery): ``{key: grpc_target}``."""

    def __init__(self, targets: Mapping[str, str]) -> None:
        self.targets = dict(targets)

    def members(self) -> dict[str, str]:
        return dict(self.targets)


def is_replica_failure(e: BaseException) -> bool:
    """Errors that mean "this replica is gone", as opposed to refusals a live replica made on purpose
    (overload, bad input), which are the caller's to see."""
    if isinstance(e, ShuttingDownError | ConnectionError):
        return True
    status = getattr(e, "status", None)
    if status is None and callable(getattr(e, "code", None)):  # a raw grpc.RpcError
        try:
            status = e.code()  # type: ignore[attr-defined]
        except Exception:
            return False
    return getattr(status, "name", None) in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


class ShardedClient:
    """A :class:`BlockTransport` over many replicas: each block goes to its ring owner.

    ``connect(key, member)`` makes the transport for one replica (e.g. a ``CodecClient`` with the
    tenant and model bound); transports are cached per replica and closed when it leaves.
    """

    def __init__(
        self,
        membership: Membership,
        connect: Callable[[str, Any], BlockTransport],
        *,
        vnodes: int = DEFAULT_VNODES,
        refresh_interval_s: float = 5.0,
        dead_retry_s: float = 30.0,
        failure: Callable[[BaseException], bool] = is_replica_failure,
        fanout: int = DEFAULT_FANOUT,
    ) -> None:
        if fanout < 1:
            raise ValueError(f"fanout must be at least 1, got {fanout}")
        self.membership = membership
        self.fanout = fanout
        self._pool: ThreadPoolExecutor | None = None  # started by the first request that spans replicas
        self.connect = connect
        self.refresh_interval_s = refresh_interval_s
        self.dead_retry_s = dead_retry_s
        self.failure = failure
        self.ring = HashRing(vnodes=vnodes)
        self._members: dict[str, Any] = {}
        self._transports: dict[str, BlockTransport] = {}
        self._dead: dict[str, float] = {}  # key -> monotonic time it was marked dead
        self._refreshed = -float("inf")
        self._lock = threading.RLock()
        self.failovers = 0

    # ---- membership -----------------------------------------------------------------------------

    def refresh(self) -> frozenset[str]:
        """Re-read membership now; returns the live replicas on the ring."""
        found = dict(self.membership.members())
        now = time.monotonic()
        with self._lock:
            for k in list(self._dead):
                if k not in found or now - self._dead[k] > self.dead_retry_s:
                    del self._dead[k]
            live = {k: m for k, m in found.items() if k not in self._dead}
            for k in set(self._transports) - set(live):
                self._close(k)
            self._members = live
            if self.ring.set_nodes(live):
                log.info("replica set changed", extra=fields(replicas=sorted(live)))
            self._refreshed = now
            return self.ring.nodes

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._refreshed >= self.refresh_interval_s or not len(self.ring):
            self.refresh()

    def mark_dead(self, key: str, error: BaseException | None = None) -> None:
        with self._lock:
            self._dead[key] = time.monotonic()
            self._close(key)
            self.ring.remove(key)
            self._members.pop(key, None)
        self.failovers += 1
        log.warning("replica marked dead", extra=fields(replica=key, error=str(error)[:200]))
        self.refresh()

    def _close(self, key: str) -> None:
        t = self._transports.pop(key, None)
        close = getattr(t, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    def _transport(self, key: str) -> BlockTransport:
        with self._lock:
            t = self._transports.get(key)
            if t is None:
                t = self.connect(key, self._members[key])
                self._transports[key] = t
            return t

    @property
    def replicas(self) -> frozenset[str]:
        return self.ring.nodes

    def owner(self, sequence_hash: int) -> str:
        self._maybe_refresh()
        with self._lock:
            return self.ring.owner(sequence_hash)

    def _group(self, keys: Sequence[int]) -> dict[str, list[int]]:
        """Request indices by owning replica (raises NoReplicaError on an empty ring)."""
        self._maybe_refresh()
        groups: dict[str, list[int]] = {}
        with self._lock:
            for i, h in enumerate(keys):
                groups.setdefault(self.ring.owner(h), []).append(i)
        return groups

    def _on_replica(self, key: str, fn: Callable[[BlockTransport], T]) -> tuple[bool, T | None]:
        """(ok, result); a replica failure marks it dead and returns (False, None)."""
        try:
            return True, fn(self._transport(key))
        except Exception as e:
            if not self.failure(e):
                raise
            self.mark_dead(key, e)
            return False, None

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.fanout - 1, thread_name_prefix="kvbm-codec-shard")
            return self._pool

    def _each(
        self, groups: Mapping[str, list[int]], call: Callable[[BlockTransport, list[int]], T]
    ) -> list[tuple[list[int], bool, T | None]]:
        """``call(transport, indices)`` on every owning replica, concurrently: the first share on this
        thread, the others on the client's pool. Returns (indices, ok, result) in ``groups``' order;
        every share has finished when it returns or raises (the first error that is not a replica
        failure, in that order, is raised after the rest are done)."""
        shares = list(groups.items())
        if len(shares) == 1 or self.fanout == 1:
            return [(idx, *self._on_replica(key, lambda t, idx=idx: call(t, idx))) for key, idx in shares]
        pool = self._executor()
        futures: list[Future[tuple[bool, T | None]]] = [
            pool.submit(self._on_replica, key, lambda t, idx=idx: call(t, idx)) for key, idx in shares[1:]
        ]
        outcomes: list[tuple[bool, T | None] | BaseException] = []
        key, idx = shares[0]
        try:
            outcomes.append(self._on_replica(key, lambda t: call(t, idx)))
        except BaseException as e:  # the other shares still finish before it is raised
            outcomes.append(e)
        for f in futures:
            try:
                outcomes.append(f.result())
            except BaseException as e:
                outcomes.append(e)
        out = []
        for (_, share), got in zip(shares, outcomes, strict=True):
            if isinstance(got, BaseException):
                raise got
            out.append((share, *got))
        return out

    def on_each_replica(self, fn: Callable[[Any], T]) -> dict[str, T]:
        """``fn(transport)`` on every live replica at once, connecting those not yet connected: what a
        caller checks or prepares once per replica (the vLLM tier: each one's block spec, NIXL support
        and staging registration). A replica that fails as gone is marked dead and left out."""
        self._maybe_refresh()
        with self._lock:
            groups: dict[str, list[int]] = {key: [] for key in sorted(self._members)}
        if not groups:
            return {}
        done = self._each(groups, lambda t, _idx: fn(t))
        return {key: res for key, (_, ok, res) in zip(groups, done, strict=True) if ok}  # type: ignore[misc]

    def agreed(self, fn: Callable[[Any], T], what: str) -> T:
        """The value ``fn(transport)`` every reachable replica gives (e.g. its block spec): replicas
        that disagree would store one caller's blocks in two ways, so that raises ValueError naming
        them. A replica down now is left out and not checked when it returns (a deployment gives
        every replica one config). ConnectionError when none answers."""
        got = self.on_each_replica(fn)
        if not got:
            raise ConnectionError(f"none of the replicas {sorted(self.membership.members())} answers")
        (first, value), *rest = sorted(got.items())
        for key, other in rest:
            if other != value:
                raise ValueError(f"replicas disagree on {what}: {first} has {value}, {key} has {other}")
        return value

    # ---- BlockTransport -------------------------------------------------------------------------

    def _put_rounds(
        self, keys: Sequence[int], call: Callable[[Any, list[int]], list[PutResult]]
    ) -> list[PutResult]:
        """``call(transport, indices)`` stores the blocks at ``indices`` on that replica; blocks whose
        owner died are re-routed once the ring has changed. Bounded: every retry round removes at
        least one replica, and there are at most MAX_PUT_ROUNDS."""
        results: dict[int, PutResult] = {}
        pending = list(range(len(keys)))
        for _round in range(MAX_PUT_ROUNDS):
            if not pending:
                break
            try:
                groups = self._group([keys[i] for i in pending])
            except NoReplicaError:
                raise NoReplicaError(f"{len(pending)} blocks not stored: no live replica") from None
            shares = {key: [pending[j] for j in idx] for key, idx in groups.items()}
            failed: list[int] = []
            for sub, ok, res in self._each(shares, call):
                if ok and res is not None:
                    results.update(zip(sub, res, strict=True))
                else:
                    failed += sub
            pending = failed
        if pending:
            raise NoReplicaError(f"{len(pending)} blocks not stored: replicas kept failing")
        return [results[i] for i in range(len(keys))]

    def _get_shares(
        self, hashes: Sequence[int], call: Callable[[Any, list[int]], list[GetResult]]
    ) -> list[GetResult]:
        """``call(transport, indices)`` reads the blocks at ``indices`` from that replica; a dead owner's
        blocks are misses (they died with it)."""
        out: list[GetResult | None] = [None] * len(hashes)
        try:
            groups = self._group(hashes)
        except NoReplicaError:
            return [GetResult(h, "miss") for h in hashes]
        for idx, ok, res in self._each(groups, call):
            for j, i in enumerate(idx):
                out[i] = res[j] if ok and res is not None else GetResult(hashes[i], "miss")
        return [r if r is not None else GetResult(h, "miss") for r, h in zip(out, hashes, strict=True)]

    def put_blocks(self, items: Sequence[PutItem]) -> list[PutResult]:
        """Each block to its owner; blocks whose owner died are re-routed once the ring has changed."""
        return self._put_rounds(
            [it.sequence_hash for it in items], lambda t, sub: t.put_blocks([items[i] for i in sub])
        )

    def get_blocks(self, hashes: Sequence[int], *, views: bool = False) -> list[GetResult]:
        """Hits from live owners; a dead owner's blocks are misses (they died with it)."""
        return self._get_shares(hashes, lambda t, idx: t.get_blocks([hashes[i] for i in idx], views=views))

    # ---- block data over NIXL (replicas that are CodecClients) ----------------------------------

    def put_blocks_staged(
        self,
        registration: Callable[[Any], Any],
        items: Sequence[tuple[int, int, int]],
        *,
        keep_exact: bool = False,
    ) -> list[PutResult]:
        """``CodecClient.put_blocks_nixl`` spread over the owners: each replica READs its blocks out of
        the caller's one buffer. Every replica's client has its own NIXL agent, so
        ``registration(transport)`` gives the buffer registered with that transport's agent (the caller
        owns and closes those). ``items``: (sequence_hash, first_position, byte offset in the buffer)."""
        return self._put_rounds(
            [it[0] for it in items],
            lambda t, sub: t.put_blocks_nixl(registration(t), [items[i] for i in sub], keep_exact=keep_exact),
        )

    def get_blocks_staged(
        self, registration: Callable[[Any], Any], hashes: Sequence[int], offsets: Sequence[int]
    ) -> list[GetResult]:
        """``CodecClient.get_blocks_nixl`` spread over the owners, each WRITing its hits into the
        caller's buffer at ``offsets`` (one per hash); a dead owner's blocks are misses."""
        if len(offsets) != len(hashes):
            raise ValueError("one offset per hash")
        return self._get_shares(
            hashes,
            lambda t, idx: t.get_blocks_nixl(
                registration(t), [hashes[i] for i in idx], [offsets[i] for i in idx]
            ),
        )

    def contains(self, hashes: Sequence[int]) -> list[bool]:
        out = [False] * len(hashes)
        try:
            groups = self._group(hashes)
        except NoReplicaError:
            return out
        for idx, ok, res in self._each(groups, lambda t, idx: t.contains([hashes[i] for i in idx])):
            if ok and res is not None:
                for j, i in enumerate(idx):
                    out[i] = bool(res[j])
        return out

    def delete(self, hashes: Sequence[int]) -> int:
        try:
            groups = self._group(hashes)
        except NoReplicaError:
            return 0
        shares = self._each(groups, lambda t, idx: t.delete([hashes[i] for i in idx]))
        return sum(int(res or 0) for _, ok, res in shares if ok)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # shares in flight finish before their transports close
        with self._lock:
            for k in list(self._transports):
                self._close(k)
