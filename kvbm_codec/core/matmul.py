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

``bf16`` asks for oneDNN's bf16 math even where it rounds the operands (AMX). Each matmul then errs by
~5e-6 (relative squared), which adds 0.2-1.1% to the codec's own error at 16-32x and ~2.5% at 8x,
for about 2x the matmul speed at the codec's shapes and 1.4-1.9x the codec's (docs/benchmarks.md,
"Session 23"): the setting for ``serve`` on such a CPU. Calibration measures errors far smaller than
that rounding (the sensitivity probe's KLs), so it always runs float32 matmuls exactly
(``exact_fp32``).

It is a process-wide torch setting, so only kvbm-codec's own processes (the CLI: ``serve``,
``calibrate``, ``demo``, ``eval``, ``bench``) set it; the library never changes it inside an
engine's process (``exact_fp32`` only undoes a rounding mode the CLI chose).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FP32_MATMUL_ENV = "KVBM_CODEC_FP32_MATMUL"
"""'auto' (the default: the fast mode where it is native and verified), 'ieee' (torch's default) or
'bf16' (oneDNN's bf16 math wherever it is native, rounding or not)."""
MODES = ("auto", "ieee", "bf16")
IN_EFFECT = ("ieee", "onednn-bf16", "bf16-rounded")
"""What configure_fp32_matmul can leave in effect: float32 as torch runs it, oneDNN's bf16 math at
float32 accuracy, or oneDNN's bf16 math that rounds the operands (only when 'bf16' asked for it)."""
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


_bf16_rounds = False
"""Whether this CPU's oneDNN bf16 path rounded the operands in the last probe (set with the mode)."""


def configure_fp32_matmul(mode: str | None = None) -> str:
    """Set the process' float32 matmul path; returns the one in effect (one of IN_EFFECT).

    mode: 'auto', 'ieee' or 'bf16' (default: ``$KVBM_CODEC_FP32_MATMUL``, else 'auto')."""
    global _bf16_rounds
    mode = mode or os.environ.get(FP32_MATMUL_ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{FP32_MATMUL_ENV} must be one of {', '.join(MODES)}; got {mode!r}")
    settings = torch.backends.mkldnn.matmul
    if mode == "ieee" or not native_bf16():  # emulated bf16 would be slower than float32
        settings.fp32_precision = "ieee"
        return "ieee"
    settings.fp32_precision = "bf16"
    _bf16_rounds = probe_error() > MAX_RELATIVE_ERROR  # plain bf16 rounding here: not a float32 matmul
    if _bf16_rounds and mode == "auto":
        settings.fp32_precision = "ieee"
    return fp32_matmul_mode()


def fp32_matmul_mode() -> str:
    """The mode configure_fp32_matmul left in effect (one of IN_EFFECT), for logs and results."""
    if torch.backends.mkldnn.matmul.fp32_precision != "bf16":
        return "ieee"
    return "bf16-rounded" if _bf16_rounds else "onednn-bf16"


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Float32 matmuls at float32 accuracy inside the block: undoes 'bf16-rounded' (and only that)
    for a calibration, whose probe measures output errors far below the operands' rounding."""
    settings = torch.backends.mkldnn.matmul
    if fp32_matmul_mode() != "bf16-rounded":
        yield
        return
    settings.fp32_precision = "ieee"
    try:
        yield
    finally:
        settings.fp32_precision = "bf16"
