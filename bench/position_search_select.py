"""Choose the position search's two-pass refine knobs on validation text (never on evaluation text).

For every block of the given texts (real keys at their true positions, ``position_blocks.py``) the
one-pass refine's table of residuals (per candidate, sampled token and layer group) is computed once;
each first-pass variant (which of the sampled tokens, which layer groups) is then scored offline: how
often its winner equals the one-pass winner, the smallest runner-up/winner residual ratio ("margin")
among blocks where it does not (a threshold must sit above it), and the share of blocks whose margin
clears each threshold (those skip the second pass). The same for values read as keys and for noise,
whose blocks should mostly fall back (their positions do not matter, their refusals do).

    python bench/position_search_select.py --spans validation --json bench/results/position_select.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from position_blocks import keys_of, spans, text_blocks

THRESHOLDS = (1.25, 1.5, 2.0, 3.0, 4.0)


def centred(t: int, q: int) -> tuple[int, ...]:
    """``q`` of ``t`` sampled tokens, evenly spaced and centred (what the search's first pass uses)."""
    return tuple(int((i + 0.5) * t / q) for i in range(q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--spans", default="validation", help="validation, evaluation or name:skip:tokens:first,..."
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kvbm-codec-position-blocks"))
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec.positions import PositionEstimator, PositionSearch
    from kvbm_codec.models.hf import CausalLM

    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    s = cal.shape
    spec = BlockSpec(s.n_layers, 32, s.n_kv_heads, s.key_head_dim)
    est = PositionEstimator(cal, PositionSearch(alignment=32))
    tables: dict[str, list[torch.Tensor]] = {"real keys": [], "values read as keys": [], "noise": []}
    truth_ok = 0
    n_real = 0
    g = torch.Generator().manual_seed(0)
    for name, skip, tokens, first in spans(a.spans):
        tb = text_blocks(lm, spec, name, tokens, a.cache, skip, first)
        for i in range(0, tb.blocks.shape[0], 8):
            for what, part in (("real keys", 0), ("values read as keys", 1)):
                if what != "real keys" and i % 64:
                    continue
                keys = keys_of(spec, tb.blocks[i : i + 8], part)
                starts = est.candidates()[torch.topk(est.coarse_scores(keys), 4, dim=1).indices]
                res, _ = est.residual_table(keys, starts)  # [N, K, T, G]
                tables[what].append(res)
                if what == "real keys":
                    win = starts[torch.arange(len(starts)), res.sum((2, 3)).argmin(1)]
                    truth_ok += int((win == tb.first[i : i + 8]).sum())
                    n_real += len(starts)
        keys = torch.randn(8, s.n_layers, 32, s.n_kv_heads, s.key_head_dim, generator=g)
        starts = est.candidates()[torch.topk(est.coarse_scores(keys), 4, dim=1).indices]
        tables["noise"].append(est.residual_table(keys, starts)[0])
        print(
            name,
            f"positions {int(tb.first[0])}-{int(tb.first[-1])}:",
            tb.blocks.shape[0],
            "blocks",
            flush=True,
        )
    t_n, g_n = tables["real keys"][0].shape[2:]
    variants = [
        (tq, gq)
        for nt in (1, 2, 3, 4)
        for tq in dict.fromkeys([tuple(range(t_n))[:: max(1, t_n // nt)][:nt], centred(t_n, nt)])
        for ng in range(1, g_n + 1)
        for gq in itertools.combinations(range(g_n), ng)
    ]
    out: dict[str, object] = {"positions_right": f"{truth_ok}/{n_real}", "variants": []}
    print("one-pass refine right on", out["positions_right"])
    for tq, gq in variants:
        row: dict[str, object] = {
            "tokens": list(tq),
            "groups": list(gq),
            "cost": len(tq) * len(gq) / (t_n * g_n),
        }
        for what, tabs in tables.items():
            res = torch.cat(tabs)
            full = res.sum((2, 3)).argmin(1)
            q = res[:, :, list(tq)][:, :, :, list(gq)].sum((2, 3))
            two = q.topk(2, dim=1, largest=False).values
            margin = two[:, 1] / two[:, 0].clamp_min(1e-30)
            agree = q.argmin(1) == full
            worst = float(margin[~agree].max()) if bool((~agree).any()) else 0.0
            row[what] = {
                "agree": float(agree.float().mean()),
                "worst_disagreeing_margin": worst,
                "skip_share": {str(th): float((margin >= th).float().mean()) for th in THRESHOLDS},
            }
        out["variants"].append(row)  # type: ignore[union-attr]
        r, v, z = (row[w] for w in ("real keys", "values read as keys", "noise"))
        print(
            f"tokens {list(tq)} groups {list(gq)} cost {row['cost']:.3f}: real agree {r['agree']:.4f} "  # type: ignore[index]
            f"worst-disagree margin {r['worst_disagreeing_margin']:.2f} "  # type: ignore[index]
            f"skip@2 {r['skip_share']['2.0']:.3f} skip@1.5 {r['skip_share']['1.5']:.3f}; "  # type: ignore[index]
            f"values worst {v['worst_disagreeing_margin']:.2f} "  # type: ignore[index]
            f"noise worst {z['worst_disagreeing_margin']:.2f}",  # type: ignore[index]
            flush=True,
        )
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
