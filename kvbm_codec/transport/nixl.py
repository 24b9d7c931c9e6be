"""Bulk KV bytes over NIXL: the client registers its block memory, the service READs / WRITEs it directly.

gRPC carries only the small things (a :class:`RemoteRegion`: the client's NIXL agent metadata, the base
address and size of a registered buffer, and per block the offsets and lengths); the block bytes move
one-sided through a NIXL agent with the UCX backend, so the service never copies KV through protobuf.

Facts about nixl 1.3.2 (the pinned version) this module is built on, checked on the development box:

* **Thread safety.** The Python wrapper creates its agent with ``NIXL_THREAD_SYNC_NONE`` unless the
  listener thread is on, and in that mode nixl's internal lock is a no-op. The gRPC server calls from a
  thread pool, so every call into the agent is serialized here with one lock. Polling takes the lock
  only for the duration of one ``check_xfer_state``; concurrent transfers progress side by side.
* **Remote agents.** A second ``add_remote_agent`` for a known name merges into what was loaded
  (checked: regions from both loads stay reachable), so a peer that deregistered memory or restarted
  would keep its stale regions and connection info. A peer whose metadata changed is therefore
  removed and loaded again, once its transfers in flight have finished. Metadata changes whenever
  the peer registers or deregisters memory, so clients should register their block pool once.
* **Metadata names its agent.** The name a client claims in :class:`RemoteRegion` is checked against
  the name ``add_remote_agent`` reports; a mismatch is refused and the wrongly named agent dropped.
* **Bounds.** nixl refuses (``NIXL_ERR_NOT_FOUND``) a descriptor not wholly inside one registered
  region, but any registered region will do: a span sized for another buffer would land in it. The
  service holds many registrations (one staging buffer per request), so every span is checked here
  against the one local :class:`Registration` and the one :class:`RemoteRegion` named in the call.
* **Progress.** The target of a READ / WRITE must make progress: UCX sets the connection up with
  active messages (over ``tcp`` on ``lo`` here) and its ``tcp`` transport needs the target for every
  transfer. With no progress thread on the target an in-process READ never completed. The bytes of
  a READ between agents on one host move by ``cma`` zero-copy (``UCX_PROTO_INFO=y``). nixl's
  wrapper runs the progress thread with no pause between polls, ~16% of a core per idle agent; this
  module pauses it 1 ms (``progress_delay_us``), ~1.6%, which on the loaded 2-core box was also
  faster than spinning (``bench/nixl_loopback.py --progress-delay-us 0``).
* **Timeouts.** A READ over ``tcp`` from a peer that is stopped (SIGSTOP) stays in progress until
  the deadline; releasing the in-progress handle cancels it (``release_xfer_handle`` succeeded in
  that state with UCX), after which the agent and the peer work normally.

UCX environment: none is needed on one host. Where ``process_vm_readv`` (cma) is unavailable (some
containers restrict it), ``UCX_TLS=tcp,self UCX_NET_DEVICES=lo`` keeps NIXL working over 127.0.0.1
(the timeout test and the bench's tcp row use it). UCX reads these when an agent is created, so set
them before constructing :class:`NixlAgent`; limiting one side of a pair is enough.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MEM_TYPES = ("DRAM", "VRAM")
_MAX_REGION_BYTES = 1 << 62  # keeps addr + offset arithmetic inside int64 / uint64 with room to spare


class NixlError(Exception):
    """Base of transport errors; a front end maps each subclass to its protocol's status."""


