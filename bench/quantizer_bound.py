"""Is the quantizer what keeps the codec from a better ratio at the same distortion? (issue 16)

KVTC's quantizer gives every group of components of every token its own min/max (fp16 shift and
scale, 32 bits of side information) and lets DEFLATE code the packed codes. The textbook alternative
is entropy-coded uniform scalar quantization (ECSQ): one fixed step per basis (step_b =
step / sqrt(weight_b), equal slope across bases), no side information, every component rounded to
it. Both are measured here on the same coefficients (one validation context, its calibrated bases,
the default calibration's context allocation at ``--target``), at equal weighted distortion (the
allocator's own metric: each basis' weight times its coefficient squared error):

- ``current``: the codec's frame, its codes + scales sections as written (isal DEFLATE);
- ``current entropy``: the zeroth-order entropy of the same codes, per component (what an ideal
  static entropy coder would need), beside DEFLATE's bytes;
- ``ecsq entropy``: the per-component zeroth-order entropy of ECSQ codes at the step that matches the
  codec's distortion (what ECSQ with an ideal entropy coder would need), for three dead zones;
- ``ecsq deflate``: the same codes as the codec would write them (component-major, each component
  in the narrowest byte slot holding its range, isal level 1): what ECSQ buys under DEFLATE;
- ``symmetric``: the codec's groups with half the side information (range +-max|x|, one fp16 scale
  per group), at the 16x/20x/32x context allocations, against min/max groups at the same bits (the
  min/max distortion interpolated log-log between the allocations): would halving the side
  information pay for the wider ranges? (The allocation is min/max's, so this favours min/max.)

    python bench/quantizer_bound.py --val apache,tempest --target 20 \
        --out bench/results/quantizer_bound_s24.json

Validation texts only (never a held-out one); the slot ranges are the text's own, which flatters ECSQ.
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import groupby, pairwise
from pathlib import Path

import numpy as np
import torch

from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.deflate import deflate_chunks
from kvbm_codec.codec.kvtc import default_raw_mask
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.quantize import (
    _runs,
    code_segments,
    decode_coefficients,
    encode_coefficients,
    pack_codes,
    quantize_groups,
)
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.eval.run import context_codec
from kvbm_codec.models.hf import CausalLM

VALIDATION = {"apache": Path("/usr/share/common-licenses/Apache-2.0")}
DEADZONES = (0.0, 0.15, 0.3)
SIDE_TARGETS = (16.0, 20.0, 32.0)
TABLE_CLASSES, TABLE_WIDTH = 64, 64


def _text(name: str, texts_dir: Path) -> str:
    path = VALIDATION.get(name, texts_dir / f"{name}.txt")
    return path.read_text(encoding="utf-8", errors="replace")


def _entropy_bits(codes: torch.Tensor) -> float:
    """Sum over columns of [T, n] integer codes of T x the column's zeroth-order entropy."""
    lo = int(codes.min())
    width = int(codes.max()) - lo + 1
    key = (torch.arange(codes.shape[1])[None, :] * width + (codes.to(torch.int64) - lo)).flatten()
    _, cnt = torch.unique(key, return_counts=True)
    c = cnt.double()
    return float(-(c * (c / codes.shape[0]).log2()).sum())


def _ecsq(
    coeffs: dict[str, tuple[torch.Tensor, float]], step: float, deadzone: float
) -> dict[str, torch.Tensor]:
    out = {}
    for name, (c, w) in coeffs.items():
        y = c / (step / math.sqrt(w))
        out[name] = torch.sign(y) * torch.clamp(torch.floor(y.abs() + 0.5 - deadzone), min=0)
    return out


