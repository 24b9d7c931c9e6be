"""The process' float32 matmul path (core/matmul.py): switched to oneDNN's bf16 math only where it is
native and a probe shows float32 accuracy, and then the model's KV is the default path's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvbm_codec.core import matmul
from kvbm_codec.core.matmul import configure_fp32_matmul, fp32_matmul_mode, native_bf16, probe_error


@pytest.fixture
def restore_mode() -> Iterator[None]:
    before = torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision = before


def test_ieee_is_torchs_default_path(restore_mode: None) -> None:
    assert configure_fp32_matmul("ieee") == "ieee" == fp32_matmul_mode()
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert probe_error() < 1e-12


def test_auto_only_where_native_and_exact(restore_mode: None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    bf16_math_error = probe_error()  # this CPU's oneDNN bf16 path, measured apart from the decision
    mode = configure_fp32_matmul("auto")
    assert mode == fp32_matmul_mode()
    # AVX512-BF16 without AMX (session 21): float32-level error, taken; AMX (session 22) rounds the
    # operands (~5e-6), refused: the decision follows the measurement, whichever this CPU gives
    fast = native_bf16() and bf16_math_error <= matmul.MAX_RELATIVE_ERROR
    assert mode == ("onednn-bf16" if fast else "ieee")
    assert probe_error() < matmul.MAX_RELATIVE_ERROR  # whichever path, a float32-accurate one
    # both branches on any CPU: a native one whose bf16 path measures float32-level error takes it ...
    monkeypatch.setattr(matmul, "native_bf16", lambda: True)
    monkeypatch.setattr(matmul, "probe_error", lambda: 1.5e-13)
    assert configure_fp32_matmul("auto") == "onednn-bf16" == fp32_matmul_mode()
    # ... and one whose bf16 path rounds the operands (error ~1e-5) keeps the default path
    monkeypatch.setattr(matmul, "probe_error", lambda: 1e-5)
    assert configure_fp32_matmul("auto") == "ieee"
    monkeypatch.setattr(matmul, "native_bf16", lambda: False)
    assert configure_fp32_matmul("auto") == "ieee"


def test_mode_from_the_environment(restore_mode: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(matmul.FP32_MATMUL_ENV, "ieee")
    assert configure_fp32_matmul() == "ieee"
    monkeypatch.setenv(matmul.FP32_MATMUL_ENV, "bf16")
    with pytest.raises(ValueError, match="KVBM_CODEC_FP32_MATMUL must be one of auto, ieee; got 'bf16'"):
        configure_fp32_matmul()


@pytest.mark.slow
def test_model_kv_on_either_path_agrees_to_float32_precision(smollm, restore_mode: None) -> None:  # type: ignore[no-untyped-def]
    """The claim the mode rests on, on the real model: a prefill's KV on oneDNN's bf16 path is the
    default path's to float32 precision (bf16 weights would be ~1e-4 off, docs/benchmarks.md)."""
    ids = smollm.encode("The keeper trimmed the wick and wrote the weather in his notebook. " * 12)
    configure_fp32_matmul("ieee")
    exact = smollm.prefill_kv(ids)
    configure_fp32_matmul("auto")
    fast = smollm.prefill_kv(ids)
    for a, b in ((fast.keys, exact.keys), (fast.values, exact.values)):
        assert float((a - b).pow(2).sum() / b.pow(2).sum()) < 1e-9


@pytest.mark.slow
def test_frames_cross_between_the_paths(smollm, small_calibration, restore_mode: None) -> None:  # type: ignore[no-untyped-def]
    """A frame written on one path decodes on the other to the same KV, up to float32 rounding."""
    from kvbm_codec.codec.kvtc import KVTCCodec

    ids = smollm.encode("Ships passed far out on the grey water, and one signalled with a lamp. " * 14)
    kv = smollm.prefill_kv(ids)
    codec = KVTCCodec(small_calibration, 20.0)
    decoded = {}
    for writer in ("auto", "ieee"):
        configure_fp32_matmul(writer)
        frame = codec.encode(kv)
        for reader in ("auto", "ieee"):
            configure_fp32_matmul(reader)
            decoded[writer, reader] = codec.decode(frame).to(torch.float32)
    for writer in ("auto", "ieee"):
        a, b = decoded[writer, "auto"], decoded[writer, "ieee"]
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert float((x - y).pow(2).sum() / y.pow(2).sum()) < 1e-10
