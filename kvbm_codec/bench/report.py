"""Turn per-(method, context) rows into the one picture operators choose by: ratio vs accuracy.

Ratios aggregate as total fp16 bytes / total stored bytes over all contexts (a byte-weighted mean, what a
storage tier actually sees); accuracies are means over contexts; task accuracy is also paired against
fp16 on the same prompts (`lost` = prompts fp16 answered right and the method got wrong).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

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
                "encode_mbps_core": fp16 / 1e6 / max(1e-9, sum(r["encode_s"] for r in rs)),
                "decode_mbps_core": fp16 / 1e6 / max(1e-9, sum(r["decode_s"] for r in rs)),
            }
        )
    return out


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
    lines = [
        f"# kvbm-codec bench: {bench['model']}, suite `{suite['name']}`",
        "",
        f"LM windows: {suite['lm_windows']} x ({suite['lm_context_tokens']} context + "
        f"{suite['lm_continuation_tokens']} continuation tokens); tasks: {', '.join(suite['tasks'])} x "
        f"{suite['task_instances']} prompts of ~{suite['task_context_tokens']} tokens. "
        f"Calibration: {bench['calibration_id']}. Wall time {bench['wall_s']:.0f} s.",
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
        ("task_acc", "retrieval task accuracy", True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    for ax, (key, label, higher) in zip(axes, panels, strict=True):
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
        if key == "ppl_increase_pct":
            ax.set_yscale("symlog", linthresh=1.0)
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
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "png": out_dir / "pareto.png"}
    paths["json"].write_text(json.dumps({**bench, "summary": summary}, indent=2, default=str))
    paths["markdown"].write_text(markdown(bench, summary))
    pareto_png(summary, paths["png"])
    return paths
