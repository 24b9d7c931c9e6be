"""Finding codec replicas the way Dynamo components find each other: through Dynamo's DistributedRuntime.

A replica registers a Dynamo endpoint (``namespace.component.endpoint``, from ``DynamoConfig``) that
answers one small request, ``{"op": "describe"}``, with its gRPC target and Dynamo instance id. Block
traffic never goes through Dynamo's request plane (it is gRPC/NIXL); Dynamo supplies what it is good at:
which instances are alive (leases that lapse when a process dies) and a way to ask each who it is.
Clients list live instance ids, describe each new one once (cached), and forget those no longer listed.

Dynamo's Python runtime is asyncio-based while the gRPC server and clients are synchronous, so each
``DistributedRuntime`` runs on its own event loop in a daemon thread (:class:`RuntimeThread`) and every
call into it is bounded by a timeout.

Configuration is Dynamo's own environment (read by the runtime when it is created):

- production (bare metal): ``DYN_DISCOVERY_BACKEND=etcd`` with ``ETCD_ENDPOINTS=http://etcd:2379``;
  request plane ``DYN_REQUEST_PLANE=tcp`` (default) with ``DYN_TCP_RPC_HOST`` set to the pod IP;
  ``NATS_SERVER=nats://nats:4222`` only where Dynamo's event plane (KV events) is used.
- Kubernetes with the Dynamo operator: ``DYN_DISCOVERY_BACKEND=kubernetes`` (set by the operator).
- tests / one host: ``DYN_DISCOVERY_BACKEND=file`` with ``DYN_FILE_KV=<shared directory>``,
  ``DYN_TCP_RPC_HOST=127.0.0.1`` and ``DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvbm_codec.service.logging import fields, get_logger

log = get_logger(__name__)
T = TypeVar("T")
DESCRIBE = {"op": "describe"}
KIND = "kvbm-codec"


class DiscoveryError(RuntimeError):
    code = "discovery_error"


@dataclass(frozen=True)
class DynamoSettings:
    namespace: str = "dynamo"
    component: str = "kvbm-codec"
    endpoint: str = "blocks"
    # None: Dynamo's own environment decides (DYN_DISCOVERY_BACKEND, default etcd; DYN_REQUEST_PLANE, tcp).
    discovery_backend: str | None = None
    request_plane: str | None = None
    start_timeout_s: float = 30.0
    call_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("namespace", "component", "endpoint"):
            v = getattr(self, name)
            if not v or "." in v or "/" in v:
                raise ValueError(f"Dynamo {name} must be non-empty without '.' or '/', got {v!r}")

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"

    @classmethod
    def from_config(cls, cfg: Any) -> DynamoSettings:
        """From ``ServiceConfig.dynamo`` (a ``DynamoConfig``)."""
        return cls(namespace=cfg.namespace, component=cfg.component, endpoint=cfg.endpoint)


@dataclass(frozen=True)
class Member:
    """One live replica: Dynamo instance id and the gRPC target it serves blocks on."""

    instance_id: int
    grpc_target: str
    models: tuple[str, ...] = field(default=())
    pid: int | None = None  # of the replica process, for operators (and tests that must kill one)

    @property
    def key(self) -> str:
        return f"{self.instance_id:x}"


class RuntimeThread:
    """A Dynamo DistributedRuntime owned by a private event loop in a daemon thread."""

    def __init__(self, settings: DynamoSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.runtime: Any = None
        self._thread = threading.Thread(target=self._main, name=f"dynamo-{settings.path}", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._create())
        except BaseException as e:  # reported to start(); the thread then ends
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _create(self) -> None:
        from dynamo._core import DistributedRuntime

        s = self.settings
        backend = s.discovery_backend or os.environ.get("DYN_DISCOVERY_BACKEND", "etcd")
        plane = s.request_plane or os.environ.get("DYN_REQUEST_PLANE", "tcp")
        self.runtime = DistributedRuntime(self.loop, backend, plane)

    def start(self) -> RuntimeThread:
        self._thread.start()
        if not self._ready.wait(self.settings.start_timeout_s):
            raise DiscoveryError(f"Dynamo runtime did not start in {self.settings.start_timeout_s} s")
        if self._error is not None:
            raise DiscoveryError(f"Dynamo runtime failed to start: {self._error}") from self._error
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run ``fn()`` on the runtime's loop and wait for it, at most ``timeout_s``."""
        timeout = timeout_s if timeout_s is not None else self.settings.call_timeout_s
        fut = asyncio.run_coroutine_threadsafe(_wrap(fn), self.loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise DiscoveryError(f"Dynamo call timed out after {timeout} s") from None

    def close(self, timeout_s: float = 5.0) -> None:
        if self.runtime is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self.loop.call_soon_threadsafe(self.runtime.shutdown)
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)


