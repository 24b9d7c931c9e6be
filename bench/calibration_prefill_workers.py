"""Does the calibration prefill use both cores well? One sequence at a time on two torch threads (what
``calibrate`` does) against two Python worker threads each prefilling its own sequence on one torch
thread (data parallel: no OpenMP barrier per op), and one thread alone, on the same 1024-token
sequences of the default corpus, alternated per round; wall seconds per sequence, and whether the
workers' KV is bit-identical to the serial run's.

Only meaningful on an idle machine (on a shared one the second core is not there to be used).

    python bench/calibration_prefill_workers.py --sequences 6 --rounds 2 \
        --out bench/results/calibration_prefill_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

from kvbm_codec.calibration.calibrate import token_sequences
from kvbm_codec.calibration.corpus import broad_corpus
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM

SEQ = 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sequences", type=int, default=6, help="even: half per worker")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    seqs = token_sequences(lm.tokenizer, broad_corpus(lm.tokenizer)["docs"], SEQ, a.sequences)
    lm.prefill_kv(seqs[0][:, :64])

    def serial(threads: int) -> list[KVCache]:
        torch.set_num_threads(threads)
        return [lm.prefill_kv(s) for s in seqs]

    def workers() -> list[KVCache]:
        torch.set_num_threads(1)
        out: list[KVCache | None] = [None] * len(seqs)

        def run(part: range) -> None:
            for i in part:
                out[i] = lm.prefill_kv(seqs[i])

        ts = [threading.Thread(target=run, args=(range(w, len(seqs), 2),)) for w in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return [kv for kv in out if kv is not None]

    variants = {
        "serial@2threads": lambda: serial(2),
        "2workers@1thread": workers,
        "serial@1thread": lambda: serial(1),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    kvs: dict[str, list[KVCache]] = {}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        order = list(variants)[r % 3 :] + list(variants)[: r % 3]
        for name in order:
            t0 = time.perf_counter()
            kvs[name] = variants[name]()
            times[name].append((time.perf_counter() - t0) / len(seqs))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s/seq" for k, v in times.items()), flush=True)
    same = all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(kvs["serial@2threads"], kvs["2workers@1thread"], strict=True)
    )
    res = {
        "model": a.model,
        "load_average_1m": load,
        "seconds_per_sequence_min": {k: min(v) for k, v in times.items()},
        "raw": times,
        "workers_kv_bit_identical_to_serial": same,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
