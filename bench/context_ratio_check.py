"""Achieved ratio vs context length: one context allocation per target against per-length ones.

Each validation text's cached 2048-token KV (bench/accuracy_sweep.py --val-cache) is cut to its first
N tokens (a prefix's KV is the prefix prefill's), encoded as one whole-context frame with the default
sinks and window kept exact, at the OLD calibration's plain allocation and at the allocation the NEW
calibration gives that length (``eval.run.context_codec``); one JSON line per (text, length, target).
The held-out evaluation texts (GPL v3, Hamlet) are skipped: no choice is made on them.

    python bench/context_ratio_check.py OLD.kvtc NEW.kvtc --val-cache /tmp/acc4/val \\
        --targets 8,20 --contexts 256,512,2048 --out ratios.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.eval.run import context_codec

HELD_OUT = ("gpl", "hamlet")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--val-cache", type=Path, required=True)
    p.add_argument("--targets", default="8,16,20,32,64")
    p.add_argument("--contexts", default="200,256,400,512,1024,1500,2048")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    old, new = load_calibration(a.old), load_calibration(a.new)
    targets = [float(t) for t in a.targets.split(",")]
    lengths = [int(x) for x in a.contexts.split(",")]
    with a.out.open("w") as out:
        for f in sorted(a.val_cache.glob("*.pt")):
            name = f.name.split("-")[0]
            if name in HELD_OUT:
                continue
            kv, _ = torch.load(f, weights_only=False)
            for n in lengths:
                sub = kv.select_tokens(torch.arange(min(n, kv.n_tokens)))
                for t in targets:
                    before = KVTCCodec(old, t).encode_with_stats(sub)[1].achieved_cr
                    codec = context_codec(new, t, sub)
                    after = codec.encode_with_stats(sub)[1].achieved_cr
                    alloc = next(k for k, x in new.allocations.items() if x is codec.alloc)
                    row = {"text": name, "context": n, "target": t, "old_cr": round(before, 3)}
                    row |= {"new_cr": round(after, 3), "new_alloc": alloc}
                    out.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
