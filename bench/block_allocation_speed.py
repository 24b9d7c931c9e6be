"""Block allocation sizing, side by side: the full bisection on every held-out block vs the warm start
from the context allocation's lambda on the 64-block subset that calibration now uses (seconds,
encodes, and the ratio each allocation reaches on every block). A timing check: it prefills the demo
document, neither a calibration nor an evaluation text, and chooses nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch

from kvbm_codec import texts
from kvbm_codec.calibration import calibrate as C
from kvbm_codec.calibration.cache import load_or_calibrate
from kvbm_codec.codec.allocation import Allocation, allocate_for_ratio
from kvbm_codec.codec.params import allocation_name
from kvbm_codec.models.hf import CausalLM


def main() -> None:
    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)
    ids = lm.tokenizer(texts.demo_document())["input_ids"][:6144]
    kv, _ = lm.prefill(torch.tensor([ids]), return_logits=False)
    kv = C.compressible(kv, cal.config)
    every = C.BlockRatioProbe(cal, kv, 32, max_blocks=10**6)
    subset = C.BlockRatioProbe(cal, kv, 32)
    bits = cal.config.scale_bits
    for target in (8, 20, 64):
        calls = {"old": 0, "new": 0}

        def counted(probe: C.BlockRatioProbe, key: str, calls: dict[str, int] = calls) -> Callable:
            def measure(a: Allocation) -> float:
                calls[key] += 1
                return probe.measure(a)

            return measure

        lam = cal.allocations[allocation_name(target)].meta["lambda"]
        t0 = time.perf_counter()
        old = allocate_for_ratio(cal.error_tables, target, bits, counted(every, "old"))
        t1 = time.perf_counter()
        new = allocate_for_ratio(cal.error_tables, target, bits, counted(subset, "new"), near=lam)
        t2 = time.perf_counter()
        row = {
            "target": target,
            "old_s": round(t1 - t0, 1),
            "new_s": round(t2 - t1, 1),
            "old_encodes": calls["old"],
            "new_encodes": calls["new"],
            "old_ratio_all_blocks": round(every.measure(old), 3),
            "new_ratio_all_blocks": round(every.measure(new), 3),
            "old_bits": old.meta["nominal_bits_per_token"],
            "new_bits": new.meta["nominal_bits_per_token"],
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
