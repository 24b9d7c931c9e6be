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


SAME_RESTORE = (0.05, 0.05)
"""When a restore still counts as the codec's own restore of the same block: at most this share of
its values differ, by at most this norm relative to the codec's own error. MKL on some CPUs (the AMX
Xeon of sessions 22 and 24) rounds a float32 matmul's last bit differently for another thread count
or batch shape, and a coefficient at a quantization boundary then lands one step off: one coefficient
moves the up-to-1920 values of its layer group for one token. Measured there: 385-1141 of 368,640
values (0.1-0.3%) differing by 6e-5 to 3.5e-3 of the codec's error. A restore of the wrong block,
positions or allocation changes nearly every value, by O(1) of it."""


def restore_offset(got: torch.Tensor, expected: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """(share of values that differ, norm of the difference relative to the codec's own error) between
    ``got`` and ``expected``, the codec's restore of ``original``: (0.0, 0.0) when bit for bit the same."""
    if torch.equal(got, expected):
        return 0.0, 0.0
    g, e, o = got.float(), expected.float(), original.float()
    return float((g != e).float().mean()), float((g - e).norm() / (e - o).norm())


def same_restore(got: torch.Tensor, expected: torch.Tensor, original: torch.Tensor) -> bool:
    share, off = restore_offset(got, expected, original)
    return share <= SAME_RESTORE[0] and off <= SAME_RESTORE[1]


def assert_same_restore(got: bytes, expected: bytes, original: bytes, spec: BlockSpec = SPEC) -> None:
    """``got`` is ``expected`` (the codec's restore of ``original``) bit for bit, or but for a few
    coefficients at a rounding boundary (SAME_RESTORE)."""
    if got == expected:
        return
    blocks = [spec.from_bytes(x) for x in (got, expected, original)]
    share, off = restore_offset(*blocks)
    assert same_restore(*blocks), f"restore differs from the codec's in {share:.2%} of values, by {off:.2e}"
