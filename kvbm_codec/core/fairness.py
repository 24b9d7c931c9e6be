"""Per-tenant admission: one tenant's in-flight requests are bounded apart from the global bound, so
a tenant holding many slow or unread requests is refused for its own excess while others still get
in. Kept apart from ``core.service`` so the admission point calls one object and the policy can grow
(bytes, weights) without touching the verbs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class TenantAdmission:
    """In-flight count per tenant, bounded by ``limit`` (0: no per-tenant bound)."""

    limit: int
    _inflight: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def try_enter(self, tenant: str) -> int | None:
        """Take a slot for ``tenant``; None if admitted, else the tenant's current in-flight count."""
        if self.limit <= 0:
            return None
        with self._lock:
            n = self._inflight.get(tenant, 0)
            if n >= self.limit:
                return n
            self._inflight[tenant] = n + 1
            return None

    def leave(self, tenant: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            n = self._inflight.get(tenant, 0) - 1
            if n > 0:
                self._inflight[tenant] = n
            else:
                self._inflight.pop(tenant, None)

    def inflight(self, tenant: str) -> int:
        with self._lock:
            return self._inflight.get(tenant, 0)
