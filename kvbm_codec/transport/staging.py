"""Server side of the NIXL data path: a registered staging pool the server READs into and WRITEs from.

The pool is one host tensor registered once with the server's agent (registering per request would
change the agent's metadata every time, and peers would have to reload it), cut into fixed slots.
A request holds one slot for its lifetime and moves its blocks through it in chunks, so the pool
bounds the memory NIXL traffic can pin however many blocks a request names. When every slot is
busy the request is refused with a retry hint, like any other overload.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvbm_codec.api.errors import InvalidRequestError, OverloadedError
from kvbm_codec.transport.nixl import NixlAgent, Registration, RemoteRegion


@dataclass(frozen=True)
class Slot:
    offset: int
    nbytes: int


class StagingPool:
    def __init__(
        self,
        agent: NixlAgent,
        total_bytes: int,
        slot_bytes: int,
        *,
        timeout_s: float,
        retry_after_s: float,
    ) -> None:
        if slot_bytes > total_bytes:
            raise ValueError(f"nixl slot_bytes {slot_bytes} exceeds staging_bytes {total_bytes}")
        self.agent = agent
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        n = total_bytes // slot_bytes
        self.buffer = torch.zeros(n * slot_bytes, dtype=torch.uint8)
        self.registration: Registration = agent.register(self.buffer)
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for i in range(n):
            self._free.put(Slot(i * slot_bytes, slot_bytes))

    @classmethod
    def create(
        cls, name: str | None, total_bytes: int, slot_bytes: int, *, timeout_s: float, retry_after_s: float
    ) -> StagingPool:
        agent = NixlAgent(name or f"kvbm-codec-{os.getpid()}")
        try:
            return cls(agent, total_bytes, slot_bytes, timeout_s=timeout_s, retry_after_s=retry_after_s)
        except Exception:
            agent.close()
            raise

    @contextlib.contextmanager
    def slot(self) -> Iterator[Slot]:
        try:
            s = self._free.get_nowait()
        except queue.Empty:
            raise OverloadedError(
                "every NIXL staging slot is in use", retry_after_s=self.retry_after_s
            ) from None
        try:
            yield s
        finally:
            self._free.put(s)

    def view(self, slot: Slot) -> memoryview:
        return memoryview(self.buffer.numpy())[slot.offset : slot.offset + slot.nbytes]

    def chunks(self, sizes: Sequence[int], slot: Slot) -> Iterator[list[int]]:
        """Indices of consecutive items whose sizes fit in one slot together."""
        cur: list[int] = []
        used = 0
        for i, n in enumerate(sizes):
            if n > slot.nbytes:
                raise InvalidRequestError(f"a {n}-byte block does not fit a {slot.nbytes}-byte NIXL slot")
            if used + n > slot.nbytes:
                yield cur
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            yield cur

    def read(self, remote: RemoteRegion, spans: Sequence[tuple[int, int]], slot: Slot) -> list[bytes]:
        """Pull ``(remote_offset, nbytes)`` spans (fitting one slot) and return copies of their bytes."""
        local, out_spans = slot.offset, []
        for r_off, n in spans:
            out_spans.append((r_off, local, n))
            local += n
        self._checked(
            lambda: self.agent.read_many(remote, out_spans, self.registration, timeout_s=self.timeout_s)
        )
        view = memoryview(self.buffer.numpy())
        return [bytes(view[lo : lo + n]) for _, lo, n in out_spans]

    def write(self, remote: RemoteRegion, items: Sequence[tuple[int, bytes]], slot: Slot) -> None:
        """Push ``(remote_offset, data)`` items (fitting one slot) into the client's region."""
        view = memoryview(self.buffer.numpy())
        local, spans = slot.offset, []
        for r_off, data in items:
            view[local : local + len(data)] = data
            spans.append((r_off, local, len(data)))
            local += len(data)
        self._checked(
            lambda: self.agent.write_many(remote, spans, self.registration, timeout_s=self.timeout_s)
        )

    @staticmethod
    def _checked(fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except ValueError as e:  # spans outside the client's region, overlapping spans ...
            raise InvalidRequestError(f"NIXL spans refused: {e}") from e

    def close(self) -> None:
        try:
            self.registration.close()
        finally:
            self.agent.close()
