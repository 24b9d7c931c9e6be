"""Per-tenant admission: one tenant's in-flight requests and in-flight bytes are bounded apart from
the global bound, so a tenant holding many slow, unread or huge requests is refused for its own
excess while others still get in. Kept apart from ``core.service`` so the admission point calls one
object and the policy can grow (weights) without touching the verbs.

Tenant classes: metrics must never carry tenant names (unbounded, and a name can be a secret), so
every per-tenant refusal is labelled with the tenant's class from configuration (``default`` for a
tenant the map does not name)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_CLASS = "default"
UNKNOWN_CLASS = "unknown"
"""Class of a refusal before any tenant is established (an unauthenticated caller)."""


@dataclass(frozen=True)
class Refusal:
    """Why a tenant was refused, with the numbers for the caller's message."""

    reason: str  # stable metric label / error detail: tenant_overloaded or tenant_bytes
    message: str


@dataclass
class TenantAdmission:
    """In-flight count and bytes per tenant. ``limit``: requests (0: no per-tenant bound);
    ``max_bytes``: bytes of admitted requests (0: no bound). A request larger than ``max_bytes`` is
    still admitted when its tenant has nothing else in flight: refusing it with a retry hint would
    promise a retry that can never pass (the message-size limit refuses truly oversized ones)."""

    limit: int
    max_bytes: int = 0
    classes: Mapping[str, str] = field(default_factory=dict)
    _inflight: dict[str, int] = field(default_factory=dict)
    _bytes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def class_of(self, tenant: str | None) -> str:
        if tenant is None:
            return DEFAULT_CLASS
        return self.classes.get(tenant, DEFAULT_CLASS)

    def try_enter(self, tenant: str, nbytes: int = 0) -> Refusal | None:
        """Take a slot and ``nbytes`` for ``tenant``; None if admitted, else why not."""
        if self.limit <= 0 and self.max_bytes <= 0:
            return None
        with self._lock:
            n = self._inflight.get(tenant, 0)
            if 0 < self.limit <= n:
                return Refusal(
                    "tenant_overloaded", f"{n} requests in flight for this tenant (limit {self.limit})"
                )
            held = self._bytes.get(tenant, 0)
            if self.max_bytes > 0 and held > 0 and held + nbytes > self.max_bytes:
                return Refusal(
                    "tenant_bytes",
                    f"{held} bytes in flight for this tenant; {nbytes} more would pass its limit "
                    f"of {self.max_bytes}",
                )
            self._inflight[tenant] = n + 1
            if nbytes:
                self._bytes[tenant] = held + nbytes
            return None

    def leave(self, tenant: str, nbytes: int = 0) -> None:
        if self.limit <= 0 and self.max_bytes <= 0:
            return
        with self._lock:
            n = self._inflight.get(tenant, 0) - 1
            if n > 0:
                self._inflight[tenant] = n
            else:
                self._inflight.pop(tenant, None)
            b = self._bytes.get(tenant, 0) - nbytes
            if b > 0:
                self._bytes[tenant] = b
            else:
                self._bytes.pop(tenant, None)

    def inflight(self, tenant: str) -> int:
        with self._lock:
            return self._inflight.get(tenant, 0)

    def inflight_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._bytes.get(tenant, 0)
