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
    monkeypatch.setenv(matmul.FP32_MATMUL_ENV, "fp16")
    expected = "KVBM_CODEC_FP32_MATMUL must be one of auto, ieee, bf16; got 'fp16'"
    with pytest.raises(ValueError, match=expected):
        configure_fp32_matmul()


def test_bf16_is_taken_where_native_even_if_it_rounds(
    restore_mode: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'bf16' is the opt-in for serve on an AMX CPU: oneDNN's bf16 math whether or not it rounds, and
    the mode in effect says which; auto never takes a rounding path, and exact_fp32 undoes only that."""
    if native_bf16():  # this CPU, measured: the label follows its own probe
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        rounds = probe_error() > matmul.MAX_RELATIVE_ERROR
        expected = "bf16-rounded" if rounds else "onednn-bf16"
        assert configure_fp32_matmul("bf16") == expected == fp32_matmul_mode()
    monkeypatch.setattr(matmul, "native_bf16", lambda: True)
    monkeypatch.setattr(matmul, "probe_error", lambda: 5.5e-6)  # the session-22 AMX Xeon's probe
    assert configure_fp32_matmul("auto") == "ieee"
    assert configure_fp32_matmul("bf16") == "bf16-rounded" == fp32_matmul_mode()
    with matmul.exact_fp32():
        assert fp32_matmul_mode() == "ieee"
    assert fp32_matmul_mode() == "bf16-rounded"
    with pytest.raises(RuntimeError), matmul.exact_fp32():
        raise RuntimeError  # restored on the way out of an error too
    assert fp32_matmul_mode() == "bf16-rounded"
    monkeypatch.setattr(matmul, "probe_error", lambda: 1.5e-13)  # float32-accurate: nothing to undo
    assert configure_fp32_matmul("bf16") == "onednn-bf16"
    with matmul.exact_fp32():
        assert fp32_matmul_mode() == "onednn-bf16"
    monkeypatch.setattr(matmul, "native_bf16", lambda: False)  # emulated bf16 is slower: never taken
    assert configure_fp32_matmul("bf16") == "ieee"


def test_calibration_runs_exact_under_a_rounding_mode(
    smollm, restore_mode: None, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A calibration's prefills and probe see float32 matmuls even when serve-style rounding is on."""
    from kvbm_codec.calibration import calibrate as cal_mod

    seen: list[str] = []
    real = cal_mod.calibration_kv

    def watched(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(fp32_matmul_mode())
        yield from real(*args, **kwargs)

    monkeypatch.setattr(cal_mod, "calibration_kv", watched)
    monkeypatch.setattr(matmul, "native_bf16", lambda: True)
    monkeypatch.setattr(matmul, "probe_error", lambda: 5.5e-6)
    configure_fp32_matmul("bf16")
    cal_mod.calibrate_small(smollm)
    assert seen and set(seen) == {"ieee"}
    assert fp32_matmul_mode() == "bf16-rounded"  # and the process' mode is back afterwards


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
@pytest.mark.skipif(not native_bf16(), reason="no native bf16 on this CPU: 'bf16' keeps the default path")
def test_rounded_operands_cost_far_less_than_the_codec(smollm, small_calibration, restore_mode: None) -> None:  # type: ignore[no-untyped-def]
    """What 'bf16' trades, on the real model: frames it writes, decoded either way, differ from the
    exact path's decode by under 1% of the codec's own error at 20x (whatever this CPU's bf16 path does)."""
    from kvbm_codec.codec.kvtc import KVTCCodec

    ids = smollm.encode("A heron stood in the shallows while the tide turned over the flats. " * 14)
    configure_fp32_matmul("ieee")
    kv = smollm.prefill_kv(ids)
    codec = KVTCCodec(small_calibration, 20.0)
    exact = codec.decode(codec.encode(kv)).to(torch.float32)
    configure_fp32_matmul("bf16")
    frame = codec.encode(kv)
    fast = codec.decode(frame).to(torch.float32)
    configure_fp32_matmul("ieee")
    crossed = codec.decode(frame).to(torch.float32)
    for name in ("keys", "values"):
        ref, e = getattr(kv, name), getattr(exact, name)
        codec_err = float((e - ref).pow(2).sum())
        for other in (fast, crossed):
            assert float((getattr(other, name) - e).pow(2).sum()) < 0.01 * codec_err


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
