"""Where an S3 put's position search and layout check spend their time, per block, one thread.

Times the endpoint's own calls (``Bucket.place``, ``Bucket.misfit_many``, default binding) and
their stages on the 32 blocks ``bench throughput`` uses (the first 1024 tokens of the demo text),
in one batch of 8 and in one batch of 32, beside the batch-8 encode of the same blocks. Works on any
revision whose ``Bucket`` and ``PositionEstimator`` have these calls (run it with ``PYTHONPATH``
pointing at a copy of that revision: ``git archive REV | tar -x -C DIR``); stages a revision lacks
are skipped.

    python bench/position_search_profile.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def best(f: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import kvbm_codec
    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.bench.throughput import real_blocks
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.codec.layout_check import sample_tokens
    from kvbm_codec.core.service import ServedModel
    from kvbm_codec.frontends.s3.buckets import Bucket
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import BucketBinding

    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, None)
    s = cal.shape
    spec = BlockSpec(s.n_layers, 32, s.n_kv_heads, s.key_head_dim)
    rb = real_blocks(lm, spec, 32)
    bucket = Bucket(BucketBinding(page_size=32, dtype=spec.dtype), ServedModel("p", cal, spec, 20.0))
    est, chk = bucket.estimator(), bucket.checker()
    codec = KVTCBlockCodec.create(cal, spec, 20.0)
    out: dict[str, object] = {"tree": str(Path(kvbm_codec.__file__).parent.parent)}

    def run(nb: int) -> dict[str, float]:
        bl, data = rb.tensors[:nb], rb.data[:nb]
        keys, values = bucket._part(bl, 0), bucket._part(bl, 1)
        starts = est.candidates()[torch.topk(est.coarse_scores(keys), 4, dim=1).indices]
        placed = bucket.place(bl, [None] * nb)
        stages: dict[str, Callable[[], object]] = {
            "encode (batches of 8)": lambda: [
                codec.encode_many(rb.tensors[i : i + 8], rb.positions[i : i + 8], [True] * 8)
                for i in range(0, nb, 8)
            ],
            "Bucket.place": lambda: bucket.place(bl, [None] * nb),
            "Bucket.misfit_many (layout check)": lambda: bucket.misfit_many(data, bl, placed),
            "  keys fp16 -> fp32 copy (_part)": lambda: bucket._part(bl, 0),
            "  coarse_scores": lambda: est.coarse_scores(keys),
            f"  place_many, one call of {nb}": lambda: est.place_many(keys),
            "  key_residuals (one-pass refine, 4 candidates)": lambda: est.key_residuals(keys, starts),
            "  value_stats (values projected)": lambda: chk.value_stats(values),
        }
        if hasattr(est, "_quick"):  # this tree's two-pass refine and energy-only value check
            tok = sample_tokens(32, chk.tokens)
            stages[f"  place_many(residual=False), one call of {nb}"] = lambda: est.place_many(
                keys, residual=False
            )
            stages["  _quick (two-pass refine)"] = lambda: est._quick(keys, starts)
            stages["  value_energy (sampled tokens)"] = lambda: chk.value_energy(
                bucket._part(bl, 1, tokens=tok)
            )
        return {
            name: best(f, 3 if name.startswith("encode") else a.repeats) / nb * 1e3
            for name, f in stages.items()
        }

    for nb in (8, 32):
        row = run(nb)
        out[f"batch {nb}"] = row
        print(f"--- one batch of {nb} blocks, ms per block, one thread")
        for name, ms in row.items():
            print(f"{name:50s} {ms:8.3f}", flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
