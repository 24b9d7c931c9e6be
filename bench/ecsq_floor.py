"""How far can ecsq's component floor rise before the model feels it? (issue 15's cost, issue 16's gain)

``calibration/entropy_fit.MIN_SCALE`` drops components with under that many steps of calibrated
sigma. At 0.1 an ecsq calibration keeps 8032 components at 20x (the DP keeps 2752), which is why it
decodes 3.5x slower. For each floor this derives the entropy-coded twin of the default calibration
(same bases; tables and steps refitted, so the ratio is met again by a finer step), then scores the
validation texts at one target and times whole-context encode and decode on one thread. Validation
texts only.

    python bench/ecsq_floor.py --floors 0.1,0.3,0.5,1.0 --target 20 --json bench/results/ecsq_floor_s25.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvbm_codec.calibration import entropy_fit, entropy_twin
from kvbm_codec.calibration.cache import corpus_texts, given_or_default
from kvbm_codec.eval.run import context_codec, run_eval
from kvbm_codec.models.hf import CausalLM

TEXTS = {"apache": Path("/usr/share/common-licenses/Apache-2.0")}
CONTINUATION = {"apache": 176}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--floors", default="0.1,0.3,0.5,1.0")
    ap.add_argument("--texts", default="apache,tempest")
    ap.add_argument("--texts-dir", type=Path, default=Path("/tmp/kvbm-codec-texts"))
    ap.add_argument("--target", type=float, default=20.0)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    lm = CausalLM.load()
    base = given_or_default(lm, None)
    texts, _ = corpus_texts(lm.tokenizer, "broad")
    rows = []
    for floor in (float(f) for f in a.floors.split(",")):
        entropy_fit.MIN_SCALE = floor  # read when the twin chooses each basis' kept components
        cal = entropy_twin.entropy_calibration_from(lm, base, texts, progress=False)
        alloc = cal.allocation(a.target)
        kept = sum(b.size for bl in alloc.blocks.values() for b in bl)
        row: dict = {"floor": floor, "kept_components": kept, "step": alloc.step, "texts": {}}
        for name in a.texts.split(","):
            path = TEXTS.get(name, a.texts_dir / f"{name}.txt")
            r = run_eval(lm, cal, path.read_text(encoding="utf-8", errors="replace"), a.target,
                         continuation_tokens=CONTINUATION.get(name, 256))  # fmt: skip
            row["texts"][name] = {"cr": r.achieved_cr, "ppl_pct": r.ppl_increase_pct,
                                  "top1": r.top1_agreement, "kl": r.kl_mean}  # fmt: skip
        kv = lm.prefill_kv(lm.encode(TEXTS["apache"].read_text())[:, :2048])
        codec = context_codec(cal, a.target, kv)
        frame = codec.encode(kv)
        enc, dec = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            codec.encode(kv)
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            codec.decode(frame)
            dec.append(time.perf_counter() - t0)
        mb = kv.nbytes(2) / 1e6
        row.update(encode_mbps=mb / min(enc), decode_mbps=mb / min(dec))
        rows.append(row)
        print(json.dumps(row), flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"base_calibration": base.calibration_id, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
