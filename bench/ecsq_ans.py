"""Entropy-coded uniform quantization through a real ANS coder, against the codec, where the model
feels it (issue 16).

bench/quantizer_bound.py measured the lever: at the codec's distortion, entropy-coded uniform scalar
quantization (ECSQ) with static per-class code tables needs 0.76-0.78x of the frame's bits. This bench
asks the question that decides whether to build it: at the same *ratio*, what does the model lose?

The prototype, everything fixed before any evaluation text is seen:

- the default calibration's bases and metric weights (per basis: step_b = step / sqrt(weight_b));
- every coefficient rounded to its basis' step with a dead zone (``--deadzone``), reconstructed at
  the code times the step; components whose calibrated standard deviation is under
  ``MIN_SCALE`` steps are dropped (their codes would be all zero);
- code tables per class of ``sigma / step`` (log spaced), fitted on the calibration corpus' own
  held-out sequences (one per domain, the ones calibration holds out of the PCA fit), stored as
  integer frequencies, as a calibration artifact would ship them;
- per target ratio one global step, bisected on those same calibration sequences so their frames
  would meet the ratio (the codec sizes its allocations on held-out calibration frames the same way);
- each frame's codes through the codec's ANS stage (codec/entropy.py: real bytes, decoded back and
  checked equal), one table per class; codes beyond a table's edge escape to 16 raw bits. The codec's
  own frame overhead (header, checksums) is added to the ECSQ bytes.

The dead zone and the per-token gain are this prototype's knobs (chosen on validation text:
``--deadzone 0 --gain``); the codec's ``quantizer="ecsq"`` (codec/ecsq.py) is what they chose, and
is measured through ``kvbm-codec eval`` like every other calibration.

Then, on each evaluation text, beside the codec at the same target in the same run: the achieved
ratio over the compressed tokens, perplexity, top-1 agreement and KL of the teacher-forced
continuation, the weighted distortion, and encode/decode time of the quantize+entropy stage.

    python bench/ecsq_ans.py --texts apache,tempest --targets 16,20,32 \
        --json bench/results/ecsq_ans_s25_validation.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.calibration.calibrate import token_sequences
from kvbm_codec.calibration.corpus import FIT_SEQUENCES, broad_corpus
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.entropy import CodeTables, class_of
from kvbm_codec.codec.kvtc import default_raw_mask
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import from_features, to_features
from kvbm_codec.codec.rope import apply_rope, undo_rope
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.eval.run import round_trip
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM

TEXTS = {
    "apache": Path("/usr/share/common-licenses/Apache-2.0"),
    "gpl": Path(__file__).resolve().parents[1] / "kvbm_codec" / "data" / "gpl-3.0.txt",
}
CONTINUATION = {"apache": 176}
MIN_SCALE = 0.1  # components under this many steps of standard deviation are dropped
TABLE_STEPS = (0.4, 0.8, 1.6)  # global steps whose calibration codes fill the tables (20x: ~0.8)


def quantize(c: torch.Tensor, step: float, deadzone: float) -> np.ndarray:
    y = (c / step).numpy()
    return (np.sign(y) * np.maximum(np.floor(np.abs(y) + 0.5 - deadzone), 0)).astype(np.int32)


class Prototype:
    """The ECSQ + ANS stage on one calibration: its bases, weights, steps per target and tables."""

    def __init__(self, cal: Calibration, deadzone: float, gain: bool) -> None:
        self.cal = cal
        self.deadzone = deadzone
        self.gain = gain  # per token and basis, an fp16 gain scales the step (16 bits each)
        cfg = cal.config
        self.groups = cfg.layer_groups(cal.shape.n_layers)
        self.names = [cal.basis_name(gi, kind) for gi in range(len(self.groups)) for kind in ("k", "v")]
        self.weight = {n: float(cal.error_tables[n].weight) for n in self.names}
        self.sigma = {n: cal.bases[n].eigenvalues.double().sqrt().numpy() for n in self.names}
        self.tables: CodeTables | None = None

    def coefficients(self, kv: KVCache) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.cal.config
        mask = ~default_raw_mask(kv.positions, cfg.sink_tokens, cfg.window_tokens)
        keys = undo_rope(kv.keys, kv.positions, self.cal.rope)
        out = {}
        for gi, (a, b) in enumerate(self.groups):
            for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
                name = self.cal.basis_name(gi, kind)
                out[name] = self.cal.bases[name].project(to_features(x[:, :, mask])).to(torch.float32)
        return out, mask

    def step_of(self, name: str, step: float) -> float:
        return step / math.sqrt(self.weight[name])

    def kept(self, name: str, step: float) -> tuple[np.ndarray, np.ndarray]:
        """(kept component indices, their classes) at this global step."""
        s = self.sigma[name] / self.step_of(name, step)
        idx = np.flatnonzero(s >= MIN_SCALE)
        return idx, class_of(s[idx])

    def gains(self, name: str, c: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """[T] per-token gain: the RMS of its kept coefficients in units of their calibrated
        standard deviation, rounded to fp16 (what the frame would carry); all ones without gains."""
        if not self.gain:
            return torch.ones(c.shape[0])
        sig = torch.from_numpy(self.sigma[name][idx]).float().clamp_min(1e-12)
        g = (c / sig).pow(2).mean(1).sqrt().clamp(1e-3, 1e3)
        return g.to(torch.float16).to(torch.float32)

    def codes(self, coeffs: dict[str, torch.Tensor], step: float) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for name in self.names:
            idx, _ = self.kept(name, step)
            c = coeffs[name][:, idx]
            g = self.gains(name, c, idx)
            st = self.step_of(name, step)
            q = quantize(c / g[:, None], st, self.deadzone)
            s = self.sigma[name][idx][None, :] / (st * g.numpy()[:, None])
            out.append((q, class_of(s) if self.gain else class_of(s[0])))
        return out

    def side_bits(self, n_tokens: int) -> int:
        return 16 * len(self.names) * n_tokens if self.gain else 0

    def fit_tables(self, calib: list[dict[str, torch.Tensor]], steps: list[float]) -> None:
        samples = [pair for c in calib for st in steps for pair in self.codes(c, st)]
        self.tables = CodeTables.fit(samples)

    def bits_per_token(self, coeffs: dict[str, torch.Tensor], step: float) -> float:
        assert self.tables is not None
        n = next(iter(coeffs.values())).shape[0]
        codes = self.codes(coeffs, step)
        return (sum(self.tables.code_bits(q, k) for q, k in codes) + self.side_bits(n)) / n

    def step_for(self, calib: list[dict[str, torch.Tensor]], budget_bits: float) -> float:
        """The smallest global step whose calibration frames fit ``budget_bits`` per token."""
        lo, hi = 0.05, 20.0
        for _ in range(18):
            mid = math.sqrt(lo * hi)
            bits = sum(self.bits_per_token(c, mid) for c in calib) / len(calib)
            lo, hi = (mid, hi) if bits > budget_bits else (lo, mid)
        return hi

    def round_trip(self, kv: KVCache, step: float) -> tuple[KVCache, int, dict]:
        """kv -> bytes -> kv; (restored, payload bytes, timings and distortion)."""
        assert self.tables is not None
        coeffs, mask = self.coefficients(kv)
        t0 = time.perf_counter()
        codes = self.codes(coeffs, step)
        payload = self.tables.encode(codes)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = self.tables.decode(payload, [(q.shape, k) for q, k in codes])
        t_dec = time.perf_counter() - t0
        if any(not np.array_equal(a, b) for a, b in zip(back, [q for q, _ in codes], strict=True)):
            raise AssertionError("ANS round trip changed the codes")
        keys, values = kv.keys.clone(), kv.values.clone()
        pos_c = kv.positions[mask]
        cal = self.cal
        i = 0
        for a, b in self.groups:
            for kind in ("k", "v"):
                name, q = self.names[i], back[i]
                i += 1
                idx, _k = self.kept(name, step)
                basis = cal.bases[name]
                y = torch.zeros(q.shape[0], basis.rank)
                g = self.gains(name, coeffs[name][:, idx], idx)  # as the frame would carry them
                y[:, idx] = torch.from_numpy(q).float() * self.step_of(name, step) * g[:, None]
                x = from_features(
                    basis.reconstruct(y), b - a, kv.n_heads, basis.dim // ((b - a) * kv.n_heads)
                )
                x = x.to(torch.float16).to(torch.float32)  # the frame's dtype, as the codec restores it
                if kind == "k":
                    keys[a:b, :, mask] = apply_rope(x, pos_c, cal.rope).to(keys.dtype)
                else:
                    values[a:b, :, mask] = x.to(values.dtype)
        restored = KVCache(keys, values, kv.positions, layer_start=kv.layer_start)
        side = self.side_bits(int(mask.sum())) // 8
        return restored, len(payload) + side, {"encode_s": t_enc, "decode_s": t_dec}


def _distortion(proto: Prototype, coeffs: dict[str, torch.Tensor], restored: KVCache) -> float:
    """A restore's weighted distortion (the allocator's metric), its KV projected back."""
    r, _ = proto.coefficients(restored.to(torch.float32))
    return sum(proto.weight[n] * float(((r[n] - coeffs[n]).double() ** 2).sum()) for n in proto.names)


def calibration_sequences(lm: CausalLM, seq_len: int) -> list[torch.Tensor]:
    """The calibration corpus' held-out sequence of each domain (never in the PCA fit, never eval)."""
    texts = broad_corpus(lm.tokenizer)
    return [token_sequences(lm.tokenizer, t, seq_len, FIT_SEQUENCES[d] + 1)[-1] for d, t in texts.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", default="apache,tempest")
    ap.add_argument("--texts-dir", type=Path, default=Path("/tmp/kvbm-codec-texts"))
    ap.add_argument("--targets", default="16,20,32")
    ap.add_argument("--deadzone", type=float, default=0.15)
    ap.add_argument("--gain", action="store_true", help="a per-token fp16 gain per basis scales the step")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    proto = Prototype(cal, a.deadzone, a.gain)
    targets = [float(t) for t in a.targets.split(",")]
    shape = cal.shape
    fp16_bits = 8 * 2 * shape.n_layers * shape.n_kv_heads * (shape.key_head_dim + shape.value_head_dim)
    rows: list[dict] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        calib = [proto.coefficients(lm.prefill_kv(s))[0] for s in calibration_sequences(lm, 1024)]
        proto.fit_tables(calib, list(TABLE_STEPS))
        steps = {t: proto.step_for(calib, fp16_bits / t) for t in targets}
        print(f"calibration side: {time.perf_counter() - t0:.0f} s, steps {steps}", flush=True)
        for name in a.texts.split(","):
            path = TEXTS.get(name, a.texts_dir / f"{name}.txt")
            ids = lm.encode(path.read_text(encoding="utf-8", errors="replace"))
            cont_n = CONTINUATION.get(name, 256)
            ctx, cont = ids[:, : a.context], ids[:, a.context : a.context + cont_n]
            kv = lm.prefill_kv(ctx)
            ref = lm.logits_with_cache(kv, cont)
            targets_ids = cont[0, 1:]
            ppl_ref = perplexity(ref[:-1], targets_ids)
            coeffs, mask = proto.coefficients(kv)
            n_comp = int(mask.sum())
            for t in targets:
                rt = round_trip(cal, t, kv)
                f = fr.read_frame(rt.frame)
                payload = sum(s.compressed_size for s in f.header.sections)
                raw = sum(s.compressed_size for s in f.header.sections if s.name.endswith(".raw"))
                overhead = len(rt.frame) - payload
                codec_bytes = len(rt.frame) - raw
                restored, nbytes, info = proto.round_trip(kv, steps[t])
                row = {"text": name, "target": t, "step": steps[t], "compressed_tokens": n_comp}
                for label, kv_r, nb in (
                    ("codec", rt.restored, codec_bytes),
                    ("ecsq", restored, nbytes + overhead),
                ):
                    logits = lm.logits_with_cache(kv_r.to(torch.float32), cont)
                    row[label] = {
                        "cr": n_comp * fp16_bits / 8 / nb,
                        "ppl_pct": 100 * (perplexity(logits[:-1], targets_ids) / ppl_ref - 1),
                        "top1": top1_agreement(ref[:-1], logits[:-1]),
                        "kl": kl_divergence_mean(ref[:-1], logits[:-1]),
                        "bytes": nb,
                    }
                row["codec"]["distortion"] = _distortion(proto, coeffs, rt.restored)
                row["ecsq"]["distortion"] = _distortion(proto, coeffs, restored)
                row["codec"]["encode_s"], row["codec"]["decode_s"] = rt.encode_s, rt.restore_s
                row["ecsq"].update(info)
                rows.append(row)
                c, e = row["codec"], row["ecsq"]
                print(
                    f"{name} {t:g}x: codec {c['cr']:.2f}x ppl {c['ppl_pct']:+.2f}% top1 {c['top1']:.3f} "
                    f"KL {c['kl']:.4f} | ecsq {e['cr']:.2f}x ppl {e['ppl_pct']:+.2f}% top1 {e['top1']:.3f} "
                    f"KL {e['kl']:.4f} | distortion {e['distortion'] / c['distortion']:.3f}x, "
                    f"ANS enc {e['encode_s']:.2f}s dec {e['decode_s']:.2f}s",
                    flush=True,
                )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {
                "calibration_id": cal.calibration_id,
                "deadzone": a.deadzone,
                "gain": a.gain,
                "steps": steps,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
