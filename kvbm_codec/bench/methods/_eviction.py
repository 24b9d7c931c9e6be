"""Shared rules of the token-eviction baselines, so they differ only in how they score tokens.

Every eviction method keeps the last TAIL tokens: the bench's prompts end with the question and the
chat template's assistant header inside that tail, and a deployed system compresses a prompt's KV
only after the question arrived (or never evicts the tokens still being attended by the next step).
The kept set is shared by all layers and heads (see kvbm_codec.bench.attention for why).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.kv import KVCache

SINKS = 4
TAIL = 64
POSITION_BYTES = 4  # int32 per kept token: evicted caches are not one contiguous run


def top_up(score: torch.Tensor, protected: torch.Tensor, budget: int) -> torch.Tensor:
    """Sorted indices: every protected token, then the best-scored others until `budget` tokens."""
    keep = protected.clone()
    room = budget - int(keep.sum())
    if room > 0:
        s = score.clone().float()
        s[keep] = float("-inf")
        keep[torch.topk(s, min(room, int((~keep).sum()))).indices] = True
    return torch.nonzero(keep).flatten()


def tail_mask(n: int, tail: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[max(0, n - tail) :] = True
    return m


class EvictionMethod(KVMethod):
    family = "eviction"
    needs_attention = True
    base_name: str

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.name = f"{self.base_name}@{ratio:g}"

    def params(self) -> dict[str, object]:
        return {"ratio": self.ratio, "sinks": SINKS, "tail": TAIL}

    def prepare(self, ctx: BenchContext) -> None:
        if self.needs_attention:
            ctx.attention()

    def budget(self, n_tokens: int) -> int:
        return max(1, round(n_tokens / self.ratio))

    @abstractmethod
    def select(self, kv: KVCache, ctx: BenchContext, budget: int) -> torch.Tensor:
        """Sorted indices of the tokens to keep."""

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        idx = self.select(kv, ctx, self.budget(kv.n_tokens))
        kept = kv.select_tokens(idx)
        stored = kept.nbytes(2) + POSITION_BYTES * kept.n_tokens + NOMINAL_HEADER_BYTES
        payload = (kept.keys.half(), kept.values.half(), kept.positions)
        return Compressed(stored, payload, kept.n_tokens, {"kept_tokens": kept.n_tokens})

    def restore(self, c: Compressed) -> KVCache:
        k, v, pos = c.payload
        return KVCache(k.float(), v.float(), pos)
