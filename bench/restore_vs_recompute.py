"""Restore vs recompute, codec throughput per core, and peak memory, on the real model.

For each context length: prefill (the recompute a cache miss costs) vs KVTC decode of the same
context's frame, measured in the same process; encode/decode MB/s of fp16 KV with torch pinned to
one thread (per-core figures); peak RSS growth of encode and decode measured in fresh child processes.
Usage: python bench/restore_vs_recompute.py [--model M] --text FILE --contexts 2048,8192 --target-cr 20
       --out J [--calibration-id ID] [--restore-only]

--calibration-id takes calibrations already in the local registry (`kvbm-codec registry list`), so a
model whose default calibration is not cached yet is measured without first computing one (an hour
for a 0.5B model on a loaded 2-core machine). Several ids, comma-separated, are each restored from
the same prefill: one recompute time, one row per calibration, so calibrations compare side by side
on the same KV. --restore-only skips the per-core throughput and the peak-memory children when only
restore vs recompute is wanted. --bf16-recompute also times the prefill in bf16 (CausalLM.in_dtype):
on a CPU with native bf16 that is the recompute an engine would run (vLLM's CPU backend defaults to
bf16), 2-2.5x faster than float32, so restore is also reported against it.
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

from kvbm_codec.calibration.cache import load_or_calibrate, local_registry
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.core.matmul import configure_fp32_matmul
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


def _per_core_and_memory(
    codec: KVTCCodec, kv, frame: bytes, workdir: Path, n: int, cal_path: str, target: float
) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    enc1 = best_of(lambda: codec.encode(kv), 2)
    dec1 = best_of(lambda: codec.decode(frame), 2)
    torch.set_num_threads(threads)
    kv_path, frame_path = workdir / f"kv{n}.pt", workdir / f"frame{n}.kvtc"
    torch.save(kv, kv_path)
    frame_path.write_bytes(frame)
    fp16_mb = kv.nbytes(2) / 1e6
    return {
        "encode_mb_s_per_core": fp16_mb / enc1,
        "decode_mb_s_per_core": fp16_mb / dec1,
        "encode_peak_rss_mb": peak_mb("encode", str(kv_path), str(frame_path), cal_path, target),
        "decode_peak_rss_mb": peak_mb("decode", str(kv_path), str(frame_path), cal_path, target),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m", help="registered name or a path")
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--target-cr", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/restore_vs_recompute.json"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kvbm-codec-bench"))
    p.add_argument("--calibration-id", default=None, help="local registry ids, comma-separated")
    p.add_argument("--restore-only", action="store_true", help="skip per-core throughput and memory")
    p.add_argument("--bf16-recompute", action="store_true", help="also time a bf16 prefill of each context")
    a = p.parse_args()
    matmul = configure_fp32_matmul()  # as every kvbm-codec command runs (KVBM_CODEC_FP32_MATMUL=ieee: off)
    lm = CausalLM.load(a.model)
    twin = lm.in_dtype(torch.bfloat16) if a.bf16_recompute else None
    if a.calibration_id is None:
        cal, cal_path, _ = load_or_calibrate(lm)
        cals = [(cal, cal_path)]
    else:
        reg = local_registry()
        cals = []
        for cid in a.calibration_id.split(","):
            found = reg.artifact_path(lm.info.fingerprint, cid)
            assert found is not None  # the local registry always has a file
            cals.append((reg.get(lm.info.fingerprint, cid), found))
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
        bf16_s = None
        if twin is not None:
            t0 = time.perf_counter()
            twin.prefill(ctx, return_logits=False)
            bf16_s = time.perf_counter() - t0
        for cal, cal_path in cals:
            codec = KVTCCodec(cal, a.target_cr)
            frame = codec.encode(kv)
            restore_s = best_of(lambda: codec.decode(frame))  # noqa: B023
            row = {
                "context_tokens": n,
                "target_cr": a.target_cr,
                "calibration_id": cal.calibration_id,
                "threads": threads,
                "fp32_matmul": matmul,
                "load_average_1m": psutil.getloadavg()[0],
                "prefill_s": prefill_s,
                "restore_s": restore_s,
                "restore_speedup": prefill_s / restore_s,
                **(
                    {}
                    if bf16_s is None
                    else {"prefill_bf16_s": bf16_s, "restore_speedup_vs_bf16": bf16_s / restore_s}
                ),
                "fp16_mb": kv.nbytes(2) / 1e6,
                "frame_mb": len(frame) / 1e6,
            }
            if not a.restore_only:
                row.update(_per_core_and_memory(codec, kv, frame, a.workdir, n, str(cal_path), a.target_cr))
            rows.append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
