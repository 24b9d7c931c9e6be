"""Restore vs recompute, codec throughput per core, and peak memory, on the real model.

For each context length: prefill (the recompute a cache miss costs) vs KVTC decode of the same
context's frame, measured in the same process; encode/decode MB/s of fp16 KV with torch pinned to
one thread (per-core figures); peak RSS growth of encode and decode measured in fresh child processes.
Usage: python bench/restore_vs_recompute.py [--model M] --text FILE --contexts 2048,8192 --target-cr 20
       --out J
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import psutil
import torch

from kvbm_codec.calibration.cache import load_or_calibrate
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.models.hf import CausalLM


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class _PeakSampler:
    """Samples RSS every 2 ms on a thread: ru_maxrss is a lifetime high-water mark that loading the
    inputs has usually already set, so it cannot isolate the operation's own peak."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _peak_child(kind: str, kv_path: str, frame_path: str, cal_path: str, target: float, q: mp.Queue) -> None:
    from kvbm_codec.calibration.artifact import load_calibration

    cal = load_calibration(cal_path)
    codec = KVTCCodec(cal, target)
    kv = torch.load(kv_path, weights_only=False)
    frame = Path(frame_path).read_bytes()
    codec.decode(codec.encode(kv.select_tokens(torch.arange(256))))  # warm up allocator and caches
    gc.collect()
    base = _rss_mb()
    with _PeakSampler() as peak:
        out = codec.encode(kv) if kind == "encode" else codec.decode(frame)
    del out
    q.put(peak.peak - base)


def peak_mb(kind: str, kv_path: str, frame_path: str, cal_path: str, target: float) -> float:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(kind, kv_path, frame_path, cal_path, target, q))
    p.start()
    p.join()
    return float(q.get(timeout=5))


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m", help="registered name or a path")
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--target-cr", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/restore_vs_recompute.json"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kvbm-codec-bench"))
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    cal, cal_path, _ = load_or_calibrate(lm)
    codec = KVTCCodec(cal, a.target_cr)
    ids = lm.tokenizer(a.text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    threads = torch.get_num_threads()
    for n in map(int, a.contexts.split(",")):
        if ids.shape[1] < n:
            raise SystemExit(f"text has {ids.shape[1]} tokens, need {n}")
        ctx = ids[:, :n]
        t0 = time.perf_counter()
        kv, _ = lm.prefill(ctx, return_logits=False)
        prefill_s = time.perf_counter() - t0
        frame = codec.encode(kv)
        restore_s = best_of(lambda: codec.decode(frame))  # noqa: B023
        torch.set_num_threads(1)
        enc1 = best_of(lambda: codec.encode(kv), 2)  # noqa: B023
        dec1 = best_of(lambda: codec.decode(frame), 2)  # noqa: B023
        torch.set_num_threads(threads)
        kv_path, frame_path = a.workdir / f"kv{n}.pt", a.workdir / f"frame{n}.kvtc"
        torch.save(kv, kv_path)
        frame_path.write_bytes(frame)
        fp16_mb = kv.nbytes(2) / 1e6
        row = {
            "context_tokens": n,
            "target_cr": a.target_cr,
            "threads": threads,
            "prefill_s": prefill_s,
            "restore_s": restore_s,
            "restore_speedup": prefill_s / restore_s,
            "fp16_mb": fp16_mb,
            "frame_mb": len(frame) / 1e6,
            "encode_mb_s_per_core": fp16_mb / enc1,
            "decode_mb_s_per_core": fp16_mb / dec1,
            "encode_peak_rss_mb": peak_mb(
                "encode", str(kv_path), str(frame_path), str(cal_path), a.target_cr
            ),
            "decode_peak_rss_mb": peak_mb(
                "decode", str(kv_path), str(frame_path), str(cal_path), a.target_cr
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
