"""Keep a few more tokens exact where the codec errs most: does it beat spending those bytes on bits?

Issue 16 asks whether tokens beyond the sinks and the recent window should be stored exactly. The
frame format already carries any set of raw tokens (``KVTCCodec.encode_with_stats(raw_mask=...)``),
so every row here is a real frame, decoded and scored: on VALIDATION text only (the accuracy sweep's
slices and cache), the default calibration's allocation at a target, plus the k compressible tokens
chosen by one rule, stored raw. Rules: ``error`` (the tokens whose decoded KV errs most, each layer
and kind's squared error divided by that layer and kind's mean square: needs a first encode),
``keynorm`` (largest de-rotated key norm, summed over layers: no first encode).

A variant helps only if its KL is below the plain codec's at the same ratio. The ratio is
``achieved_cr_total`` (all fp16 bytes over frame bytes, the same for every variant of a text), and the
plain curve between two targets is interpolated in log KL vs log ratio.

    python bench/exact_tokens.py --state /tmp/acc8/state.pt --val-cache /tmp/acc8/val \
        --val apache,tempest,code,dialogue,multilingual --out bench/results/exact_tokens_s21.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.codec.kvtc import KVTCCodec, default_raw_mask
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.eval.metrics import kl_divergence_mean
from kvbm_codec.eval.run import context_codec
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM


def token_scores(rule: str, kv: KVCache, rec: KVCache | None, rope: object) -> torch.Tensor:
    """[n_tokens]: how much each token would gain from being exact (higher first)."""
    if rule == "keynorm":
        keys = undo_rope(kv.keys, kv.positions, rope)  # type: ignore[arg-type]
        return keys.pow(2).sum(-1).sum(1).sum(0)  # over dims, heads, layers
    assert rec is not None
    score = torch.zeros(kv.n_tokens, dtype=torch.float64)
    for x, r in ((kv.keys, rec.keys), (kv.values, rec.values)):
        err = (r.to(torch.float64) - x.to(torch.float64)).pow(2).sum(-1).sum(1)  # [layers, tokens]
        score += (err / x.to(torch.float64).pow(2).sum(-1).sum(1).mean(1, keepdim=True)).sum(0)
    return score


def score_frame(lm: CausalLM, codec: KVTCCodec, val: tuple, mask: torch.Tensor) -> tuple[dict, KVCache]:
    """One real frame of the text's KV with ``mask``'s tokens raw: its total ratio and output KL."""
    kv, cont, ref = val
    frame, st = codec.encode_with_stats(kv, raw_mask=mask)
    rec = codec.decode(frame).to(torch.float32)
    kl = kl_divergence_mean(ref[:-1], lm.logits_with_cache(rec, cont)[:-1])
    return {"cr_total": st.achieved_cr_total, "raw_tokens": st.raw_tokens, "kl": kl}, rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True, help="the accuracy sweep's phase-1 state")
    ap.add_argument("--val-cache", type=Path, required=True)
    ap.add_argument("--val", default="apache,tempest,code,dialogue,multilingual")
    ap.add_argument("--targets", default="16,20,32")
    ap.add_argument("--base", type=float, default=20.0, help="the allocation the variants start from")
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--rules", default="error,keynorm")
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    configure_fp32_matmul()
    sys.path.insert(0, str(Path(__file__).parent))
    from accuracy_sweep import check_state_model, val_sets  # type: ignore[import-not-found]

    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    state = torch.load(a.state, weights_only=False)
    check_state_model(state, lm.info.fingerprint, "smollm2-135m", a.state)
    cfg = cal.config
    rows = []
    for name, _, val in val_sets(lm, state, a.val.split(","), False, a.val_cache):
        kv = val[0]
        base_mask = default_raw_mask(kv.positions, cfg.sink_tokens, cfg.window_tokens)
        base_rec = None
        for t in (float(x) for x in a.targets.split(",")):
            row, rec = score_frame(lm, context_codec(cal, t, kv), val, base_mask)
            rows.append({"val": name, "target": t, "rule": "plain", "k": 0, **row})
            base_rec = rec if t == a.base else base_rec
        codec = context_codec(cal, a.base, kv)
        for rule in a.rules.split(","):
            s = token_scores(rule, kv, base_rec, cal.rope)
            s[base_mask] = -math.inf
            for k in (int(x) for x in a.ks.split(",")):
                mask = base_mask.clone()
                mask[torch.topk(s, k).indices] = True
                row, _ = score_frame(lm, codec, val, mask)
                rows.append({"val": name, "target": a.base, "rule": rule, "k": k, **row})
        for r in rows[-(len(a.targets.split(",")) + len(a.rules.split(",")) * len(a.ks.split(","))) :]:
            print(json.dumps(r), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summarise(rows)


def summarise(rows: list[dict]) -> None:
    """Each variant's KL over the plain curve's at its own ratio (log-log interpolation)."""
    for name in sorted({r["val"] for r in rows}):
        plain = sorted((r["cr_total"], r["kl"]) for r in rows if r["val"] == name and r["rule"] == "plain")
        for r in (r for r in rows if r["val"] == name and r["rule"] != "plain"):
            head = f"{name:12s} {r['rule']:8s} k={r['k']:3d} cr_total {r['cr_total']:.2f} KL {r['kl']:.4f}"
            for (c0, k0), (c1, k1) in itertools.pairwise(plain):
                if c0 <= r["cr_total"] <= c1:
                    f = math.log(r["cr_total"] / c0) / math.log(c1 / c0)
                    expect = math.exp(math.log(k0) + f * math.log(k1 / k0))
                    print(f"{head} / plain {expect:.4f} = {r['kl'] / expect:.2f}x")
                    break
            else:
                print(f"{head}: outside the plain curve")


if __name__ == "__main__":
    main()