async def _wrap(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


class DynamoRegistration:
    """Makes one service replica discoverable: serves the describe endpoint until closed."""

    def __init__(self, grpc_target: str, settings: DynamoSettings, models: Sequence[str] = ()) -> None:
        self.grpc_target = grpc_target
        self.settings = settings
        self.models = tuple(models)
        self._rt = RuntimeThread(settings)
        self._endpoint: Any = None
        self._serving: Any = None
        self.instance_id: int | None = None

    def start(self) -> DynamoRegistration:
        self._rt.start()

        async def serve() -> int:
            ep = self._rt.runtime.endpoint(self.settings.path)
            iid = int(ep.connection_id())

            async def handler(request: Any, context: Any = None) -> AsyncIterator[dict[str, Any]]:
                if isinstance(request, dict) and request.get("op") == "describe":
                    yield {
                        "kind": KIND,
                        "grpc_target": self.grpc_target,
                        "instance_id": iid,
                        "models": list(self.models),
                        "pid": os.getpid(),
                    }
                else:
                    yield {"error": "unknown request; this endpoint only answers {'op': 'describe'}"}

            self._endpoint = ep
            self._serving = asyncio.ensure_future(ep.serve_endpoint(handler, graceful_shutdown=False))
            await asyncio.sleep(0)  # let serve_endpoint begin registering
            return iid

        try:
            self.instance_id = self._rt.call(serve, self.settings.start_timeout_s)
        except BaseException:
            self._rt.close()
            raise
        log.info(
            "registered with Dynamo",
            extra=fields(endpoint=self.settings.path, instance_id=self.instance_id, target=self.grpc_target),
        )
        return self

    def close(self) -> None:
        """Withdraw from discovery first (clients stop routing here), then stop the runtime."""
        if self._endpoint is not None:
            try:
                self._rt.call(self._endpoint.unregister_endpoint_instance, self.settings.call_timeout_s)
            except Exception as e:  # the lease lapses on its own; closing must not fail
                log.warning("Dynamo unregister failed", extra=fields(error=str(e)))
            self._endpoint = None
        self._rt.close()

    def __enter__(self) -> DynamoRegistration:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DynamoDiscovery:
    """Client side: the live replicas of one endpoint, each described once and cached by instance id."""

    def __init__(self, settings: DynamoSettings, *, describe_timeout_s: float = 2.0) -> None:
        self.settings = settings
        self.describe_timeout_s = describe_timeout_s
        self._rt = RuntimeThread(settings)
        self._client: Any = None
        self._cache: dict[int, Member] = {}
        self._lock = threading.Lock()

    def start(self) -> DynamoDiscovery:
        self._rt.start()

        async def make() -> Any:
            return await self._rt.runtime.endpoint(self.settings.path).client()

        try:
            self._client = self._rt.call(make, self.settings.start_timeout_s)
        except BaseException:
            self._rt.close()
            raise
        return self

    def instance_ids(self) -> list[int]:
        async def ids() -> list[int]:
            return [int(i) for i in self._client.instance_ids()]

        return self._rt.call(ids)

    def _describe(self, iid: int) -> Member | None:
        async def ask() -> Any:
            stream = await self._client.direct(dict(DESCRIBE), iid, annotated=False)
            async for item in stream:
                return item
            return None

        try:
            reply = self._rt.call(ask, self.describe_timeout_s)
        except Exception as e:  # a dying instance may still be listed; it is simply not a member now
            log.info("describe failed", extra=fields(instance_id=iid, error=str(e)))
            return None
        data = getattr(reply, "data", reply)
        if not isinstance(data, dict) or data.get("kind") != KIND or not data.get("grpc_target"):
            log.warning("unexpected describe reply", extra=fields(instance_id=iid, reply=str(data)[:200]))
            return None
        pid = data.get("pid")
        return Member(
            iid,
            str(data["grpc_target"]),
            tuple(data.get("models") or ()),
            pid if isinstance(pid, int) else None,
        )

    def members(self) -> dict[str, Member]:
        """Live, described replicas by key. Instances that did not answer are left out (and retried)."""
        ids = self.instance_ids()
        with self._lock:
            for gone in set(self._cache) - set(ids):
                del self._cache[gone]
            new = [i for i in ids if i not in self._cache]
        for iid in new:
            m = self._describe(iid)
            if m is not None:
                with self._lock:
                    self._cache[iid] = m
        with self._lock:
            return {m.key: m for i, m in self._cache.items() if i in ids}

    def wait_for(self, count: int, timeout_s: float, poll_s: float = 0.1) -> dict[str, Member]:
        """Poll until at least ``count`` replicas are described, or raise after ``timeout_s``."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            found = self.members()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise DiscoveryError(f"{len(found)} of {count} replicas discovered in {timeout_s} s")
            time.sleep(poll_s)

    def close(self) -> None:
        self._rt.close()

    def __enter__(self) -> DynamoDiscovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def advertised_target(host: str, port: int) -> str:
    """The gRPC address other hosts should dial: a wildcard bind is not an address, so use
    ``$KVBM_CODEC_ADVERTISE_HOST`` (or ``$POD_IP``, as Kubernetes pods get it), else the host's name."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = os.environ.get("KVBM_CODEC_ADVERTISE_HOST") or os.environ.get("POD_IP") or socket.getfqdn()
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def register_server(cfg: Any, port: int) -> DynamoRegistration:
    """Register a running server (``ServiceConfig`` ``cfg``, bound gRPC ``port``) with Dynamo."""
    settings = DynamoSettings.from_config(cfg.dynamo)
    target = advertised_target(cfg.host, port)
    return DynamoRegistration(target, settings, [m.name for m in cfg.models]).start()
