"""Real KV cut into KVBM blocks with chained sequence hashes: what the CLI client, tests and bench put.

Sequence hash of block i (``page_size`` tokens ``t``): ``xxh3_64(le_u64(parent) || le_u32(t...))``
with ``parent`` the previous block's sequence hash (0 for the first block). Chaining makes a block's
hash name its whole prefix, as KVBM's does, so equal hashes mean equal KV (same model, same
tokens before it). This is this project's demo scheme, not KVBM's exact bit layout: an engine
integration uses the hashes KVBM hands it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvbm_codec.blocks import BlockSpec, kv_to_block


def sequence_hashes(token_ids: Sequence[int], page_size: int, parent: int = 0) -> list[int]:
    """One hash per whole block of ``token_ids`` (a trailing partial block has none)."""
    out = []
    ids = np.asarray(token_ids, dtype="<u4")
    for start in range(0, len(ids) - page_size + 1, page_size):
        h = xxhash.xxh3_64()
        h.update(int(parent).to_bytes(8, "little"))
        h.update(ids[start : start + page_size].tobytes())
        parent = h.intdigest()
        out.append(parent)
    return out


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
