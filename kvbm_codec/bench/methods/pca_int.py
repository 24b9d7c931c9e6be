"""The incumbent: what Dynamo's kvbm-kernels KVTC does today, reproduced to show what KVTC's extra
stages buy. PCA on post-RoPE keys and values (no RoPE undo), a fixed rank for every layer group,
uniform symmetric int8/int4 codes with one fp16 scale per token per basis, no DP bit allocation, no
DEFLATE.

Same layer groups, same calibration text and the same raw sinks + recent window as KVTC, so the only
differences from the `kvtc@N` rows are exactly the three stages listed above.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.calibration.calibrate import compressible, token_sequences
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import default_raw_mask
from kvbm_codec.codec.params import basis_name
from kvbm_codec.codec.pca import CovarianceAccumulator, PCABasis, from_features, to_features
from kvbm_codec.kv import KVCache
from kvbm_codec.texts import calibration_texts


def fit_post_rope_bases(lm: object, cfg: CodecConfig, sequences: int, seq_len: int) -> dict[str, PCABasis]:
    """PCA of post-RoPE KV over the KVTC calibration corpus (same text, same excluded sink/window tokens)."""
    seqs = token_sequences(lm.tokenizer, calibration_texts(), seq_len, sequences)  # type: ignore[attr-defined]
    accs: dict[str, CovarianceAccumulator] = {}
    for seq in seqs:
        kv, _ = lm.prefill(seq, return_logits=False)  # type: ignore[attr-defined]
        kv = compressible(kv, cfg)
        for gi, (a, b) in enumerate(cfg.layer_groups(kv.n_layers)):
            for kind, x in (("k", kv.keys[a:b]), ("v", kv.values[a:b])):
                f = to_features(x)
                name = basis_name(gi, kind)
                if name not in accs:  # not setdefault: that builds a p x p sum per call
                    accs[name] = CovarianceAccumulator(f.shape[1])
                accs[name].add(f)
    return {name: acc.finalize(acc.dim) for name, acc in accs.items()}


def save_bases(bases: dict[str, PCABasis], path: Path) -> None:
    tensors, meta = {}, {}
    for name, b in bases.items():
        for field in ("mean", "scale", "basis", "eigenvalues"):
            tensors[f"{name}.{field}"] = getattr(b, field).contiguous()
        meta[name] = repr(float(b.residual_variance))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_bases(path: Path) -> dict[str, PCABasis] | None:
    """The cached fit, or None if the file is unreadable (it is then refitted and rewritten)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return {
                name: PCABasis(
                    *(f.get_tensor(f"{name}.{field}") for field in ("mean", "scale", "basis", "eigenvalues")),
                    residual_variance=float(res),
                )
                for name, res in meta.items()
            }
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


class PCAUniform(KVMethod):
    family = "pca-incumbent"
    needs_calibration = True

    def __init__(self, target_cr: float, bits: int = 8) -> None:
        self.target_cr, self.bits = target_cr, bits
        self.name = f"pca-int{bits}@{target_cr:g}"

    def params(self) -> dict[str, object]:
        return {
            "target_cr": self.target_cr,
            "bits": self.bits,
            "rope": "post-RoPE",
            "scale": "per-token fp16",
        }

    def rank(self, dim: int) -> int:
        """Largest rank whose codes + per-token scale fit dim*2/target_cr bytes per token."""
        budget = 2 * dim / self.target_cr - 2
        return max(1, min(dim, math.floor(budget * 8 / self.bits)))

    def prepare(self, ctx: BenchContext) -> None:
        ctx.resources.incumbent_bases()

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        cfg: CodecConfig = ctx.resources.calibration().config
        bases: dict[str, PCABasis] = ctx.resources.incumbent_bases()
        raw = default_raw_mask(kv.positions, cfg.sink_tokens, cfg.window_tokens)
        comp = torch.nonzero(~raw).flatten()
        qmax = 2 ** (self.bits - 1) - 1
        blocks = {}
        stored = NOMINAL_HEADER_BYTES + int(raw.sum()) * (kv.nbytes(2) // kv.n_tokens)
        for gi, (a, b) in enumerate(cfg.layer_groups(kv.n_layers)):
            for kind, x in (("k", kv.keys[a:b]), ("v", kv.values[a:b])):
                name = basis_name(gi, kind)
                basis = bases[name]
                r = self.rank(basis.dim)
                coeffs = basis.project(to_features(x[:, :, comp].float()), torch.arange(r))
                scale = (coeffs.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-8).half().float()
                codes = (coeffs / scale).round().clamp(-qmax, qmax).to(torch.int8)
                blocks[name] = (codes, scale, r, x.shape)
                stored += math.ceil(codes.numel() * self.bits / 8) + scale.numel() * 2
        raw_kv = kv.select_tokens(torch.nonzero(raw).flatten())
        payload = (blocks, bases, (raw_kv.keys.half(), raw_kv.values.half()), raw, comp, kv.positions)
        return Compressed(stored, payload, kv.n_tokens, {"ranks": {n: b[2] for n, b in blocks.items()}})

    def restore(self, c: Compressed) -> KVCache:
        blocks, bases, (rk, rv), raw, comp, pos = c.payload
        keys, values = [], []
        for gi in range(len(blocks) // 2):
            for kind, out in (("k", keys), ("v", values)):
                codes, scale, r, shape = blocks[basis_name(gi, kind)]
                feats = bases[basis_name(gi, kind)].reconstruct(codes.float() * scale, torch.arange(r))
                nl, nh, _, d = shape
                full = torch.empty(nl, nh, pos.shape[0], d)
                full[:, :, comp] = from_features(feats, nl, nh, d)
                out.append(full)
        k, v = torch.cat(keys), torch.cat(values)
        idx = torch.nonzero(raw).flatten()
        k[:, :, idx], v[:, :, idx] = rk.float(), rv.float()
        return KVCache(k, v, pos)
