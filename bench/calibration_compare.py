"""Are two calibrations the same calibration? Bases, eigenvalues, measured sensitivity factors and probe
KLs, and every allocation's bits, compared between two artifacts (e.g. one made by the code before a
speed change and one after, from the same recipe).

Bases are compared as subspaces per leading component (|cos| between matching eigenvectors; a sign flip
or a rotation inside a near-degenerate pair is not a difference the codec sees), allocations as the
fraction of components whose bit width differs, weighted by component count.

Usage: python bench/calibration_compare.py A.kvtc B.kvtc [--out J]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.codec.allocation import Allocation


def _bits(alloc: Allocation, name: str, rank: int) -> torch.Tensor:
    out = torch.zeros(rank, dtype=torch.int64)
    for b in alloc.blocks.get(name, []):
        out[b.start : b.start + b.size] = b.bits
    return out


def compare(a_path: Path, b_path: Path) -> dict:
    a, b = load_calibration(a_path), load_calibration(b_path)
    if set(a.bases) != set(b.bases) or set(a.allocations) != set(b.allocations):
        raise SystemExit("the two calibrations have different bases or allocations")
    report: dict = {"a": a.calibration_id, "b": b.calibration_id, "bases": {}, "allocations": {}}
    for name in sorted(a.bases):
        ba, bb = a.bases[name], b.bases[name]
        cos = (ba.basis * bb.basis).sum(0).abs()
        ev = (ba.eigenvalues - bb.eigenvalues).abs() / ba.eigenvalues.abs().clamp_min(1e-30)
        report["bases"][name] = {
            "min_cos_top64": float(cos[:64].min()),
            "min_cos_top256": float(cos[:256].min()),
            "median_cos_all": float(cos.median()),
            "max_rel_eigenvalue_diff_top64": float(ev[:64].max()),
            "max_abs_mean_diff": float((ba.mean - bb.mean).abs().max()),
        }
    for name in sorted(a.allocations):
        aa, ab = a.allocations[name], b.allocations[name]
        changed = total = 0
        for basis in a.bases:
            rank = a.bases[basis].rank
            x, y = _bits(aa, basis, rank), _bits(ab, basis, rank)
            changed += int((x != y).sum())
            total += rank
        report["allocations"][name] = {
            "same_id": aa.allocation_id == ab.allocation_id,
            "components_with_other_bits": changed / total,
            "bits_per_token": [x.bits_per_token(a.config.scale_bits) for x in (aa, ab)],
            "calibration_cr": [aa.meta.get("calibration_cr"), ab.meta.get("calibration_cr")],
            "lambda": [aa.meta.get("lambda"), ab.meta.get("lambda")],
        }
    sa = a.provenance.get("layer_sensitivity")
    sb = b.provenance.get("layer_sensitivity")
    if sa and sb:
        fa, fb = torch.tensor(sa["factors"]), torch.tensor(sb["factors"])
        ka, kb = torch.tensor(sa["probe_kl"]), torch.tensor(sb["probe_kl"])
        report["sensitivity"] = {
            "max_rel_factor_diff": float(((fa - fb).abs() / fa.abs()).max()),
            "max_rel_probe_kl_diff": float(((ka - kb).abs() / ka.abs()).max()),
        }
    report["phase_seconds"] = [a.provenance.get("phase_seconds"), b.provenance.get("phase_seconds")]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = compare(args.a, args.b)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
