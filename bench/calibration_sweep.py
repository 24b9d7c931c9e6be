"""Choose the PCA layout and K/V weighting on *validation* text, never on the reported eval text.

One set of calibration prefills is reused for every configuration; each configuration is scored on
a slice of the calibration corpus far from the fitted tokens (pydoc topics, tokens 60k+), at the
same target ratios. Usage: python bench/calibration_sweep.py --out bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from kvbm_codec.calibration.calibrate import calibrate_from_kv, token_sequences
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.eval.metrics import perplexity, top1_agreement
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", default="1,6,30")
    p.add_argument("--key-weights", default="1.0,0.25")
    p.add_argument("--targets", default="20,32")
    p.add_argument("--normalize", default="1", help="normalize_heads values to try, e.g. 0,1")
    p.add_argument("--rank-caps", default="2048")
    p.add_argument(
        "--val-text",
        type=Path,
        action="append",
        default=[],
        help="validation text(s), never the reported ones; default: pydoc slice",
    )
    p.add_argument("--kv-cache", type=Path, default=None, help="reuse prefills saved here (torch.save)")
    p.add_argument("--fit-sequences", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench/results/sweep.json"))
    a = p.parse_args()
    lm = CausalLM.load("smollm2-135m")
    seqs = token_sequences(lm.tokenizer, calibration_texts(), 1024, 64)
    if a.kv_cache is not None and a.kv_cache.exists():
        fit, held = torch.load(a.kv_cache, weights_only=False)
    else:
        fit = [lm.prefill(s, return_logits=False)[0] for s in seqs[: a.fit_sequences]]
        held = lm.prefill(seqs[a.fit_sequences], return_logits=False)[0]
        if a.kv_cache is not None:
            torch.save((fit, held), a.kv_cache)
    vals = [torch.cat(seqs[60:63], dim=1)[:, : 2048 + 256]]  # ~60k tokens in: disjoint from the fit
    if a.val_text:
        vals = [
            lm.tokenizer(t.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][
                :, : 2048 + 256
            ]
            for t in a.val_text
        ]
    val_sets = []
    for val_ids in vals:
        ctx, cont = val_ids[:, :2048], val_ids[:, 2048:]
        kv = lm.prefill(ctx, return_logits=False)[0]
        val_sets.append((kv, cont, lm.logits_with_cache(kv, cont)))
    rows = []
    grid = itertools.product(
        map(int, a.groups.split(",")),
        map(float, a.key_weights.split(",")),
        map(int, a.normalize.split(",")),
        map(int, a.rank_caps.split(",")),
    )
    for g, kw, norm, rank in grid:
        t0 = time.perf_counter()
        cal = calibrate_from_kv(
            lm.info,
            fit,
            held,
            CodecConfig(
                layer_group_size=g, key_weight=kw, normalize_heads=bool(norm), rank_cap=rank, distortion="mse"
            ),
            targets=[float(t) for t in a.targets.split(",")],
            progress=False,
        )
        cal_s = time.perf_counter() - t0
        for name in cal.allocations:
            codec = KVTCCodec(cal, name)
            for vi, (kv, cont, ref) in enumerate(val_sets):
                frame, st = codec.encode_with_stats(kv)
                rec = codec.decode(frame)
                out = lm.logits_with_cache(rec.to(torch.float32), cont)
                pr, pt = perplexity(ref[:-1], cont[0, 1:]), perplexity(out[:-1], cont[0, 1:])
                row = {
                    "layer_group_size": g,
                    "key_weight": kw,
                    "normalize_heads": bool(norm),
                    "rank_cap": rank,
                    "allocation": name,
                    "val": vi,
                    "achieved_cr": st.achieved_cr,
                    "ppl_increase_pct": 100 * (pt / pr - 1),
                    "top1": top1_agreement(ref[:-1], out[:-1]),
                    "calibrate_s": cal_s,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
