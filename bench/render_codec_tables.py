"""Render the JSON results of bench/codec_report.sh and the sweeps as markdown tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(path: Path) -> str:
    rows = json.loads(path.read_text())
    rows = rows if isinstance(rows, list) else [rows]
    out = [
        "| target | achieved CR (compressed tokens) | CR incl. sinks+window | perplexity | "
        "ppl increase | top-1 agreement | key rel. MSE | value rel. MSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['target_cr']:g}x | {r['achieved_cr']:.1f}x | {r['achieved_cr_total']:.1f}x | "
            f"{r['ppl_baseline']:.3f} -> {r['ppl_codec']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
            f"{100 * r['top1_agreement']:.1f}% | {r['key_rel_mse']:.4f} | {r['value_rel_mse']:.4f} |"
        )
    return "\n".join(out)


def sweep(paths: list[Path], names: list[str]) -> str:
    out = [
        "| layers per basis | rank cap | per-head norm | target | "
        + " | ".join(f"{n}: CR / ppl / top-1" for n in names)
        + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    rows = [r for p in paths for r in json.loads(p.read_text())]
    keys = []
    for r in rows:
        k = (r["layer_group_size"], r.get("rank_cap", 2048), r["normalize_heads"], r["allocation"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for vi in range(len(names)):
            m = [
                r
                for r in rows
                if (r["layer_group_size"], r.get("rank_cap", 2048), r["normalize_heads"], r["allocation"])
                == k
                and r.get("val", 0) == vi
            ]
            if m:
                r = m[0]
                cells.append(
                    f"{r['achieved_cr']:.1f}x / {r['ppl_increase_pct']:+.2f}% / {100 * r['top1']:.1f}%"
                )
            else:
                cells.append("")
        out.append(
            f"| {k[0]} | {k[1]} | {'yes' if k[2] else 'no'} | {k[3][2:]}x | " + " | ".join(cells) + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "curve":
        print(curve(Path(sys.argv[2])))
    else:
        names = sys.argv[2].split(",")
        print(sweep([Path(p) for p in sys.argv[3:]], names))
