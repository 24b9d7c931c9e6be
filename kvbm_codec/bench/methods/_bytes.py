"""Shared plumbing of the byte-level (lossless) baselines: KV <-> the fp16 byte stream they compress."""

from __future__ import annotations

import numpy as np
import torch

from kvbm_codec.kv import KVCache


def kv_to_fp16_bytes(kv: KVCache) -> bytes:
    return kv.keys.half().contiguous().numpy().tobytes() + kv.values.half().contiguous().numpy().tobytes()


def fp16_bytes_to_kv(
    data: bytes, like: tuple[tuple[int, ...], tuple[int, ...]], positions: torch.Tensor
) -> KVCache:
    kshape, vshape = like
    arr = torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy())
    nk = int(np.prod(kshape))
    return KVCache(arr[:nk].reshape(kshape).float(), arr[nk:].reshape(vshape).float(), positions)
