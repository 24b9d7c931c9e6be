"""H2O (Zhang et al. 2023): half the budget for the most recent tokens, half for "heavy hitters",
the tokens with the largest attention accumulated over every query of the context.

Accumulated attention favours early tokens (more queries see them); that bias is H2O's, kept on purpose.
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import BenchContext
from kvbm_codec.bench.methods._eviction import TAIL, EvictionMethod, tail_mask, top_up
from kvbm_codec.kv import KVCache


class H2O(EvictionMethod):
    base_name = "h2o"

    def select(self, kv: KVCache, ctx: BenchContext, budget: int) -> torch.Tensor:
        recent = tail_mask(kv.n_tokens, max(TAIL, budget // 2))
        return top_up(ctx.attention().accumulated, recent, budget)
