"""DMS-style threshold eviction with delayed eviction, untrained (as kvpress's DMSPress).

Dynamic Memory Sparsification decides each token's fate when it leaves a sliding window of the most
recent tokens, from what the queries *inside that window* did with it; no future query is consulted.
Here the decision score is the attention a token received from the `window` queries right after it
(kvbm_codec.bench.attention.AttentionStats.windowed), and the tokens still inside the window are kept.
Trained DMS learns its threshold; untrained, the threshold is set per context at the quantile that
meets the target ratio (an oracle threshold, which flatters it slightly, never hurts it).
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import BenchContext
from kvbm_codec.bench.methods._eviction import EvictionMethod, tail_mask, top_up
from kvbm_codec.kv import KVCache


class DMS(EvictionMethod):
    base_name = "dms"

    def select(self, kv: KVCache, ctx: BenchContext, budget: int) -> torch.Tensor:
        stats = ctx.attention()
        pending = tail_mask(kv.n_tokens, stats.window)
        return top_up(stats.windowed, pending, budget)
