"""Real KV cut into KVBM blocks with chained sequence hashes: what the CLI client, tests and bench put.

Hashes follow Dynamo's chain (``kvbm_codec.adapters.kvbm.sequence_hashes``): a block's hash names its
whole prefix, so equal hashes mean equal KV (same model, same tokens before it). An engine integration
uses the hashes KVBM hands it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_codec.adapters.kvbm import sequence_hashes
from kvbm_codec.api.blocks import BlockSpec, kv_to_block

__all__ = ["KVBlock", "kv_blocks", "sequence_hashes"]


@dataclass(frozen=True)
class KVBlock:
    sequence_hash: int
    first_position: int
    data: bytes  # raw block bytes in ``spec``


def kv_blocks(lm, text: str, spec: BlockSpec, max_tokens: int) -> list[KVBlock]:  # type: ignore[no-untyped-def]
    """Prefill ``text`` (first ``max_tokens`` tokens, whole blocks only) and cut its KV into blocks."""
    ids = lm.encode(text)[:, :max_tokens]
    n = (int(ids.shape[1]) // spec.page_size) * spec.page_size
    if n == 0:
        raise ValueError(f"text has fewer than {spec.page_size} tokens")
    ids = ids[:, :n]
    kv, _ = lm.prefill(ids, return_logits=False)
    hashes = sequence_hashes(ids[0].tolist(), spec.page_size)
    out = []
    for b, h in enumerate(hashes):
        sub = kv.select_tokens(torch.arange(b * spec.page_size, (b + 1) * spec.page_size))
        out.append(KVBlock(h, b * spec.page_size, spec.to_bytes(kv_to_block(sub, spec))))
    return out
