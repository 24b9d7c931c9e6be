"""The contract every benchmarked KV compressor implements, and what it may look at while compressing.

Methods are deliberately tiny (one file each, kvpress style): the harness, not the method, owns the
model, the prompts, timing and scoring, so every method is measured on the *same* KV with the same rules.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbm_codec.kv import KVCache

# A minimal frame header (shapes, dtype, one positions run, checksums) for methods that have no real frame
# format: counting zero header bytes would flatter the simple baselines at small contexts.
NOMINAL_HEADER_BYTES = 64


@dataclass
class Compressed:
    """What a method would store for one context.

    stored_bytes counts everything needed to restore (codes, scales, raw tokens, positions, header), so
    ratio = fp16 bytes of the ORIGINAL full-context KV / stored_bytes is comparable across families:
    eviction methods are charged for what they keep and credited for what they drop.
    """

    stored_bytes: int
    payload: Any
    n_tokens: int
    info: dict[str, Any] = field(default_factory=dict)


class BenchContext:
    """Side information a method may use beyond the KV itself.

    Attention statistics and shared resources (calibrations, incumbent PCA bases) are computed lazily
    and at most once per context/run, because most methods need none of them and they are the costly
    part of a run on CPU.
    """

    def __init__(
        self,
        lm: Any,
        context_ids: torch.Tensor,
        resources: Any,
        attention_fn: Callable[[], Any] | None = None,
    ) -> None:
        self.lm = lm
        self.context_ids = context_ids
        self.resources = resources
        self._attention_fn = attention_fn
        self._attention: Any = None

    def attention(self) -> Any:
        """AttentionStats of this context (see kvbm_codec.bench.attention), computed on first use."""
        if self._attention is None:
            if self._attention_fn is None:
                raise RuntimeError("this context was built without query capture; no attention statistics")
            self._attention = self._attention_fn()
        return self._attention


class KVMethod(ABC):
    """A KV compressor under test. `name` is unique per parameter set: it keys the on-disk result cache."""

    name: str
    family: str
    needs_attention: bool = False
    needs_calibration: bool = False

    def params(self) -> dict[str, Any]:
        """Everything that changes the method's output; part of the result-cache key."""
        return {}

    def prepare(self, ctx: BenchContext) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Build shared, per-run state (calibration, attention statistics) before the timed section:
        an engine computes those once, not per compressed block, so they must not count as encode time."""

    @abstractmethod
    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed: ...

    @abstractmethod
    def restore(self, c: Compressed) -> KVCache:
        """float32 KVCache; eviction methods return fewer tokens, with their true positions."""


def fp16_bytes_per_token(kv: KVCache) -> int:
    return (kv.n_layers * kv.n_heads * (kv.key_head_dim + kv.value_head_dim)) * 2


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Throughput is reported per core: a 2-core CI box and a 64-core server must give comparable MB/s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    with single_thread():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
