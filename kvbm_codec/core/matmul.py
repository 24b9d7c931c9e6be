"""How float32 matmuls run in a kvbm-codec process: oneDNN's bf16 fpmath where it is exact enough.

On a CPU that multiplies bf16 natively (AVX512-BF16, AMX), torch can hand float32 matmuls to oneDNN
with bf16 math allowed (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). On the session-21
AVX-512 machine that ran 2.2-2.4x torch's default float32 speed at the codec's and the model's
shapes, with a relative squared error of ~1.5e-13 against float64 (the default path's: ~6e-14) and
model KV within ~3e-12 of the default path's (docs/benchmarks.md, "Session 21: float32 matmuls
through oneDNN's bf16 fpmath"): float32's accuracy, so oneDNN does not simply round the operands
(that would be ~1e-5). Nothing promises that on every CPU, and on the session-22 Xeon with AMX it
does round them (probe error 5.5e-6), so the mode is switched on only after a probe matmul shows
float32-level error on this one; anywhere else (a CPU that rounds, like that AMX one; AVX2-only
CPUs, where bf16 is emulated and slow) matmuls stay as torch runs them.

It is a process-wide torch setting, so only kvbm-codec's own processes (the CLI: ``serve``,
``calibrate``, ``demo``, ``eval``, ``bench``) set it; the library never changes it inside an
engine's process.
"""

from __future__ import annotations

import os

import torch

FP32_MATMUL_ENV = "KVBM_CODEC_FP32_MATMUL"
"""'auto' (the default: the fast mode where it is native and verified) or 'ieee' (torch's default)."""
MODES = ("auto", "ieee")
MAX_RELATIVE_ERROR = 1e-11
"""The probe's largest accepted relative squared error against float64: float32 paths give ~1e-13,
bf16-rounded operands ~1e-5, so the bound separates them with decades to spare either way."""


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (emulated bf16 is ~5x slower than float32)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def probe_error() -> float:
    """Relative squared error of one float32 matmul, in the current mode, against float64: at shapes
    large enough that oneDNN takes it (a [256, 512] x [512, 256] product)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=g) * 3 + 1 / 3
    b = torch.randn(512, 256, generator=g) / 7
    exact = a.double() @ b.double()
    got = (a @ b).double()
    return float(((got - exact) ** 2).sum() / (exact**2).sum())


def configure_fp32_matmul(mode: str | None = None) -> str:
    """Set the process' float32 matmul path; returns the one in effect: 'onednn-bf16' or 'ieee'.

    mode: 'auto' or 'ieee' (default: ``$KVBM_CODEC_FP32_MATMUL``, else 'auto')."""
    mode = mode or os.environ.get(FP32_MATMUL_ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{FP32_MATMUL_ENV} must be one of {', '.join(MODES)}; got {mode!r}")
    settings = torch.backends.mkldnn.matmul
    if mode == "ieee" or not native_bf16():
        settings.fp32_precision = "ieee"
        return "ieee"
    settings.fp32_precision = "bf16"
    if probe_error() > MAX_RELATIVE_ERROR:  # plain bf16 rounding here: not a float32 matmul
        settings.fp32_precision = "ieee"
        return "ieee"
    return "onednn-bf16"


def fp32_matmul_mode() -> str:
    """The mode configure_fp32_matmul left in effect ('onednn-bf16' or 'ieee'), for logs and results."""
    return "onednn-bf16" if torch.backends.mkldnn.matmul.fp32_precision == "bf16" else "ieee"
