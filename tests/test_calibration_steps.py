"""The calibration's allocation step on a real small calibration and real SmolLM2 KV: the warm-started
context bisection lands where a cold one does, in fewer real encodes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kvbm_codec.calibration.calibrate import RatioProbe, all_allocations, compressible, context_allocations
from kvbm_codec.codec.allocation import allocate_for_ratio
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import allocation_name
from kvbm_codec.texts import calibration_texts

pytestmark = pytest.mark.slow


class _CountingProbe(RatioProbe):
    encodes = 0

    def measure(self, alloc):  # type: ignore[no-untyped-def]
        self.encodes += 1
        return super().measure(alloc)


def test_warm_started_context_allocations_match_a_cold_bisection(smollm, small_calibration) -> None:  # type: ignore[no-untyped-def]
    cal = small_calibration
    kv, _ = smollm.prefill(smollm.encode(" ".join(calibration_texts()[40:44]))[:, :600], return_logits=False)
    kv = compressible(kv, cal.config)
    targets = (4.0, 8.0, 20.0, 64.0)
    cold_probe, warm_probe = _CountingProbe(cal, kv), _CountingProbe(cal, kv)
    cold = {
        t: allocate_for_ratio(cal.error_tables, t, cal.config.scale_bits, cold_probe.measure) for t in targets
    }
    warm_cal = dataclasses.replace(cal, allocations={})
    context_allocations(warm_cal, warm_probe, targets)
    for t in targets:
        w = warm_cal.allocations[allocation_name(t)]
        assert w.meta["calibration_cr"] >= t
        assert warm_probe.measure(w) == pytest.approx(w.meta["calibration_cr"])  # a real encode, not a guess
        warm_probe.encodes -= 1
        # both bisections stop with the threshold inside a bracket under 0.01 decades wide
        assert abs(math.log10(w.meta["lambda"]) - math.log10(cold[t].meta["lambda"])) < 0.02
        assert abs(w.bits_per_token(32) - cold[t].bits_per_token(32)) <= 0.02 * cold[t].bits_per_token(32)
    assert warm_probe.encodes < 0.75 * cold_probe.encodes, (warm_probe.encodes, cold_probe.encodes)


def test_allocations_on_two_workers_equal_the_serial_ones(smollm, small_calibration) -> None:  # type: ignore[no-untyped-def]
    """The block bisections beside the context chain (one torch thread each) give every allocation
    the serial phase gives, bit for bit (allocation ids and measured ratios), and torch's thread
    count is restored."""
    import torch

    cal = small_calibration
    kv, _ = smollm.prefill(smollm.encode(" ".join(calibration_texts()[40:44]))[:, :600], return_logits=False)
    kv = compressible(kv, cal.config)
    targets = (8.0, 20.0, 64.0)
    threads = torch.get_num_threads()
    serial, parallel = dataclasses.replace(cal, allocations={}), dataclasses.replace(cal, allocations={})
    all_allocations(serial, kv, targets, (32,), workers=1)
    all_allocations(parallel, kv, targets, (32,), workers=2)
    assert torch.get_num_threads() == threads
    assert {n for n in serial.allocations if "@" not in n} == {allocation_name(t) for t in targets}
    assert sum(n.endswith("@p32") for n in serial.allocations) == len(targets)
    assert sum("@c" in n for n in serial.allocations) == 2 * len(targets)  # 468 tokens: 512 and 256 too
    assert list(parallel.allocations) == list(serial.allocations)
    for name, a in serial.allocations.items():
        b = parallel.allocations[name]
        assert b.allocation_id == a.allocation_id, name
        # the measured ratio is of real frames: where MKL's 1- and 2-thread matmuls round differently
        # (the session-22 Xeon) a DEFLATE stream can differ by a byte, so equal to 1e-5, not bit for bit
        assert b.meta == pytest.approx(a.meta, rel=1e-5), name


def test_parallel_prefill_gives_the_serial_kv_in_order_and_the_same_statistics(smollm) -> None:  # type: ignore[no-untyped-def]
    """Two sequences prefilled at once (each on its share of the threads) stream the same KV, in the
    sequences' order, and the statistics hooks firing from both workers add up to the serial sums.
    The same to float32 rounding, not bit for bit: MKL's matmuls on one thread and on two sum in
    different orders on some CPUs (the session-22 Xeon; the session-21 EPYC gave identical bits)."""
    import torch

    from kvbm_codec.calibration.calibrate import calibration_kv, token_sequences
    from kvbm_codec.calibration.statistics import gather_statistics

    seqs = token_sequences(smollm.tokenizer, calibration_texts(), 192, 5)
    n_q = int(smollm.model.config.num_attention_heads)
    threads = torch.get_num_threads()
    runs = {}
    for workers in (1, 2):
        with gather_statistics(smollm.model, n_q, smollm.info.key_head_dim) as stats:
            kvs = list(calibration_kv(smollm, seqs, progress=False, workers=workers))
        runs[workers] = (kvs, stats)
        assert torch.get_num_threads() == threads
    (serial, s1), (parallel, s2) = runs[1], runs[2]
    for a, b in zip(serial, parallel, strict=True):
        assert a.positions.equal(b.positions)
        for x, y in ((a.keys, b.keys), (a.values, b.values)):  # another order would be O(1) off
            assert float((x - y).double().pow(2).sum() / y.double().pow(2).sum()) < 1e-10
    assert s1.tokens == s2.tokens == 5 * 192
    torch.testing.assert_close(s2.query_sq_sum, s1.query_sq_sum, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(s2.residual_sum, s1.residual_sum, rtol=1e-5, atol=0.0)


def test_context_allocations_are_sized_per_frame_length(smollm, small_calibration) -> None:  # type: ignore[no-untyped-def]
    """A frame stores better the longer it is, so each context length gets its own allocation: on real
    KV of text the calibration never saw, the allocation ``context_codec`` picks lands at the target
    (to the 1% a text other than the held-out one may differ) at every length, where the plain one,
    sized on the longest frame the held-out tokens fill, falls short on the shortest context."""
    from kvbm_codec.eval.run import context_codec

    cal = small_calibration
    exact = cal.config.sink_tokens + cal.config.window_tokens
    plain, short = cal.allocations["cr20"], cal.allocations["cr20@c256"]
    assert plain.meta["compressed_tokens"] == 512 - exact  # the held-out sequence's compressible tokens
    assert short.meta["compressed_tokens"] == 256 - exact and short.meta["context_tokens"] == 256
    ids = smollm.encode(" ".join(calibration_texts()[40:44]))
    for n, expect in ((256, short), (400, short), (512, plain), (900, plain)):
        kv, _ = smollm.prefill(ids[:, :n], return_logits=False)
        codec = context_codec(cal, 20.0, kv)
        assert codec.alloc.allocation_id == expect.allocation_id, n
        achieved = codec.encode_with_stats(kv)[1].achieved_cr
        assert achieved >= 0.99 * 20.0, (n, achieved)
        if n == 256:
            assert KVTCCodec(cal, plain).encode_with_stats(kv)[1].achieved_cr < 0.99 * 20.0
    # a calibration made before per-length allocations (no frame lengths in the meta) keeps its one
    old = dataclasses.replace(cal, allocations={"cr20": dataclasses.replace(plain, meta={"target_cr": 20.0})})
    assert old.context_allocation(20.0, 10) is old.allocations["cr20"]


def test_bf16_fit_prefills_calibrate_as_well_as_float32(smollm) -> None:  # type: ignore[no-untyped-def]
    """The covariance prefills in bf16 (CausalLM.in_dtype) give a calibration whose codec, on the same
    held-out float32 KV, stores the same ratio at the same error as the float32 recipe's, with the
    metric's statistics gathered through the bf16 copy; the recipe says what its prefills ran in."""
    import torch

    from kvbm_codec.calibration.calibrate import calibrate
    from kvbm_codec.codec.config import CodecConfig

    cfg = CodecConfig(layer_group_size=6, distortion="attention", layer_sensitivity="analytic")
    kw = {"targets": (20.0,), "fit_sequences": 4, "seq_len": 512, "progress": False, "block_tokens": ()}
    exact = calibrate(smollm, calibration_texts(), cfg, **kw)
    cheap = calibrate(smollm, calibration_texts(), cfg, prefill_dtype="bfloat16", **kw)
    assert "fit_prefill_dtype" not in exact.provenance
    assert cheap.provenance["fit_prefill_dtype"] == "bfloat16"

    kv, _ = smollm.prefill(smollm.encode(" ".join(calibration_texts()[40:44]))[:, :700], return_logits=False)
    kv = compressible(kv, cfg)
    measured = {}
    for name, cal in (("exact", exact), ("cheap", cheap)):
        codec = KVTCCodec(cal, allocation_name(20.0))
        frame = codec.encode(kv)
        rec = codec.decode(frame).to(torch.float32)
        err = {
            kind: float((r - x).pow(2).sum() / x.pow(2).sum())
            for kind, r, x in (("k", rec.keys, kv.keys), ("v", rec.values, kv.values))
        }
        measured[name] = (kv.nbytes() / len(frame), err)
    (cr_e, err_e), (cr_c, err_c) = measured["exact"], measured["cheap"]
    assert cr_c == pytest.approx(cr_e, rel=0.05), measured
    for kind in ("k", "v"):
        assert err_c[kind] == pytest.approx(err_e[kind], rel=0.15), measured
