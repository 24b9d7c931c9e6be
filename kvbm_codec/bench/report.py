"""Turn per-(method, context) rows into the one picture operators choose by: ratio vs accuracy.

Ratios aggregate as total fp16 bytes / total stored bytes over all contexts (a byte-weighted mean, what a
storage tier actually sees); accuracies are means over contexts; task accuracy is also paired against
fp16 on the same prompts (`lost` = prompts fp16 answered right and the method got wrong).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from kvbm_codec.bench import stats

FAMILY_COLORS = {
    "reference": "black",
    "lossless": "tab:gray",
    "quantization": "tab:blue",
    "pca-incumbent": "tab:purple",
    "eviction": "tab:orange",
    "kvtc": "tab:green",
    "kvtc+eviction": "tab:olive",
}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(bench: dict[str, Any]) -> list[dict[str, Any]]:
    rows = bench["results"]
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    ref = {r["item"]: r for r in by_method.get("fp16", []) if "correct" in r}
    out = []
    for name in bench["methods"]:
        rs = by_method[name]
        if not rs:  # a run stopped by its budget before any context: nothing to summarize
            continue
        lm = [r for r in rs if r["kind"] == "lm"]
        tasks = [r for r in rs if "correct" in r]
        per_task: dict[str, list[bool]] = defaultdict(list)
        for r in tasks:
            per_task[r["kind"]].append(bool(r["correct"]))
        fp16 = sum(r["fp16_bytes"] for r in rs)
        out.append(
            {
                "method": name,
                "family": rs[0]["family"],
                "ratio": fp16 / sum(r["stored_bytes"] for r in rs),
                "ratio_lm": (sum(r["fp16_bytes"] for r in lm) / sum(r["stored_bytes"] for r in lm))
                if lm
                else None,
                "ppl_increase_pct": _mean([r["ppl_increase_pct"] for r in lm]),
                "top1": _mean([r["top1"] for r in lm]),
                "kl": _mean([r["kl"] for r in lm]),
                "task_acc": _mean([float(r["correct"]) for r in tasks]),
                "task_acc_by_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
                "task_n": len(tasks),
                "lost_vs_fp16": sum(
                    1 for r in tasks if ref.get(r["item"], {}).get("correct") and not r["correct"]
                ),
                "gained_vs_fp16": sum(
                    1 for r in tasks if r["item"] in ref and not ref[r["item"]]["correct"] and r["correct"]
                ),
                "answer_nll": _mean([r["answer_nll"] for r in tasks if "answer_nll" in r]),
                "encode_mbps_core": fp16 / 1e6 / max(1e-9, sum(r["encode_s"] for r in rs)),
                "decode_mbps_core": fp16 / 1e6 / max(1e-9, sum(r["decode_s"] for r in rs)),
            }
        )
    return out


MEASURES = (
    # key in summary, label, higher is better
    ("top1", "top-1", True),
    ("ppl_increase_pct", "ppl +%", False),
    ("kl", "KL", False),
    ("task_acc", "task acc", True),
)


def _by_item(rows: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    return {r["item"]: r for r in rows if r["method"] == method}


def paired(bench: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """a minus b on the same contexts: top-1 and NLL per continuation position (block bootstrap), task
    correctness and answer NLL per prompt (bootstrap; exact McNemar for correctness)."""
    ra, rb = _by_item(bench["results"], a), _by_item(bench["results"], b)
    common = [k for k in ra if k in rb]
    lm = [k for k in common if ra[k]["kind"] == "lm" and "top1_hits" in ra[k] and "top1_hits" in rb[k]]
    tk = [k for k in common if "correct" in ra[k] and "correct" in rb[k]]
    out: dict[str, Any] = {"a": a, "b": b}
    if lm:
        hits = (
            [[float(c) for c in ra[k]["top1_hits"]] for k in lm],
            [[float(c) for c in rb[k]["top1_hits"]] for k in lm],
        )
        out["top1"] = stats.paired_positions(*hits).as_dict()
        d = stats.paired_positions([ra[k]["nll"] for k in lm], [rb[k]["nll"] for k in lm])
        # mean NLL difference -> perplexity ratio: exp(d) - 1 in percent
        out["ppl_ratio_pct"] = {
            **d.as_dict(),
            "mean": 100 * math.expm1(d.mean),
            "lo": 100 * math.expm1(d.lo),
            "hi": 100 * math.expm1(d.hi),
        }
    if tk:
        out["task_acc"] = stats.paired_prompts(
            [float(ra[k]["correct"]) for k in tk], [float(rb[k]["correct"]) for k in tk], binary=True
        ).as_dict()
        if all("answer_nll" in ra[k] and "answer_nll" in rb[k] for k in tk):
            out["answer_nll"] = stats.paired_prompts(
                [ra[k]["answer_nll"] for k in tk], [rb[k]["answer_nll"] for k in tk], binary=False
            ).as_dict()
    return out


def matched_kvtc(summary: list[dict[str, Any]], ratio: float) -> str | None:
    """The KVTC row a baseline is tested against: the least-compressing KVTC row that still compresses at
    least as much (chosen by ratio only, never by accuracy), else the most-compressing one."""
    kvtc = sorted((s["ratio"], s["method"]) for s in summary if s["family"] == "kvtc")
    if not kvtc:
        return None
    at_least = [m for r, m in kvtc if r >= ratio]
    return at_least[0] if at_least else kvtc[-1][1]


def dominance(summary: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """For each non-KVTC row and measure: KVTC rows at >= its ratio that are at least as accurate."""
    kvtc = [s for s in summary if s["family"] == "kvtc"]
    out: dict[str, dict[str, list[str]]] = {}
    for s in summary:
        if s["family"] == "kvtc":
            continue
        out[s["method"]] = {}
        for key, _, higher in MEASURES:
            if s[key] is None:
                continue
            out[s["method"]][key] = [
                k["method"]
                for k in kvtc
                if k[key] is not None
                and k["ratio"] >= s["ratio"]
                and (k[key] >= s[key] if higher else k[key] <= s[key])
            ]
    return out


def comparisons(bench: dict[str, Any], summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every non-KVTC row against its ratio-matched KVTC row; KVTC-on-eviction rows against both parts."""
    out = []
    for s in summary:
        if s["family"] in ("kvtc", "reference"):
            continue
        if s["family"] == "kvtc+eviction":
            kv_part, _, ev_part = s["method"].partition("+")
            for other in (kv_part, ev_part):
                if any(x["method"] == other for x in summary):
                    out.append(paired(bench, s["method"], other))
            continue
        ref = matched_kvtc(summary, s["ratio"])
        if ref is not None:
            out.append(paired(bench, s["method"], ref))
    return out


