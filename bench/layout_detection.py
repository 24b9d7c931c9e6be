"""How reliably the S3 endpoint's layout check refuses blocks of the wrong layout, and what it costs.

A PUT of the right length but another layout (a KVBM block sent to a vLLM-bound bucket, a vLLM chunk
sent to a KVBM bucket, K and V swapped, vLLM keys untransposed) must be refused, never stored as
garbage; a block of the right layout must be accepted. This builds ``--blocks`` real SmolLM2 KV
blocks from a text the calibration never saw (the Apache licence by default: kept out of the
calibration corpus), bytes of every case from them, and runs them through the endpoint's own path
(``Bucket.to_block``, ``Bucket.place``, ``Bucket.misfit_many``) with the DEFAULT calibration (the
one ``load_or_calibrate`` returns; cached in the local registry, not recomputed if present).

Per case: blocks refused / blocks, and for the correct cases that is the false-refusal count. Cost:
placement (position search) and check per block, one thread, batches of ``--batch`` blocks (what
concurrent PUTs get). ``--details`` also prints the check's per-block figures.
The energies printed are the absolute test's figures (median sampled token's normalised energy over
the calibration's, keys at the recovered position), outside the timed part.
Usage: python bench/layout_detection.py [--text FILE] [--blocks 48] [--first-block 2] [--batch 8]
       [--energy-limit X|none] [--margin M|none] [--json OUT] [--details]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

APACHE = Path("/usr/share/common-licenses/Apache-2.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=APACHE, help="held-out text (not in the calibration corpus)")
    ap.add_argument("--blocks", type=int, default=48, help="blocks per case (>= 32)")
    ap.add_argument("--first-block", type=int, default=2, help="first block index into the text")
    ap.add_argument("--batch", type=int, default=8, help="blocks placed and checked together")
    ap.add_argument("--energy-limit", default="default", help="layout_energy_limit: a number, none, default")
    ap.add_argument("--margin", default="default", help="layout_margin: a number, none, default")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--details", action="store_true")
    args = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec, kv_to_block
    from kvbm_codec.api.vllm_layout import VllmCpuLayout
    from kvbm_codec.calibration.cache import load_or_calibrate
    from kvbm_codec.core.service import ServedModel
    from kvbm_codec.frontends.s3.buckets import Bucket
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import BucketBinding

    spec = BlockSpec(30, 32, 3, 64)
    lm = CausalLM.load()
    cal, _, fresh = load_or_calibrate(lm, progress=False)
    print(f"calibration {cal.calibration_id} ({'computed now' if fresh else 'from the registry'})")
    ids = lm.tokenizer(args.text.read_text(), return_tensors="pt")["input_ids"]
    first, n = args.first_block, args.blocks
    need = (first + n) * spec.page_size
    if ids.shape[1] < need:
        raise SystemExit(f"{args.text} has {ids.shape[1]} tokens; {need} needed for {n} blocks from {first}")
    t0 = time.perf_counter()
    kv, _ = lm.prefill(ids[:, :need], return_logits=False)
    print(f"prefill of {need} tokens of {args.text.name}: {time.perf_counter() - t0:.1f} s")
    blocks = [
        kv_to_block(kv.select_tokens(torch.arange(b * 32, (b + 1) * 32)), spec).contiguous()
        for b in range(first, first + n)
    ]
    extra: dict[str, float | None] = {}
    for field, value in (("layout_energy_limit", args.energy_limit), ("layout_margin", args.margin)):
        if value != "default":
            extra[field] = None if value == "none" else float(value)
    model = ServedModel("bench", cal, spec, 20.0)
    buckets = {
        "kvbm": Bucket(BucketBinding(name="kvbm-bench", **extra), model),
        "vllm": Bucket(BucketBinding(name="vllm-bench", layout="vllm-cpu", **extra), model),
    }
    vllm, vllm_td = VllmCpuLayout(spec), VllmCpuLayout(spec, "td")

    def chunk(b: torch.Tensor) -> bytes:
        return vllm.block_to_chunk(b).numpy().tobytes()

    def swapped(b: torch.Tensor) -> torch.Tensor:
        return b.flip(1).contiguous()

    cases: list[tuple[str, str, bool, Callable[[torch.Tensor], bytes]]] = [
        ("KVBM block -> KVBM bucket", "kvbm", True, spec.to_bytes),
        ("vLLM chunk -> vLLM bucket", "vllm", True, chunk),
        ("KVBM block -> vLLM bucket", "vllm", False, spec.to_bytes),
        ("vLLM chunk -> KVBM bucket", "kvbm", False, chunk),
        ("KVBM block, K/V swapped -> KVBM bucket", "kvbm", False, lambda b: spec.to_bytes(swapped(b))),
        ("vLLM chunk, K/V swapped -> vLLM bucket", "vllm", False, lambda b: chunk(swapped(b))),
        (
            "vLLM chunk, keys [tokens, head_dim] -> vLLM bucket",
            "vllm",
            False,
            lambda b: vllm_td.block_to_chunk(b).numpy().tobytes(),
        ),
    ]
    torch.set_num_threads(1)
    rows = []
    for name, which, correct, make in cases:
        bucket = buckets[which]
        data = [make(b) for b in blocks]
        refused = 0
        place_s = check_s = 0.0
        reasons: list[str | None] = []
        energies: list[tuple[float, float]] = []
        for i in range(0, n, args.batch):
            part = data[i : i + args.batch]
            t0 = time.perf_counter()
            tensors = [bucket.to_block(d) for d in part]
            placed = bucket.place(tensors, [None] * len(tensors))
            t1 = time.perf_counter()
            why = bucket.misfit_many(part, tensors, placed)
            t2 = time.perf_counter()
            place_s, check_s = place_s + t1 - t0, check_s + t2 - t1
            reasons += why
            refused += sum(w is not None for w in why)
            shape = (spec.n_layers, 2, spec.page_size, spec.n_kv_heads, spec.head_dim)
            values = torch.stack([t.reshape(shape)[:, 1] for t in tensors]).float()
            _, value_energy = bucket.checker().value_stats(values)
            energies += [(p.key_energy, float(v)) for p, v in zip(placed, value_energy, strict=True)]
        row = {
            "case": name,
            "correct_layout": correct,
            "refused": refused,
            "blocks": n,
            "place_ms_per_block": place_s / n * 1e3,
            "check_ms_per_block": check_s / n * 1e3,
            "refused_by_energy": sum("energy" in w for w in reasons if w),
            "refused_by_relative": sum("fits the calibration" in w for w in reasons if w),
            "key_energy": [min(e[0] for e in energies), max(e[0] for e in energies)],
            "value_energy": [min(e[1] for e in energies), max(e[1] for e in energies)],
        }
        rows.append(row)
        verdict = f"false refusals {refused}/{n}" if correct else f"refused {refused}/{n}"
        print(
            f"{name:<52} {verdict:<22} place {row['place_ms_per_block']:6.1f} ms/block  "
            f"check {row['check_ms_per_block']:6.1f} ms/block  energy keys "
            f"{row['key_energy'][0]:.2f}-{row['key_energy'][1]:.2f} values "
            f"{row['value_energy'][0]:.2f}-{row['value_energy'][1]:.2f}"
        )
        if args.details:
            for i, w in enumerate(reasons):
                if (w is None) != correct:
                    print(f"    block {first + i}: {w or 'accepted'}")
    ok = all(r["refused"] == (0 if r["correct_layout"] else r["blocks"]) for r in rows)
    print("every wrong block refused and every right one accepted" if ok else "DETECTION INCOMPLETE")
    if args.json:
        args.json.write_text(
            json.dumps({"calibration": cal.calibration_id, "text": args.text.name, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
