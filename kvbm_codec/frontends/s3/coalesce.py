"""Concurrent S3 requests for one tenant's bucket served as one batch: one core call, one batched codec call.

An S3 client names one object per request, so an engine restoring a prefix sends one GET per block,
concurrently (vLLM's OBJ tier: one per 32-token chunk from each of its I/O threads). Decoded alone,
each pays the codec's whole per-call cost; decoded together they cost what one batched decode of
all of them costs (3-4x less per block on the build machine, docs/benchmarks.md). So requests with
the same lane (tenant, bucket, operation) that arrive while a batch of that lane runs, or within
``window_s`` of the first of them, are handed to ``run`` together, at most ``max_batch`` at once
and at most ``max_running`` batches of a lane at a time. ``run`` answers each item on its own
(a value or an exception), so one bad item fails only its own request.

Waits are bounded: a lane queues at most ``max_pending`` items (beyond that a request is refused at
once with SlowDown, as the core refuses beyond its in-flight bound), and a queued item is taken by
the next batch that starts, so it waits for at most the batches running when it arrived plus its own.
Batches of different tenants never mix: the core admits each batch as one request of its tenant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kvbm_codec.frontends.s3.errors import S3Error

I = TypeVar("I")  # noqa: E741  (an item of a batch)
R = TypeVar("R")  # its answer

Answer = R | BaseException


@dataclass
class _Lane(Generic[I, R]):
    pending: list[tuple[I, asyncio.Future[R]]] = field(default_factory=list)
    running: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class CoalesceStats:
    batches: int
    items: int
    largest: int


class Coalescer(Generic[I, R]):
    """Lives on one event loop (the endpoint's); ``run`` executes on ``pool``, off the loop.

    ``run(lane, items)`` returns one answer per item, in order: the item's value, or the exception
    its request fails with. An exception raised by ``run`` itself fails every item of the batch.
    ``separate(a, b)``, when given, keeps two items out of one batch (two PUTs of one key: each must
    be answered with the ETag of its own frame)."""

    def __init__(
        self,
        run: Callable[[Any, list[I]], Sequence[Answer[R]]],
        pool: Executor,
        *,
        window_s: float,
        max_batch: int,
        max_running: int,
        max_pending: int,
        separate: Callable[[I, I], bool] | None = None,
    ) -> None:
        if window_s < 0 or max_batch < 1 or max_running < 1 or max_pending < max_batch:
            raise ValueError("window_s >= 0, max_batch >= 1, max_running >= 1, max_pending >= max_batch")
        self._run, self._pool = run, pool
        self.window_s, self.max_batch, self.max_running, self.max_pending = (
            window_s,
            max_batch,
            max_running,
            max_pending,
        )
        self._separate = separate
        self._lanes: dict[Hashable, _Lane[I, R]] = {}
        self._batches = self._items = self._largest = 0

    def stats(self) -> CoalesceStats:
        """Batches run and items served so far (what a test or the bench reads)."""
        return CoalesceStats(self._batches, self._items, self._largest)

    async def submit(self, lane: Hashable, item: I, *, max_batch: int | None = None) -> R:
        """Queue ``item`` on ``lane``; its answer once the batch it joined has run."""
        loop = asyncio.get_running_loop()
        ln = self._lanes.setdefault(lane, _Lane())
        if len(ln.pending) >= self.max_pending:
            raise S3Error(
                503,
                "SlowDown",
                f"{len(ln.pending)} requests of this bucket wait for a batch (limit {self.max_pending})",
                headers={"Retry-After": "1"},
            )
        fut: asyncio.Future[R] = loop.create_future()
        ln.pending.append((item, fut))
        self._kick(lane, ln, max_batch or self.max_batch)
        return await fut

    def _kick(self, key: Hashable, ln: _Lane[I, R], limit: int) -> None:
        if not ln.pending or ln.running >= self.max_running:
            return
        if self.window_s > 0 and len(ln.pending) < limit:
            if ln.timer is None:  # the first waiter opens the window; later ones join it
                ln.timer = asyncio.get_running_loop().call_later(self.window_s, self._fire, key, ln, limit)
            return
        self._start(key, ln, limit)

    def _fire(self, key: Hashable, ln: _Lane[I, R], limit: int) -> None:
        ln.timer = None
        if ln.pending and ln.running < self.max_running:
            self._start(key, ln, limit)

    def _start(self, key: Hashable, ln: _Lane[I, R], limit: int) -> None:
        if ln.timer is not None:
            ln.timer.cancel()
            ln.timer = None
        batch: list[tuple[I, asyncio.Future[R]]] = []
        rest: list[tuple[I, asyncio.Future[R]]] = []
        for entry in ln.pending:
            if entry[1].done():  # its request was cancelled (client gone) while queued
                continue
            if len(batch) < limit and not (
                self._separate is not None and any(self._separate(entry[0], b[0]) for b in batch)
            ):
                batch.append(entry)
            else:
                rest.append(entry)
        ln.pending = rest
        if not batch:
            return
        ln.running += 1
        self._batches += 1
        self._items += len(batch)
        self._largest = max(self._largest, len(batch))
        asyncio.get_running_loop().create_task(self._serve(key, ln, batch, limit))

    async def _serve(
        self, key: Hashable, ln: _Lane[I, R], batch: list[tuple[I, asyncio.Future[R]]], limit: int
    ) -> None:
        items = [it for it, _ in batch]
        try:
            answers: Sequence[Answer[R]] = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run, key, items
            )
            if len(answers) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(answers)} answers")
        except BaseException as e:  # the batch's own failure is every item's
            answers = [e] * len(batch)
        finally:
            ln.running -= 1
        for (_, fut), a in zip(batch, answers, strict=True):
            if fut.done():
                continue
            if isinstance(a, BaseException):
                fut.set_exception(a)
            else:
                fut.set_result(a)
        # what queued meanwhile has waited a whole batch already: it goes now, no window
        if ln.pending and ln.running < self.max_running:
            self._start(key, ln, limit)
        elif not ln.pending and not ln.running and ln.timer is None:
            self._lanes.pop(key, None)
