"""The benchmark's kvtc rows measure what the service stores: the harness method's frames for a
context equal, byte for byte, the frames ``BlockService.put_blocks`` stores for the same blocks,
positions, calibration and target (real SmolLM2 KV, a real small calibration)."""

from __future__ import annotations

import torch

from kvbm_codec.api.blocks import kv_to_block
from kvbm_codec.api.types import PutItem
from kvbm_codec.bench.base import BenchContext
from kvbm_codec.bench.methods.kvtc import KVTC, block_spec
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore
from kvbm_codec.texts import demo_conversation

TARGET = 20.0  # an allocation the small calibration holds (cr8, cr20)


class _Resources:
    """What the harness asks a run for: here, the one calibration under test."""

    def __init__(self, cal) -> None:  # type: ignore[no-untyped-def]
        self.cal = cal

    def calibration(self):  # type: ignore[no-untyped-def]
        return self.cal


def test_harness_frames_are_the_frames_the_service_stores(smollm, small_calibration) -> None:  # type: ignore[no-untyped-def]
    cal = small_calibration
    spec = block_spec(cal)
    P, window = spec.page_size, cal.config.window_tokens
    n = 4 * P + window + 7  # compressed pages, recent-window pages kept exact, and a tail of 7
    ids = smollm.tokenizer(demo_conversation(smollm.tokenizer), add_special_tokens=False, return_tensors="pt")
    ids = ids["input_ids"][:, :n]
    assert ids.shape[1] == n
    kv, _ = smollm.prefill(ids, return_logits=False)

    method = KVTC(TARGET)
    c = method.compress(kv, BenchContext(smollm, ids, _Resources(cal)))
    frames, tail, _ = c.payload
    n_blocks = n // P
    assert len(frames) == n_blocks and tail.n_tokens == n - n_blocks * P
    assert c.stored_bytes == sum(map(len, frames)) + tail.nbytes()

    svc = BlockService([ServedModel("m", cal, spec, TARGET)], TieredStore([MemoryTier(64 << 20)]))
    items = []
    for b in range(n_blocks):
        sub = kv.select_tokens(torch.arange(b * P, (b + 1) * P))
        exact = (b + 1) * P > n - window  # holds a recent-window token: the harness keeps it exact
        items.append(PutItem(b + 1, spec.to_bytes(kv_to_block(sub, spec)), sub.positions, compress=not exact))
    svc.put_blocks("t", "m", items)
    stored = svc.get_blocks("t", "m", [it.sequence_hash for it in items], as_frames=True)
    assert [s.status for s in stored] == ["hit"] * n_blocks
    assert [s.data for s in stored] == frames
    assert any(it.compress for it in items) and not all(it.compress for it in items)

    back = method.restore(c)
    assert torch.equal(back.positions, kv.positions)
    # the exact part (recent-window pages and the tail) comes back at fp16 precision
    exact_from = (n - window) // P * P
    assert torch.equal(back.keys[:, :, exact_from:], kv.keys[:, :, exact_from:].half().float())
