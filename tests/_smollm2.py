"""The SmolLM2-135M block layout the service tests share, defined once.

The gRPC, S3, core and subprocess service tests serve the real SmolLM2-135M (with the session's small
calibration) fp16 blocks of 32 tokens cut from its KV. Each module used to spell out the model name,
the block spec, the served model and the prefill-and-cut loop itself; this is the one definition, so
they cannot drift apart. The fixtures (their scope, text, block count) stay in the modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvbm_codec.api.blocks import BlockSpec, kv_to_block
from kvbm_codec.core.service import ServedModel
from kvbm_codec.texts import demo_document

if TYPE_CHECKING:
    from kvbm_codec.codec.params import Calibration
    from kvbm_codec.kv import KVCache
    from kvbm_codec.models.hf import CausalLM

MODEL = "smollm2-135m"
SPEC = BlockSpec(n_layers=30, page_size=32, n_kv_heads=3, head_dim=64, dtype="float16")


def served(calibration: Calibration, spec: BlockSpec = SPEC, target_cr: float = 20.0) -> ServedModel:
    """The served model every service under test is built with."""
    return ServedModel(MODEL, calibration, spec, target_cr)


def prefill(lm: CausalLM, n_tokens: int, text: str | None = None) -> KVCache:
    """The KV of the first ``n_tokens`` tokens of ``text`` (the demo document by default)."""
    ids = lm.encode(demo_document() if text is None else text)[:, :n_tokens]
    return lm.prefill(ids, return_logits=False)[0]


def block_of(kv: KVCache, b: int) -> torch.Tensor:
    """Block ``b`` of ``kv`` (tokens ``32 b`` to ``32 b + 31``) in the service's layout."""
    page = SPEC.page_size
    return kv_to_block(kv.select_tokens(torch.arange(b * page, (b + 1) * page)), SPEC)


def blocks(lm: CausalLM, n: int, first: int = 0, text: str | None = None) -> list[torch.Tensor]:
    """Blocks ``first`` to ``first + n - 1`` of ``text``, prefilled from its first token to their last."""
    kv = prefill(lm, (first + n) * SPEC.page_size, text)
    return [block_of(kv, b) for b in range(first, first + n)]


def block_bytes(lm: CausalLM, n: int, first: int = 0, text: str | None = None) -> list[bytes]:
    """``blocks`` as the raw bytes a client sends."""
    return [SPEC.to_bytes(b) for b in blocks(lm, n, first, text)]
