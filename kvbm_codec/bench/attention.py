"""Attention statistics for the eviction baselines, computed from one hooked prefill of the context.

Why queries are captured by hooking q_proj rather than asking transformers for output_attentions: eager
attention with output_attentions materializes [heads, T, T] for every layer at once and forces the slow
eager path for the whole forward; capturing the [T, heads*d] query projections costs ~T*d*L floats, and
the scores are then rebuilt one layer at a time from the same keys the cache holds (RoPE re-applied to
the queries with the model's own rotary parameters). At 2k tokens on 2 cores this is a few seconds.

Scores are aggregated over layers and heads into one score per token, because KVCache (like KVBM's
blocks and the KVTC frame) holds one token set for all layers and heads: per-head eviction, which the
H2O/TOVA papers use, would need a ragged cache. This is documented as a limitation of the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvbm_codec.codec.rope import RotaryParams, apply_rope
from kvbm_codec.kv import KVCache
from kvbm_codec.models.fingerprint import decoder_layers


@dataclass
class AttentionStats:
    """Per-token scores [T], each the mean over layers and query heads of one attention statistic."""

    accumulated: torch.Tensor  # H2O: total attention received from every later query
    last_query: torch.Tensor  # TOVA: attention from the final query of the context
    windowed: torch.Tensor  # DMS-style: attention received from the `window` queries right after it
    window: int


class QueryCapture:
    """Collects q_proj outputs of every decoder layer while a prefill runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.chunks: list[list[torch.Tensor]] = [[] for _ in self.layers]

    @contextmanager
    def active(self) -> Iterator[QueryCapture]:
        handles = []
        for i, layer in enumerate(self.layers):

            def hook(_m: torch.nn.Module, _inp: object, out: torch.Tensor, i: int = i) -> None:
                self.chunks[i].append(out[0].detach().to(torch.float32).clone())

            handles.append(layer.self_attn.q_proj.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def queries(
        self, n_heads: int, head_dim: int, positions: torch.Tensor, rope: RotaryParams
    ) -> torch.Tensor:
        """[L, Hq, T, d] post-RoPE queries, as the attention kernel saw them."""
        out = []
        for chunks in self.chunks:
            q = torch.cat(chunks).reshape(-1, n_heads, head_dim).permute(1, 0, 2)
            out.append(apply_rope(q, positions, rope))
        return torch.stack(out)


def attention_stats(queries: torch.Tensor, kv: KVCache, window: int, chunk: int = 256) -> AttentionStats:
    """Rebuild causal softmax attention layer by layer and in query chunks (never [L, H, T, T] at once).

    A chunk of queries only scores the keys up to its last query (causal), which halves the work of the
    full square, and the windowed statistic only reads the band of keys within `window` of each query.
    """
    n_layers, n_q, t, d = queries.shape
    group = n_q // kv.n_heads
    acc = torch.zeros(t, dtype=torch.float64)
    last = torch.zeros(t, dtype=torch.float64)
    win = torch.zeros(t, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d)
    for layer in range(n_layers):
        k = kv.keys[layer].to(torch.float32).repeat_interleave(group, dim=0)  # [Hq, T, d]
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            qi = torch.arange(c0, c1)[:, None]
            kj = torch.arange(c1)[None, :]
            s = (queries[layer, :, c0:c1] @ k[:, :c1].transpose(1, 2)) * scale  # [Hq, c, c1]
            s.masked_fill_(kj > qi, float("-inf"))
            a = torch.softmax(s, dim=-1)
            acc[:c1] += a.sum(1).mean(0).double()
            if c1 == t:
                last += a[:, -1].mean(0).double()
            lo = max(0, c0 - window + 1)
            band = (qi - kj[:, lo:] < window) & (kj[:, lo:] <= qi)
            win[lo:c1] += (a[:, :, lo:] * band).sum(1).mean(0).double()
    return AttentionStats(
        accumulated=(acc / n_layers).float(),
        last_query=(last / n_layers).float(),
        windowed=(win / n_layers).float(),
        window=window,
    )
