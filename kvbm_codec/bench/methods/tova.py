"""TOVA (Oren et al. 2024): keep the tokens the *last* query attends to most (head-averaged).

Applied once to the whole prompt (as kvpress does) rather than token by token during decoding. Because
the last query belongs to the question, TOVA is question-aware here, which favours it on retrieval.
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import BenchContext
from kvbm_codec.bench.methods._eviction import SINKS, TAIL, EvictionMethod, tail_mask, top_up
from kvbm_codec.kv import KVCache


class TOVA(EvictionMethod):
    base_name = "tova"

    def select(self, kv: KVCache, ctx: BenchContext, budget: int) -> torch.Tensor:
        protected = (kv.positions < SINKS) | tail_mask(kv.n_tokens, TAIL)
        return top_up(ctx.attention().last_query, protected, budget)
