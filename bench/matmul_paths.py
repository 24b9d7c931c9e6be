"""Float32 matmuls on torch's default path vs oneDNN's bf16 fpmath vs bf16 tensors, and the model's
prefill on each: the measurements behind core/matmul.py (docs/benchmarks.md, "Session 21: float32
matmuls through oneDNN's bf16 fpmath"). One torch thread, side by side in one process.

    python bench/matmul_paths.py
"""

from __future__ import annotations

import copy

import torch

from kvbm_codec.bench.throughput import _best  # warm-up, then the best of n (as bench throughput)
from kvbm_codec.core.matmul import native_bf16
from kvbm_codec.models.hf import CausalLM


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum())


def main() -> None:
    torch.set_num_threads(1)
    settings = torch.backends.mkldnn.matmul
    print(f"native bf16: {native_bf16()}")
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(1024, 576, generator=g) * 3, torch.randn(1536, 576, generator=g)
    exact = a.double() @ w.double().T
    flop = 2 * 1024 * 576 * 1536
    for name, prec, dtype in (("ieee", "ieee", torch.float32), ("onednn-bf16", "bf16", torch.float32),
                              ("bf16 tensors", "ieee", torch.bfloat16)):  # fmt: skip
        settings.fp32_precision = prec
        x, y = a.to(dtype), w.to(dtype)
        s = _best(lambda x=x, y=y: torch.nn.functional.linear(x, y), 20)
        err = _rel(torch.nn.functional.linear(x, y), exact)
        print(f"[1024x576]x[576x1536] {name:12s} {flop / s / 1e9:6.1f} GFLOP/s, rel. sq. error {err:.2e}")
    settings.fp32_precision = "ieee"
    lm = CausalLM.load()
    ids = torch.randint(100, 20000, (1, 1024), generator=g)
    ref = lm.prefill_kv(ids)
    rounded = copy.copy(lm)  # what in_dtype avoids: model.to() also rounds the rotary inv_freq
    rounded.model = copy.deepcopy(lm.model).to(torch.bfloat16)
    rows = [("float32, ieee", lm, "ieee"), ("float32, onednn-bf16", lm, "bf16"),
            ("bf16 copy (in_dtype)", lm.in_dtype(torch.bfloat16), "ieee"),
            ("model.to(bfloat16)", rounded, "ieee")]  # fmt: skip
    for name, model, prec in rows:
        settings.fp32_precision = prec
        s = _best(lambda model=model: model.prefill_kv(ids), 2)
        kv = model.prefill_kv(ids)
        print(f"prefill 1024 tokens, {name:22s} {s:5.2f} s, KV rel. sq. error keys "
              f"{_rel(kv.keys, ref.keys):.1e} values {_rel(kv.values, ref.values):.1e}")  # fmt: skip
    settings.fp32_precision = "ieee"


if __name__ == "__main__":
    main()
