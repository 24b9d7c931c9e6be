"""Markdown tables for docs/benchmarks.md from bench/accuracy_sweep.py's JSON lines.

python bench/render_accuracy_tables.py [--sets=apache,tempest,...] bench/results/accuracy_*.jsonl
python bench/render_accuracy_tables.py --dominance OLD/bench.json NEW/bench.json

--sets: the validation texts the ablation table averages over (a variant missing any is left out).
--dominance: the harness' Pareto check of two runs (two calibrations) side by side, per lossy baseline.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("context_sizing", 1) >= 2:  # allocations sized per context length: its own row
                    r["distortion"] += " (per-length)"
                rows[(r["corpus"], r["distortion"], r["target"], r["val"])] = r  # last run wins
    return list(rows.values())


def validation(rows: list[dict]) -> str:
    val = [r for r in rows if not r["report"] and not r["corpus"].startswith("-")]
    sets = sorted({r["val"] for r in val})
    by = defaultdict(dict)
    for r in val:
        by[(r["corpus"], r["distortion"], r["target"])][r["val"]] = r
    head = "| corpus | distortion | target | " + " | ".join(f"{s}: CR / ppl / top-1" for s in sets)
    out = [head + " | mean top-1 | mean ppl | mean KL |", "|" + "---|" * (len(sets) + 6)]
    for (corpus, dist, target), cells in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        parts = []
        for s in sets:
            c = cells.get(s)
            parts.append(
                f"{c['achieved_cr']:.1f}x / {c['ppl_increase_pct']:+.2f}% / {100 * c['top1']:.1f}%"
                if c
                else "-"
            )
        got = list(cells.values())
        mt = 100 * sum(c["top1"] for c in got) / len(got)
        mp = sum(c["ppl_increase_pct"] for c in got) / len(got)
        mk = sum(c["kl"] for c in got) / len(got)
        out.append(
            f"| {corpus} | {dist} | {target:g}x | "
            + " | ".join(parts)
            + f" | {mt:.1f}% | {mp:+.2f}% | {mk:.4f} |"
        )
    return "\n".join(out)


def ablation(rows: list[dict], sets: list[str]) -> str:
    """Means over the validation texts every variant was scored on, one row per target and variant:
    the ablation at a glance (corpus x distortion, or any later variant)."""
    val = [r for r in rows if not r["report"] and not r["corpus"].startswith("-") and r["val"] in sets]
    by = defaultdict(dict)
    for r in val:
        by[(r["target"], r["corpus"], r["distortion"])][r["val"]] = r
    out = [
        "| target | corpus | distortion | mean CR | mean ppl increase | mean top-1 | mean KL | texts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (target, corpus, dist), cells in sorted(by.items()):
        got = [cells[s] for s in sets if s in cells]
        if len(got) < len(sets):
            continue  # only variants scored on every text compare fairly
        n = len(got)
        out.append(
            f"| {target:g}x | {corpus} | {dist} | {sum(c['achieved_cr'] for c in got) / n:.1f}x | "
            f"{sum(c['ppl_increase_pct'] for c in got) / n:+.2f}% | "
            f"{100 * sum(c['top1'] for c in got) / n:.1f}% | {sum(c['kl'] for c in got) / n:.4f} | {n} |"
        )
    return "\n".join(out)


def lodo(rows: list[dict]) -> str:
    out = [
        "| left out | distortion | target | on the left-out domain: CR / ppl / top-1 / KL "
        "| broad (all domains): CR / ppl / top-1 / KL |",
        "|---|---|---|---|---|",
    ]
    full = {
        (r["distortion"], r["target"], r["val"]): r
        for r in rows
        if r["corpus"] == "broad" and not r["report"]
    }
    for r in sorted((r for r in rows if r["corpus"].startswith("-")), key=lambda r: (r["val"], r["target"])):
        if r["val"] != r["corpus"][1:]:
            continue
        b = full.get((r["distortion"], r["target"], r["val"]))
        fmt = lambda c: (  # noqa: E731
            f"{c['achieved_cr']:.1f}x / {c['ppl_increase_pct']:+.2f}% / "
            f"{100 * c['top1']:.1f}% / {c['kl']:.4f}"
        )
        out.append(
            f"| {r['val']} | {r['distortion']} | {r['target']:g}x | {fmt(r)} | {fmt(b) if b else '-'} |"
        )
    return "\n".join(out)


def report(rows: list[dict]) -> str:
    rep = [r for r in rows if r["report"]]
    out = []
    for text in ("gpl", "hamlet"):
        out += [
            f"\n**{text}**\n",
            "| corpus | distortion | target | achieved CR (compressed tokens) | CR incl. sinks+window "
            "| ppl | "
            "ppl increase | top-1 | KL |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            (r for r in rep if r["val"] == text), key=lambda r: (r["corpus"], r["distortion"], r["target"])
        ):
            out.append(
                f"| {r['corpus']} | {r['distortion']} | {r['target']:g}x | {r['achieved_cr']:.1f}x | "
                f"{r['achieved_cr_total']:.1f}x | {r['ppl_ref']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
                f"{100 * r['top1']:.1f}% | {r['kl']:.4f} |"
            )
    return "\n".join(out)


MEASURES = (("top1", "top-1"), ("ppl_increase_pct", "ppl"), ("kl", "KL"), ("task_acc", "task"))
LOSSLESS = ("reference", "lossless")


def _dominated(bench: dict, method: str) -> str:
    """Measures on which some KVTC row at >= the baseline's ratio is at least as accurate, each with the
    least-compressing such row (the harness' `dominance`, point estimates); "all four (X)" when one row
    X dominates on every measure."""
    ratio = {s["method"]: s["ratio"] for s in bench["summary"]}
    dom = bench["dominance"].get(method, {})
    every = set.intersection(*(set(dom.get(k, [])) for k, _ in MEASURES))
    if every:
        return f"all four ({min(every, key=lambda m: ratio[m])})"
    got = [f"{label} ({min(dom[k], key=lambda m: ratio[m])})" for k, label in MEASURES if dom.get(k)]
    return ", ".join(got)


def _matched(bench: dict, method: str) -> str:
    """The paired difference against the ratio-matched KVTC row, measures whose 95% CI excludes 0."""
    for c in bench["comparisons"]:
        if c["a"] == method and c["b"].startswith("kvtc@") and "+" not in c["b"]:
            sep = [
                label
                for key, label in (
                    ("top1", "top-1"),
                    ("ppl_ratio_pct", "ppl"),
                    ("task_acc", "task"),
                    ("answer_nll", "answer NLL"),
                )
                if c.get(key, {}).get("separated")
            ]
            return f"{c['b']}: " + (", ".join(sep) if sep else "none")
    return "-"


def dominance_side_by_side(old: dict, new: dict) -> str:
    """Per lossy baseline: what the old calibration's KVTC rows dominated it on, and the new one's."""
    rn = {s["method"]: s for s in new["summary"]}
    ro = {s["method"]: s for s in old["summary"]}
    out = [
        f"| baseline | CR | dominated on, old calibration `{old['calibration_id']}` "
        f"| dominated on, new calibration `{new['calibration_id']}` "
        "| new: separated vs the ratio-matched row |",
        "|---|---|---|---|---|",
    ]
    for m in new["methods"]:
        s = rn.get(m)
        if s is None or s["family"] in LOSSLESS or s["family"].startswith("kvtc"):
            continue
        old_cell = _dominated(old, m) if m in ro else "-"
        out.append(
            f"| {m} | {s['ratio']:.2f}x | {old_cell or 'none'} | {_dominated(new, m) or 'none'} "
            f"| {_matched(new, m)} |"
        )
    return "\n".join(out)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--dominance":
        old, new = (json.loads(Path(a).read_text()) for a in args[1:3])
        print(dominance_side_by_side(old, new))
        return
    sets = ["apache", "tempest", "code", "dialogue", "multilingual"]
    if args and args[0].startswith("--sets="):
        sets = args.pop(0).split("=", 1)[1].split(",")
    rows = load(args)
    print("## validation\n")
    print(validation(rows))
    print(f"\n## ablation (means over {', '.join(sets)})\n")
    print(ablation(rows, sets))
    print("\n## leave one domain out\n")
    print(lodo(rows))
    print("\n## held-out report\n")
    print(report(rows))


if __name__ == "__main__":
    main()
