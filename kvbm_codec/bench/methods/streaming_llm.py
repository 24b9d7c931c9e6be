"""StreamingLLM (Xiao et al. 2023): attention sinks + a sliding window; no scores at all.

The floor every scored method must beat: anything outside the window is gone, so a needle in the
middle of the context is lost by construction.
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import BenchContext
from kvbm_codec.bench.methods._eviction import SINKS, EvictionMethod, tail_mask
from kvbm_codec.kv import KVCache


class StreamingLLM(EvictionMethod):
    base_name = "streaming"
    needs_attention = False

    def select(self, kv: KVCache, ctx: BenchContext, budget: int) -> torch.Tensor:
        keep = (kv.positions < SINKS) | tail_mask(kv.n_tokens, max(0, budget - SINKS))
        return torch.nonzero(keep).flatten()
