"""The calibration's allocation step on a real small calibration and real SmolLM2 KV: the warm-started
context bisection lands where a cold one does, in fewer real encodes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kvbm_codec.calibration.calibrate import RatioProbe, compressible, context_allocations
from kvbm_codec.codec.allocation import allocate_for_ratio
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