def _bin_edges(q: torch.Tensor, deadzone: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval of y = x / step that rounds to each code of :func:`_ecsq` (zero's is widened by
    the dead zone on both sides)."""
    a = q.abs()
    lo = torch.where(a == 0, -(0.5 + deadzone), a - 0.5 + deadzone)
    hi = torch.where(a == 0, 0.5 + deadzone, a + 0.5 + deadzone)
    flip = q < 0
    return torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)


def _model_bits(q: torch.Tensor, scale: torch.Tensor, deadzone: float, family: str) -> float:
    """Code length of [T, n] codes under a static zero-mean model per column: ``scale`` [n] is the
    column's standard deviation in units of the step, taken from the calibration's eigenvalues (what
    a decoder has without side information). Each symbol's probability is its bin's mass, floored
    at 2^-24 (an ANS coder's smallest probability); an ANS coder is within ~0.1% of this length."""
    lo, hi = _bin_edges(q.double(), deadzone)
    s = scale.double().clamp_min(1e-6)[None, :]
    if family == "laplace":
        b = s / math.sqrt(2.0)

        def cdf(x: torch.Tensor) -> torch.Tensor:
            return torch.where(x < 0, 0.5 * torch.exp(x / b), 1 - 0.5 * torch.exp(-x / b))
    else:

        def cdf(x: torch.Tensor) -> torch.Tensor:
            return 0.5 * (1 + torch.erf(x / (s * math.sqrt(2.0))))

    p = (cdf(hi) - cdf(lo)).clamp_min(2.0**-24)
    return float(-(p.log2()).sum())


def _class_tables(qs: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int, width: int) -> np.ndarray:
    """Pooled code histograms [n_classes, 2*width+1] of columns binned by their model scale (log
    spaced): the static tables a calibration would ship, fitted here on *another* text's codes."""
    hist = np.ones((n_classes, 2 * width + 1))  # add-one: every code stays codable
    for q, scale in qs:
        k = _scale_class(scale, n_classes).numpy()
        qq = q.clamp(-width, width).to(torch.int64).numpy() + width
        np.add.at(hist, (np.broadcast_to(k[None, :], qq.shape), qq), 1)
    return hist / hist.sum(1, keepdims=True)


def _scale_class(scale: torch.Tensor, n_classes: int) -> torch.Tensor:
    lo, hi = math.log(0.05), math.log(200.0)
    return ((scale.clamp(0.05, 200.0).log() - lo) / (hi - lo) * (n_classes - 1)).round().to(torch.int64)


def _table_bits(q: torch.Tensor, scale: torch.Tensor, tables: np.ndarray, width: int) -> float:
    """Code length under :func:`_class_tables`; codes beyond +-width pay an escape (the table's edge
    probability) plus 16 raw bits."""
    k = _scale_class(scale, tables.shape[0]).numpy()
    qq = q.to(torch.int64).numpy()
    esc = np.abs(qq) > width
    idx = np.clip(qq, -width, width) + width
    p = tables[np.broadcast_to(k[None, :], qq.shape), idx]
    return float(-np.log2(p).sum() + 16 * esc.sum())


def _distortion(
    coeffs: dict[str, tuple[torch.Tensor, float]], q: dict[str, torch.Tensor], step: float
) -> float:
    return sum(
        w * float(((q[n] * (step / math.sqrt(w)) - c).double() ** 2).sum()) for n, (c, w) in coeffs.items()
    )


def _ecsq_deflate_bytes(q: torch.Tensor) -> int:
    """Component-major codes in the narrowest byte slot holding each component's range (all-zero
    components dropped), runs of one slot width packed together, isal level 1: as the codec writes."""
    parts = []
    for j in range(q.shape[1]):
        col = q[:, j]
        lo, hi = float(col.min()), float(col.max())
        if lo == hi == 0:
            continue
        span = hi - lo
        bits = 1 if span <= 1 else 2 if span <= 3 else 4 if span <= 15 else 8
        parts.append((bits, (col.clamp(lo, lo + 2**bits - 1) - lo).to(torch.uint8).numpy()))
    buf = b"".join(
        pack_codes(np.stack([p for _, p in grp]), b) for b, grp in groupby(parts, key=lambda t: t[0])
    )
    return len(deflate_chunks(buf, 1)[1])


def _groups_deflated(c: torch.Tensor, kept: list, symmetric: bool) -> tuple[int, int, float]:
    """(codes bytes, side-information bytes, squared error) of ``c``'s active components quantized by
    the codec's min/max groups (``symmetric``: each group's range is +-max|x| and only its fp16 scale
    is stored, half the side information), the codec's own streams, isal level 1, a DEFLATE block per
    run of one code width in the codes."""
    codes, scales = encode_coefficients(c, kept, symmetric)
    err = float(((decode_coefficients(codes, scales, kept, c.shape[0], symmetric) - c).double() ** 2).sum())
    cuts, off, prev = [], 0, None
    for nbytes, bits in code_segments(kept, c.shape[0]):
        if prev is not None and bits != prev:
            cuts.append(off)
        off, prev = off + nbytes, bits
    return len(deflate_chunks(codes, 1, cuts)[1]), len(deflate_chunks(scales, 1)[1]), err


def _symmetric_gain(side: list[dict], target: float) -> dict:
    """Symmetric groups at ``target``'s allocation against the min/max curve at the same bits (log-log
    interpolation between the two allocations that bracket those bits): < 1 means symmetric groups
    buy less distortion for the bits."""
    at = next(r for r in side if r["target"] == target)
    bits = at["symmetric"]["bits_per_token"]
    pts = sorted((r["minmax"]["bits_per_token"], r["minmax"]["distortion"]) for r in side)
    (b0, d0), (b1, d1) = next(((p, q) for p, q in pairwise(pts) if p[0] <= bits <= q[0]), (pts[0], pts[1]))
    slope = math.log(d1 / d0) / math.log(b1 / b0)
    minmax_d = d0 * math.exp(slope * math.log(bits / b0))
    return {
        "bits_per_token": bits,
        "bits_over_minmax": bits / at["minmax"]["bits_per_token"],
        "distortion_over_minmax_same_allocation": at["symmetric"]["distortion"] / at["minmax"]["distortion"],
        "distortion_over_minmax_same_bits": at["symmetric"]["distortion"] / minmax_d,
    }


def measure(lm: CausalLM, cal, text: str, target: float, context: int) -> tuple[dict, list]:
    kv = lm.prefill_kv(lm.encode(text)[:, :context])
    codec = context_codec(cal, target, kv)
    sections = {s.name: s.compressed_size for s in fr.read_frame(codec.encode(kv)).header.sections}
    cfg = cal.config
    mask = ~default_raw_mask(kv.positions, cfg.sink_tokens, cfg.window_tokens)
    keys = undo_rope(kv.keys, kv.positions, cal.rope)
    coeffs: dict[str, tuple[torch.Tensor, float]] = {}
    current_bytes, current_d, code_entropy, code_bytes, scale_bytes = 0, 0.0, 0.0, 0, 0
    for gi, (a, b) in enumerate(cfg.layer_groups(cal.shape.n_layers)):
        for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
            name = cal.basis_name(gi, kind)
            c = cal.bases[name].project(to_features(x[:, :, mask])).to(torch.float32)
            w = cal.error_tables[name].weight
            blocks = codec.alloc.blocks[name]
            kept = [bl for bl in blocks if bl.bits > 0]
            act = torch.cat([torch.arange(bl.start, bl.start + bl.size) for bl in kept])
            codes, scales = encode_coefficients(c[:, act], blocks)
            rec = torch.zeros_like(c)
            rec[:, act] = decode_coefficients(codes, scales, blocks, c.shape[0])
            current_d += w * float(((rec - c).double() ** 2).sum())
            code_bytes += sections[f"{name}.codes"]
            scale_bytes += sections[f"{name}.scales"]
            current_bytes += sections[f"{name}.codes"] + sections[f"{name}.scales"]
            col = 0
            for _start, size, bits, count in _runs(kept):
                xx = c[:, act][:, col : col + size * count].reshape(c.shape[0], count, size)
                col += size * count
                code_entropy += _entropy_bits(quantize_groups(xx, bits)[0].reshape(c.shape[0], -1))
            coeffs[name] = (c, w)
    n = next(iter(coeffs.values()))[0].shape[0]
    cur_bits = 8 * current_bytes / n
    side = []
    for t in SIDE_TARGETS:  # the same allocation, min/max groups vs symmetric ones
        alloc = context_codec(cal, t, kv).alloc
        row_t = {"target": t}
        for mode in ("minmax", "symmetric"):
            nbytes, dist = 0, 0.0
            for name, (c, w) in coeffs.items():
                kept = [bl for bl in alloc.blocks[name] if bl.bits > 0]
                act = torch.cat([torch.arange(bl.start, bl.start + bl.size) for bl in kept])
                dropped = torch.ones(c.shape[1], dtype=torch.bool)
                dropped[act] = False
                cb, sb, err = _groups_deflated(c[:, act], kept, mode == "symmetric")
                nbytes += cb + sb
                dist += w * (err + float((c[:, dropped].double() ** 2).sum()))
            row_t[mode] = {"bits_per_token": 8 * nbytes / n, "distortion": dist}
        side.append(row_t)
    row = {
        "tokens": n,
        "frame_cr_total": kv.nbytes(2) / sum(sections.values()),
        "current_bits_per_token": cur_bits,
        "current_code_bits": 8 * code_bytes / n,
        "current_code_entropy_bits": code_entropy / n,
        "current_scale_bits": 8 * scale_bytes / n,
        "distortion": current_d,
        "ecsq": [],
        "side_information": side,
        "symmetric_at_target": _symmetric_gain(side, target),
    }
    static: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per dead zone: (codes, model scale)
    for dz in DEADZONES:
        lo, hi = 1e-2, 1e2  # log-bisection of the step to the codec's distortion
        for _ in range(30):
            mid = math.sqrt(lo * hi)
            if _distortion(coeffs, _ecsq(coeffs, mid, dz), mid) > current_d:
                hi = mid
            else:
                lo = mid
        q = _ecsq(coeffs, lo, dz)
        ent = sum(_entropy_bits(q[name]) for name in coeffs) / n
        dbytes = sum(_ecsq_deflate_bytes(q[name]) for name in coeffs)
        scales = {
            name: cal.bases[name].eigenvalues.sqrt() / (lo / math.sqrt(w)) for name, (_, w) in coeffs.items()
        }
        laplace = sum(_model_bits(q[nm], scales[nm], dz, "laplace") for nm in coeffs) / n
        gauss = sum(_model_bits(q[nm], scales[nm], dz, "gaussian") for nm in coeffs) / n
        static.append([(q[nm], scales[nm]) for nm in coeffs])
        row["ecsq"].append(
            {
                "deadzone": dz,
                "step": lo,
                "distortion": _distortion(coeffs, q, lo),
                "entropy_bits": ent,
                "deflate_bits": 8 * dbytes / n,
                "entropy_over_current": ent / cur_bits,
                "deflate_over_current": 8 * dbytes / n / cur_bits,
                "laplace_model_bits": laplace,
                "gaussian_model_bits": gauss,
                "laplace_over_current": laplace / cur_bits,
                "gaussian_over_current": gauss / cur_bits,
            }
        )
    return row, static


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", default="apache,tempest")
    ap.add_argument(
        "--texts-dir", type=Path, default=Path("/tmp/kvbm-codec-texts"), help="bench/fetch_texts.sh"
    )
    ap.add_argument("--target", type=float, default=20.0)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calibration", type=Path, default=None, help="default: the registry's (or calibrate)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    rows, statics = [], []
    with torch.inference_mode():
        for name in a.val.split(","):
            measured, static = measure(lm, cal, _text(name, a.texts_dir), a.target, a.context)
            row = {"val": name, "target": a.target, **measured}
            rows.append(row)
            statics.append(static)
            cur, codes = row["current_bits_per_token"], row["current_code_bits"]
            ent, scales = row["current_code_entropy_bits"], row["current_scale_bits"]
            print(
                f"{name}: current {cur:.0f} bits/token (codes {codes:.0f}, their entropy {ent:.0f}; "
                f"scales {scales:.0f})",
                flush=True,
            )
            g = row["symmetric_at_target"]
            print(
                f"  symmetric groups: {g['bits_over_minmax']:.3f}x the bits, distortion "
                f"{g['distortion_over_minmax_same_allocation']:.3f}x at the same allocation, "
                f"{g['distortion_over_minmax_same_bits']:.3f}x min/max's at the same bits",
                flush=True,
            )
        for i, row in enumerate(rows):  # static class tables fitted on the other texts' codes
            for j, e in enumerate(row["ecsq"]):
                others = [pair for k, st in enumerate(statics) if k != i for pair in st[j]]
                if not others:
                    continue
                tables = _class_tables(others, TABLE_CLASSES, TABLE_WIDTH)
                bits = sum(_table_bits(q, sc, tables, TABLE_WIDTH) for q, sc in statics[i][j]) / row["tokens"]
                e["table_bits_other_text"] = bits
                e["table_over_current"] = bits / row["current_bits_per_token"]
            for e in row["ecsq"]:
                print(
                    f"  {row['val']} ecsq dead zone {e['deadzone']}: "
                    f"entropy {e['entropy_over_current']:.3f}x, "
                    f"DEFLATE {e['deflate_over_current']:.3f}x, static Laplace "
                    f"{e['laplace_over_current']:.3f}x, Gaussian {e['gaussian_over_current']:.3f}x, "
                    f"tables from another text {e.get('table_over_current', float('nan')):.3f}x of current "
                    f"(step {e['step']:.3f})",
                    flush=True,
                )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"calibration_id": cal.calibration_id, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