class NixlTransferError(NixlError):
    """nixl refused or failed a transfer (or loading a peer's metadata); carries the peer's name."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"NIXL peer {peer!r}: {message}")
        self.peer = peer


class NixlTimeoutError(NixlTransferError):
    """A transfer did not finish by its deadline; its handle was released (the transfer cancelled)."""


class NixlClosedError(NixlError):
    """The agent or registration was closed; no transfer was started."""


@dataclass(frozen=True)
class RemoteRegion:
    """What a client sends over gRPC so the service can reach one of its registered buffers.

    Every field is client-controlled, so construction validates it; a bad value is a ``ValueError``.
    """

    agent_name: str
    agent_metadata: bytes
    addr: int
    nbytes: int
    dev_id: int = 0
    mem_type: str = "DRAM"

    def __post_init__(self) -> None:
        if not isinstance(self.agent_name, str) or not self.agent_name:
            raise ValueError("RemoteRegion.agent_name must be a non-empty string")
        if not isinstance(self.agent_metadata, bytes) or not self.agent_metadata:
            raise ValueError("RemoteRegion.agent_metadata must be non-empty bytes")
        for name in ("addr", "nbytes", "dev_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RemoteRegion.{name} must be a non-negative int, got {value!r}")
        if self.addr == 0:
            raise ValueError("RemoteRegion.addr must not be 0")
        if not 0 < self.nbytes <= _MAX_REGION_BYTES or self.addr + self.nbytes > 1 << 64:
            raise ValueError(f"RemoteRegion.nbytes {self.nbytes} out of range at addr {self.addr:#x}")
        if self.mem_type not in MEM_TYPES:
            raise ValueError(f"RemoteRegion.mem_type must be one of {MEM_TYPES}, got {self.mem_type!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemoteRegion:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown RemoteRegion fields: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:  # a required field missing
            raise ValueError(f"bad RemoteRegion: {e}") from e


class Registration:
    """One tensor registered with a :class:`NixlAgent`; deregistered by ``close()`` or ``with``.

    Holds a reference to the tensor so its memory outlives the registration.
    """

    def __init__(self, agent: NixlAgent, tensor: torch.Tensor, descs: Any) -> None:
        self.agent = agent
        self.tensor = tensor
        self.addr = tensor.data_ptr()
        self.nbytes = tensor.numel() * tensor.element_size()
        self.mem_type = "DRAM" if tensor.device.type == "cpu" else "VRAM"
        self.dev_id = 0 if tensor.device.type == "cpu" else int(tensor.device.index or 0)
        self._descs = descs
        self._inflight = 0
        self.closed = False

    def remote(self) -> RemoteRegion:
        """The region as a peer must name it: includes the agent's current metadata."""
        if self.closed:
            raise NixlClosedError("registration is closed")
        return RemoteRegion(
            agent_name=self.agent.name,
            agent_metadata=self.agent.metadata(),
            addr=self.addr,
            nbytes=self.nbytes,
            dev_id=self.dev_id,
            mem_type=self.mem_type,
        )

    def close(self) -> None:
        self.agent._deregister(self)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Registration({self.agent.name}, {self.mem_type}:{self.addr:#x}+{self.nbytes}, {state})"


@dataclass
class _Peer:
    digest: bytes  # of the metadata loaded for it
    inflight: int = 0  # transfers using it now
    pending: int = 0  # callers waiting to replace its metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _digest(metadata: bytes) -> bytes:
    return hashlib.blake2b(metadata, digest_size=16).digest()


def _new_nixl_agent(name: str, backends: tuple[str, ...], progress_delay_us: int | None) -> Any:
    """A nixl agent whose progress thread does not spin.

    The Python wrapper hard-codes a progress-thread delay of 0: measured here, each idle agent then
    burns ~16% of a core, which a service that lives for days (and a 2-core CI box) cannot afford;
    with 1000 us it is ~1.6%. So the wrapper is built without backends, its C++ agent replaced by one
    configured through nixl's own bindings, and the backends created afterwards. The initiator drives
    its own transfers by polling; the thread serves the target side of transports that need the
    target's progress (UCX self and tcp), and notifications.
    """
    import nixl._api as api

    if progress_delay_us is not None and progress_delay_us < 0:
        raise ValueError("progress_delay_us must be >= 0 or None")
    wrapper = api.nixl_agent(name, api.nixl_agent_config(backends=[], enable_prog_thread=False))
    if progress_delay_us is not None:
        cfg = api.nixlBind.nixlAgentConfig()
        cfg.useProgThread = True
        cfg.useListenThread = False
        cfg.listenPort = api.DEFAULT_COMM_PORT
        cfg.syncMode = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE.value
        cfg.pthrDelay = progress_delay_us
        cfg.lthrDelay = 100000
        cfg.captureTelemetry = False
        wrapper.agent = api.nixlBind.nixlAgent(name, cfg)
    for backend in backends:
        if backend not in wrapper.plugin_list:
            raise NixlError(f"nixl backend {backend!r} not available (plugins: {wrapper.plugin_list})")
        try:
            wrapper.create_backend(backend, {})
        except Exception as e:
            raise NixlError(f"creating nixl backend {backend!r} failed: {e}") from e
    return wrapper


class NixlAgent:
    """One per process. Registers local tensors and moves bytes to and from peers' registered regions.

    ``max_peers`` bounds the remote agents kept loaded (LRU; a peer with transfers in flight is never
    evicted, so the cache may exceed the bound while all of them are busy). ``max_spans`` bounds one
    transfer's descriptor count, since it comes from a client. ``progress_delay_us`` is the nixl
    progress thread's pause between polls; None runs no progress thread, which only an agent that
    is never the target of a transfer over UCX self or tcp can afford (see :func:`_new_nixl_agent`).
    """

    def __init__(
        self,
        name: str,
        *,
        backends: tuple[str, ...] = ("UCX",),
        max_peers: int = 64,
        max_spans: int = 1 << 16,
        drain_timeout_s: float = 10.0,
        progress_delay_us: int | None = 1000,
    ) -> None:
        if not name:
            raise ValueError("agent name must be non-empty")
        if max_peers < 1 or max_spans < 1:
            raise ValueError("max_peers and max_spans must be >= 1")
        self.name = name
        self.max_peers = max_peers
        self.max_spans = max_spans
        self.drain_timeout_s = drain_timeout_s
        self._nixl = _new_nixl_agent(name, backends, progress_delay_us)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._regs: dict[int, Registration] = {}
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait (bounded) for transfers in flight, then deregister everything and drop every peer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            # Every transfer holds a local registration, loopback ones included. A transfer ends by its
            # own deadline, so with drain_timeout_s >= the transfers' timeout_s this wait is enough.
            idle = lambda: not any(r._inflight for r in self._regs.values())  # noqa: E731
            if not self._cond.wait_for(idle, timeout=self.drain_timeout_s):
                log.warning("nixl agent %s closing with transfers still in flight", self.name)
            for peer in list(self._peers):
                self._remove_peer_locked(peer)
            for reg in list(self._regs.values()):
                self._deregister_locked(reg)
            self._nixl = None  # the C++ agent is destroyed with its last reference

    def __enter__(self) -> NixlAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def metadata(self) -> bytes:
        """This agent's metadata blob: connection info plus every registered region."""
        with self._lock:
            return self._live().get_agent_metadata()

    def _live(self) -> Any:
        if self._closed or self._nixl is None:
            raise NixlClosedError(f"nixl agent {self.name!r} is closed")
        return self._nixl

    # -- registrations ----------------------------------------------------------------------------

    def register(self, tensor: torch.Tensor) -> Registration:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_contiguous() or tensor.numel() == 0:
            raise ValueError("only non-empty contiguous tensors can be registered")
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {tensor.device}")
        with self._lock:
            agent = self._live()
            reg = Registration(self, tensor, None)
            try:
                descs = agent.get_reg_descs([(reg.addr, reg.nbytes, reg.dev_id, "")], reg.mem_type)
                reg._descs = agent.register_memory(descs)
            except Exception as e:
                raise NixlError(f"register_memory failed for {reg!r}: {e}") from e
            self._regs[id(reg)] = reg
            return reg

    def _deregister(self, reg: Registration) -> None:
        with self._cond:
            if reg.closed:
                return
            if not self._cond.wait_for(lambda: reg._inflight == 0, timeout=self.drain_timeout_s):
                raise NixlError(f"{reg!r} still has transfers in flight after {self.drain_timeout_s}s")
            self._deregister_locked(reg)

    def _deregister_locked(self, reg: Registration) -> None:
        reg.closed = True
        self._regs.pop(id(reg), None)
        if self._nixl is not None:
            try:
                self._nixl.deregister_memory(reg._descs)
            except Exception:
                log.exception("deregister_memory failed for %r", reg)

    # -- peers ------------------------------------------------------------------------------------

    def _remove_peer_locked(self, name: str) -> None:
        self._peers.pop(name, None)
        try:
            self._nixl.remove_remote_agent(name)
        except Exception:
            log.warning("remove_remote_agent(%s) failed", name, exc_info=True)

    def _acquire_peer(self, remote: RemoteRegion, deadline: float) -> None:
        """Make sure ``remote``'s agent is loaded with exactly this metadata; count a transfer in flight.

        Called with the lock held. A peer's metadata is replaced only when none of its transfers is in
        flight; a caller with new metadata waits (until ``deadline``) for them, and while one waits,
        callers with the current metadata queue behind it rather than starve it.
        """
        name = remote.agent_name
        if name == self.name:  # loopback into our own registrations: nixl needs no remote agent
            return
        digest = _digest(remote.agent_metadata)
        waiting_on: _Peer | None = None
        try:
            while True:
                peer = self._peers.get(name)
                if peer is None:
                    break
                if peer.digest == digest and peer.pending == 0:
                    self._peers.move_to_end(name)
                    peer.inflight += 1
                    return
                if peer.digest != digest:
                    if peer.inflight == 0:
                        self._remove_peer_locked(name)  # forget the old regions and connection
                        break
                    if waiting_on is not peer:
                        if waiting_on is not None:
                            waiting_on.pending -= 1
                        peer.pending += 1
                        waiting_on = peer
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(timeout=left):
                    raise NixlTimeoutError(
                        name, "metadata changed; timed out waiting for transfers in flight"
                    )
                self._live()
        finally:
            if waiting_on is not None:
                waiting_on.pending -= 1
            self._cond.notify_all()
        try:
            loaded = self._nixl.add_remote_agent(remote.agent_metadata)
        except Exception as e:
            raise NixlTransferError(name, f"add_remote_agent failed: {e}") from e
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != name:
            if loaded in self._peers and self._peers[loaded].inflight:
                self._peers[loaded].digest = b""  # reload on next use; do not break its transfers
            else:
                self._remove_peer_locked(loaded)
            raise NixlTransferError(name, f"metadata belongs to agent {loaded!r}, refused")
        self._peers[name] = _Peer(digest=digest, inflight=1)
        self._evict_locked()

    def _evict_locked(self) -> None:
        excess = len(self._peers) - self.max_peers
        for name in [n for n, p in self._peers.items() if p.inflight == 0][: max(excess, 0)]:
            self._remove_peer_locked(name)

    def _release_peer(self, name: str) -> None:
        peer = self._peers.get(name)
        if peer is not None:
            peer.inflight -= 1
        self._evict_locked()
        self._cond.notify_all()

    # -- transfers --------------------------------------------------------------------------------

    def read(
        self,
        remote: RemoteRegion,
        remote_offset: int,
        local: Registration,
        local_offset: int,
        nbytes: int,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Pull ``nbytes`` from the peer's region into ``local``."""
        self._transfer("READ", remote, [(remote_offset, local_offset, nbytes)], local, timeout_s)

    def write(
        self,
        remote: RemoteRegion,
        remote_offset: int,
        local: Registration,
        local_offset: int,
        nbytes: int,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Push ``nbytes`` from ``local`` into the peer's region."""
        self._transfer("WRITE", remote, [(remote_offset, local_offset, nbytes)], local, timeout_s)

    def read_many(
        self,
        remote: RemoteRegion,
        spans: Sequence[tuple[int, int, int]],
        local: Registration,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Pull every ``(remote_offset, local_offset, nbytes)`` span in one nixl transfer."""
        self._transfer("READ", remote, spans, local, timeout_s)

    def write_many(
        self,
        remote: RemoteRegion,
        spans: Sequence[tuple[int, int, int]],
        local: Registration,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Push every ``(remote_offset, local_offset, nbytes)`` span in one nixl transfer."""
        self._transfer("WRITE", remote, spans, local, timeout_s)

    def _check_spans(
        self, op: str, remote: RemoteRegion, spans: Iterable[tuple[int, int, int]], local: Registration
    ) -> np.ndarray:
        """Spans as an int64 ``[n, 3]`` array, refused (ValueError) unless all lie inside both regions."""
        if not isinstance(remote, RemoteRegion):
            raise TypeError(f"remote must be a RemoteRegion, got {type(remote).__name__}")
        if not isinstance(local, Registration) or local.agent is not self:
            raise ValueError("local must be a Registration of this agent")
        if local.closed:
            raise NixlClosedError(f"{local!r} is closed")
        spans = list(spans)
        if not spans:
            raise ValueError("no spans to transfer")
        if len(spans) > self.max_spans:
            raise ValueError(f"{len(spans)} spans exceed the limit of {self.max_spans}")
        for span in spans:
            if len(span) != 3 or not all(_is_int(v) for v in span):
                raise ValueError(f"span must be 3 ints (remote_offset, local_offset, nbytes), got {span!r}")
        try:
            arr = np.array(spans, dtype=np.int64).reshape(-1, 3)
        except OverflowError as e:
            raise ValueError("span value out of range") from e
        r_off, l_off, n = arr[:, 0], arr[:, 1], arr[:, 2]
        if (n <= 0).any():
            raise ValueError("span nbytes must be > 0")
        if (r_off < 0).any() or (l_off < 0).any():
            raise ValueError("span offsets must be >= 0")
        # r_off, l_off and n are each < 2**63 and the regions < 2**62, so compare without overflow.
        if (r_off > remote.nbytes).any() or (n > remote.nbytes - r_off).any():
            raise ValueError(f"span runs past the remote region of {remote.nbytes} bytes")
        if (l_off > local.nbytes).any() or (n > local.nbytes - l_off).any():
            raise ValueError(f"span runs past the local region of {local.nbytes} bytes")
        dst_off = l_off if op == "READ" else r_off
        order = np.argsort(dst_off, kind="stable")
        starts, ends = dst_off[order], dst_off[order] + n[order]
        if (starts[1:] < ends[:-1]).any():
            raise ValueError(f"{op} destination spans overlap; the result would be undefined")
        return arr

    def _transfer(
        self,
        op: str,
        remote: RemoteRegion,
        spans: Iterable[tuple[int, int, int]],
        local: Registration,
        timeout_s: float,
    ) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
        arr = self._check_spans(op, remote, spans, local)
        deadline = time.monotonic() + timeout_s
        peer = remote.agent_name
        local_descs = np.empty_like(arr, dtype=np.uint64)
        local_descs[:, 0] = local.addr + arr[:, 1].astype(np.uint64)
        local_descs[:, 1] = arr[:, 2]
        local_descs[:, 2] = local.dev_id
        remote_descs = np.empty_like(local_descs)
        remote_descs[:, 0] = np.uint64(remote.addr) + arr[:, 0].astype(np.uint64)
        remote_descs[:, 1] = arr[:, 2]
        remote_descs[:, 2] = remote.dev_id

        with self._cond:
            agent = self._live()
            if local.closed:
                raise NixlClosedError(f"{local!r} is closed")
            self._acquire_peer(remote, deadline)
            local._inflight += 1
        handle = None
        try:
            with self._lock:
                try:
                    ld = agent.get_xfer_descs(local_descs, local.mem_type)
                    rd = agent.get_xfer_descs(remote_descs, remote.mem_type)
                    handle = agent.initialize_xfer(op, ld, rd, peer)
                    state = agent.transfer(handle)
                except Exception as e:
                    raise NixlTransferError(peer, f"{op} of {len(arr)} spans failed: {e}") from e
            polls = 0
            while state == "PROC":
                if time.monotonic() >= deadline:
                    aborted = self._abort(handle)
                    handle = None
                    raise NixlTimeoutError(
                        peer,
                        f"{op} of {int(arr[:, 2].sum())} bytes not done after {timeout_s}s"
                        + ("; cancelled" if aborted else "; could not be cancelled (handle left to nixl)"),
                    )
                polls += 1
                if polls > 64:  # spin briefly for small transfers, then stop burning the shared CPU
                    time.sleep(min(1e-3, 1e-5 * (polls - 64)))
                with self._lock:
                    try:
                        state = agent.check_xfer_state(handle)
                    except Exception as e:
                        raise NixlTransferError(peer, f"{op} status check failed: {e}") from e
            if state != "DONE":
                raise NixlTransferError(peer, f"{op} of {len(arr)} spans ended in state {state}")
        finally:
            with self._cond:
                if handle is not None:
                    try:
                        handle.release()
                    except Exception:
                        log.warning("release of a %s handle to %s failed", op, peer, exc_info=True)
                local._inflight -= 1
                if peer != self.name:
                    self._release_peer(peer)
                self._cond.notify_all()

    def _abort(self, handle: Any) -> bool:
        """Release an in-progress transfer, which nixl turns into a cancel. False if it refused."""
        with self._lock:
            try:
                handle.release()
                return True
            except Exception:
                log.warning("could not cancel a timed-out nixl transfer", exc_info=True)
                return False