def _ci(d: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    if d is None:
        return "-"
    if math.isnan(d["lo"]):
        return f"{d['mean'] * scale:{fmt}} (too few to test)"
    star = "*" if d["separated"] else ""
    return f"{d['mean'] * scale:{fmt}} [{d['lo'] * scale:{fmt}}, {d['hi'] * scale:{fmt}}]{star}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(bench: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    suite = bench["suite"]
    tasks = sorted({t for s in summary for t in s["task_acc_by_task"]})
    head = (
        "| method | family | CR | ppl +% | top-1 | KL | task acc | "
        + " | ".join(tasks)
        + (" | " if tasks else "")
        + "lost vs fp16 | enc MB/s/core | dec MB/s/core |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    # contexts actually computed (or cached), by kind
    ran = Counter({r["item"]: r["kind"] for r in bench["results"]}.values())
    n_windows = ran["lm"]
    prompts = ", ".join(f"{t} x {ran[t]}" for t in suite["tasks"]) or "none"
    lines = [
        f"# kvbm-codec bench: {bench['model']}, suite `{suite['name']}`",
        "",
        f"LM windows: {n_windows} x ({suite['lm_context_tokens']} context + "
        f"{suite['lm_continuation_tokens']} continuation tokens); tasks: {prompts} prompts of "
        f"~{suite['task_context_tokens']} tokens (what ran; the suite asks for {suite['lm_windows']} "
        f"windows, as many as the text holds, and {suite['task_instances']} prompts per task). "
        f"Calibration: {bench['calibration_id']}. Wall time {bench['wall_s']:.0f} s, CPU time "
        f"{bench.get('cpu_s', 0):.0f} s (all threads; 1-min load average at start/end: "
        f"{', '.join(f'{x:.1f}' for x in bench.get('load_average', []))}).",
        "",
        "CR = fp16 bytes of the full context KV / stored bytes (headers, scales, raw tokens, positions "
        "included), over all contexts. ppl/top-1/KL: teacher-forced continuation vs the fp16 cache.",
        "",
        head,
        sep,
    ]
    for s in summary:
        cells = [
            s["method"],
            s["family"],
            _f(s["ratio"], ".2f"),
            _f(s["ppl_increase_pct"], ".2f"),
            _f(s["top1"], ".3f"),
            _f(s["kl"], ".4f"),
            "-" if s["task_acc"] is None else f"{s['task_acc']:.2f} ({s['task_n']})",
            *[_f(s["task_acc_by_task"].get(t), ".2f") for t in tasks],
            str(s["lost_vs_fp16"]),
            _f(s["encode_mbps_core"], ".0f"),
            _f(s["decode_mbps_core"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    comps = bench.get("comparisons") or comparisons(bench, summary)
    if comps:
        lines += [
            "",
            "Paired differences, row minus the compared row, on the same windows/prompts: mean [95 % CI] "
            "(top-1 in points and perplexity ratio in % from per-position block bootstrap; task accuracy in "
            "points per prompt, with the exact McNemar p; answer NLL in nats). `*`: the interval "
            "excludes 0. "
            "Baselines are compared with the least-compressing KVTC row that compresses at least as much.",
            "",
            "| row | vs | top-1 diff (pts) | ppl ratio (%) | task acc diff (pts) | McNemar p "
            "| answer NLL diff |",
            "|---|---|---|---|---|---|---|",
        ]
        halves = {
            key: sorted(
                (c[key]["hi"] - c[key]["lo"]) / 2 * 100
                for c in comps
                if key in c and not math.isnan(c[key]["lo"])
            )
            for key in ("top1", "task_acc")
        }
        for c in comps:
            t = c.get("task_acc")
            lines.append(
                f"| {c['a']} | {c['b']} | {_ci(c.get('top1'), '+.1f', 100)} | "
                f"{_ci(c.get('ppl_ratio_pct'), '+.1f')} | {_ci(t, '+.0f', 100)} | "
                f"{'-' if t is None else format(t['p_value'], '.3f')} | {_ci(c.get('answer_nll'), '+.2f')} |"
            )
        res = [
            f"{label}: median 95 % CI half-width {v[len(v) // 2]:.1f} points"
            for key, label in (("top1", "top-1"), ("task_acc", "task accuracy"))
            if (v := halves[key])
        ]
        lines += [
            "",
            "Resolution achieved (what a paired difference must exceed to be separated): "
            + "; ".join(res)
            + ".",
        ]
    if bench.get("skipped_items"):
        lines += [
            "",
            f"**Truncated run**: {len(bench['skipped_items'])} contexts were not computed within the "
            "wall-time budget (`--stop-after`) and are not in any number above.",
        ]
    if bench.get("restore_vs_recompute"):
        lines += ["", "Restore vs recompute (all cores, same machine, same run):", ""]
        lines += [
            "| context | KVTC target | prefill s | KVTC decode s | speedup | CR |",
            "|---|---|---|---|---|---|",
        ]
        for r in bench["restore_vs_recompute"]:
            lines.append(
                f"| {r['context_tokens']} | {r['target_cr']:g} | {r['prefill_s']:.2f} | "
                f"{r['kvtc_decode_s']:.3f} | {r['restore_speedup']:.1f}x | {r['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _frontier(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both ratio and accuracy, by increasing ratio."""
    sign = 1 if higher_better else -1
    best = -math.inf
    out = []
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if sign * y > best:
            out.append((x, y))
            best = sign * y
    return sorted(out)


def pareto_png(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("top1", "teacher-forced top-1 agreement", True),
        ("ppl_increase_pct", "perplexity increase (%)", False),
        ("kl", "KL(fp16 || method), nats/token", False),
        ("task_acc", "retrieval task accuracy", True),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    for ax, (key, label, higher) in zip(axes.flat, panels, strict=True):
        pts = [(s["ratio"], s[key], s) for s in summary if s[key] is not None]
        for x, y, s in pts:
            ax.scatter(x, y, color=FAMILY_COLORS.get(s["family"], "red"), s=30, zorder=3)
            ax.annotate(s["method"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = _frontier([(x, y) for x, y, _ in pts], higher)
        if front:
            ax.plot(*zip(*front, strict=True), "--", color="lightgray", zorder=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio vs fp16 (log2)")
        ax.set_ylabel(label)
        if key in ("ppl_increase_pct", "kl"):
            ax.set_yscale("symlog", linthresh=1.0 if key == "ppl_increase_pct" else 0.01)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=f) for f, c in FAMILY_COLORS.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(bench: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(bench)
    bench = {**bench, "comparisons": comparisons(bench, summary), "dominance": dominance(summary)}
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "png": out_dir / "pareto.png"}
    paths["json"].write_text(json.dumps({**bench, "summary": summary}, indent=2, default=str))
    paths["markdown"].write_text(markdown(bench, summary))
    pareto_png(summary, paths["png"])
    return paths
