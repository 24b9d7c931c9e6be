"""KVTC on the real model's KV cache: round trip, integrity refusals, RFC 1951 chunks, sparsified caches.

A small calibration (4 x 512 tokens of the calibration corpus) is computed once per module; the test
text is a slice of the corpus far from the fitted tokens.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvbm_codec.calibration.artifact import CalibrationIntegrityError, load_calibration, save_calibration
from kvbm_codec.calibration.calibrate import compressible, error_tables, token_sequences
from kvbm_codec.cli import app
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.allocation import predicted_error
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.deflate import gpu_available
from kvbm_codec.codec.errors import (
    CalibrationMismatchError,
    FrameChecksumError,
    FrameError,
    FrameTruncatedError,
    FrameVersionError,
    ModelMismatchError,
)
from kvbm_codec.codec.kvtc import KVTCCodec, default_raw_mask
from kvbm_codec.codec.params import Calibration, basis_name
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts

pytestmark = pytest.mark.slow
CFG = CodecConfig(layer_group_size=6)


@pytest.fixture(scope="module")
def calibration(
    small_calibration: Calibration, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Calibration, Path]:
    path = tmp_path_factory.mktemp("cal") / "smollm.kvtc"
    save_calibration(small_calibration, path)
    return small_calibration, path


@pytest.fixture(scope="module")
def test_ids(smollm: CausalLM) -> torch.Tensor:
    seqs = token_sequences(smollm.tokenizer, calibration_texts(), 512, 40)
    return torch.cat(seqs[30:32], dim=1)[:, :700]  # ~15k tokens past the fitted ones


@pytest.fixture(scope="module")
def kv(smollm: CausalLM, test_ids: torch.Tensor) -> KVCache:
    return smollm.prefill(test_ids[:, :600], return_logits=False)[0]


def test_round_trip_within_predicted_error(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    codec = KVTCCodec(cal, 20.0)
    frame, stats = codec.encode_with_stats(kv)
    rec = codec.decode(frame)
    assert rec.keys.shape == kv.keys.shape and rec.values.shape == kv.values.shape
    assert torch.equal(rec.positions, kv.positions)
    # The ratio the calibration promised holds on unseen text (compressed tokens only).
    assert stats.achieved_cr >= 15.0
    assert stats.achieved_cr_total == kv.nbytes(2) / len(frame)
    # Error per token against the allocator's prediction, measured in the PCA domain the DP uses.
    mask = ~default_raw_mask(kv.positions, CFG.sink_tokens, CFG.window_tokens)
    orig = compressible(kv, CFG)
    back = rec.to(torch.float32).select_tokens(torch.nonzero(mask).flatten())
    predicted = predicted_error(cal.error_tables, codec.alloc)
    for kind, a, b in (("k", orig.keys, back.keys), ("v", orig.values, back.values)):
        if kind == "k":
            a, b = undo_rope(a, orig.positions, cal.rope), undo_rope(b, orig.positions, cal.rope)
        for gi, (lo, hi) in enumerate(CFG.layer_groups(cal.shape.n_layers)):
            basis = cal.bases[basis_name(gi, kind)]
            fa = basis.normalise(to_features(a[lo:hi]))
            fb = basis.normalise(to_features(b[lo:hi]))
            real = float(((fa - fb).double() ** 2).sum(1).mean())
            pred = predicted[basis_name(gi, kind)]
            # fp16 output rounding and the text shift allow some slack, never a different regime.
            assert real <= 2.0 * pred + 1e-3, (kind, gi, real, pred)
    # Sinks and the recent window travel as fp16, bit-exact.
    raw = default_raw_mask(kv.positions, CFG.sink_tokens, CFG.window_tokens)
    assert torch.equal(rec.keys[:, :, raw], kv.keys[:, :, raw].half())
    assert torch.equal(rec.values[:, :, raw], kv.values[:, :, raw].half())


def test_more_ratio_costs_more_error(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    errs = []
    for cr in (8.0, 20.0):
        rec = KVTCCodec(cal, cr).decode(KVTCCodec(cal, cr).encode(kv))
        errs.append(float(((rec.values.float() - kv.values) ** 2).mean()))
    assert errs[0] < errs[1]


def test_layer_by_layer_restore(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    codec = KVTCCodec(cal, 20.0)
    frame = codec.encode(kv)
    parts = list(codec.iter_decode(frame))
    assert [p.layer_start for p in parts] == [a for a, _ in CFG.layer_groups(cal.shape.n_layers)]
    whole = codec.decode(frame)
    assert torch.equal(KVCache.concat_layers(parts).keys, whole.keys)
    # A frame may hold a layer-group-aligned subset of layers (e.g. KVBM LayerSeparate pages).
    sub = kv.select_layers(6, 12)
    rec = codec.decode(codec.encode(sub))
    assert rec.layer_start == 6 and rec.n_layers == 6
    with pytest.raises(ValueError, match="align"):
        codec.encode(kv.select_layers(3, 9))


def test_continued_generation_close_to_uncompressed(smollm: CausalLM, calibration, kv, test_ids) -> None:
    cal, _ = calibration
    rec = KVTCCodec(cal, 8.0).decode(KVTCCodec(cal, 8.0).encode(kv))
    cont = test_ids[:, 600:700]
    ref = smollm.logits_with_cache(kv, cont)
    out = smollm.logits_with_cache(rec.to(torch.float32), cont)
    agree = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    assert agree >= 0.9


def test_sparsified_cache_round_trip(smollm: CausalLM, calibration, kv, test_ids) -> None:
    """Eviction leaves holes in the positions; RoPE must use the true ones."""
    cal, _ = calibration
    keep = torch.ones(kv.n_tokens, dtype=torch.bool)
    keep[50:400:3] = False
    sparse = kv.select_tokens(torch.nonzero(keep).flatten())
    codec = KVTCCodec(cal, 8.0)
    frame = codec.encode(sparse)
    assert len(fr.read_frame(frame).header.positions) > 1
    rec = codec.decode(frame)
    assert torch.equal(rec.positions, sparse.positions)
    rel = float(((rec.keys.float() - sparse.keys) ** 2).sum() / (sparse.keys**2).sum())
    assert rel < 0.05
    logits = smollm.logits_with_cache(rec.to(torch.float32), test_ids[:, 600:610])
    assert bool(torch.isfinite(logits).all())


def test_cpu_frames_are_plain_rfc1951_chunks(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    data = KVTCCodec(cal, 20.0).encode(kv)
    f = fr.read_frame(data)
    offset = fr.PREFIX.size + f.header_bytes
    for sec in f.header.sections:
        out = b""
        for c in sec.chunks:
            d = zlib.decompressobj(-15)
            out += d.decompress(bytes(data[offset : offset + c.compressed_size])) + d.flush()
            assert d.eof
            offset += c.compressed_size
        assert out == f.section(sec.name)
        assert all(c.raw_size <= 64 * 1024 for c in sec.chunks)


def test_damaged_frames_are_refused(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    codec = KVTCCodec(cal, 20.0)
    data = codec.encode(kv)
    for cut in (0, 3, 11, len(data) // 2, len(data) - 1):
        with pytest.raises(FrameError):
            codec.decode(data[:cut])
    with pytest.raises(FrameTruncatedError):
        codec.decode(data[: len(data) - 100])
    g = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(data), (40,), generator=g).tolist():
        bad = bytearray(data)
        bad[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        with pytest.raises(FrameError):
            codec.decode(bytes(bad))
    bad = bytearray(data)
    bad[-200] ^= 0xFF
    with pytest.raises(FrameChecksumError):
        codec.decode(bytes(bad))
    bad = bytearray(data)
    bad[4] = 3  # versions 1 and 2 are both read; 3 is unknown
    with pytest.raises(FrameVersionError):
        codec.decode(bytes(bad))


def _reheader(data: bytes, **changes: str) -> bytes:
    f = fr.read_frame(data)
    hdr = f.header.model_copy(update={**changes, "sections": []})
    return fr.write_frame(hdr, [(s, f.section(s)) for s in f.section_names])


def test_other_calibration_or_model_is_refused(calibration, kv: KVCache) -> None:
    cal, _ = calibration
    codec = KVTCCodec(cal, 20.0)
    data = codec.encode(kv)
    with pytest.raises(CalibrationMismatchError):
        codec.decode(_reheader(data, calibration_id="0123456789abcdef"))
    with pytest.raises(CalibrationMismatchError):
        codec.decode(_reheader(data, allocation_id="feedfacefeedface"))
    with pytest.raises(ModelMismatchError):
        codec.decode(_reheader(data, model_fingerprint="f" * 32))


def test_artifact_checksum_and_model_binding(calibration, tmp_path: Path) -> None:
    cal, path = calibration
    again = load_calibration(path, expected_fingerprint=cal.model_fingerprint)
    assert again.calibration_id == cal.calibration_id
    assert again.allocation(20.0).allocation_id == cal.allocation(20.0).allocation_id
    with pytest.raises(ModelMismatchError):
        load_calibration(path, expected_fingerprint="0" * 32)
    raw = path.read_bytes()
    for where in (len(raw) // 3, len(raw) - 10):
        bad = bytearray(raw)
        bad[where] ^= 0x10
        p = tmp_path / f"bad{where}.kvtc"
        p.write_bytes(bytes(bad))
        with pytest.raises(CalibrationIntegrityError):
            load_calibration(p)
    with pytest.raises(KeyError, match="available"):
        cal.allocation(99.0)


def test_error_tables_reflect_rope_undo(smollm: CausalLM, calibration, kv: KVCache) -> None:
    """Undoing RoPE makes keys low-rank: top components hold more energy than on rotated keys."""
    cal, _ = calibration
    t = error_tables(cal.bases, compressible(kv, CFG), CFG, cal.rope, cal.shape.n_layers)
    energy = t["g0.k"].tables[16][0]
    assert energy[:2].sum() > energy[4:6].sum()


def test_cli_eval_and_inspect(calibration, tmp_path: Path) -> None:
    cal, path = calibration
    seqs = token_sequences_text()
    text = tmp_path / "text.txt"
    text.write_text(seqs)
    out = tmp_path / "r.json"
    frames = tmp_path / "frames"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "eval",
            "--text",
            str(text),
            "--target-cr",
            "20",
            "--context-tokens",
            "400",
            "--continuation-tokens",
            "48",
            "--calibration",
            str(path),
            "--json",
            str(out),
            "--save-frames",
            str(frames),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    for field in (
        "target_cr",
        "achieved_cr",
        "achieved_cr_total",
        "ppl_baseline",
        "ppl_codec",
        "top1_agreement",
        "context_tokens",
        "continuation_tokens",
    ):
        assert field in r
    assert r["context_tokens"] == 400 and r["continuation_tokens"] == 48
    assert r["achieved_cr"] > r["achieved_cr_total"] > 1
    frame = next(frames.iterdir())
    res = runner.invoke(app, ["inspect", str(frame)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["ok"] and info["header"]["calibration_id"] == cal.calibration_id
    bad = bytearray(frame.read_bytes())
    bad[len(bad) // 2] ^= 0x40
    frame.write_bytes(bytes(bad))
    res = runner.invoke(app, ["inspect", str(frame)])
    assert res.exit_code == 2
    assert "checksum_mismatch" in res.output


def token_sequences_text() -> str:
    texts = calibration_texts()
    return "\n\n".join(texts[-12:])  # topics at the end of the sorted list: far from the fitted start


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA device and nvCOMP (pip install .[gpu])")
def test_gpu_frames_interoperate_with_cpu(calibration, kv: KVCache) -> None:
    """Encode on GPU (torch CUDA + nvCOMP), decode on CPU (isal), and the reverse."""
    cal, _ = calibration
    codec = KVTCCodec(cal, 20.0)
    kv_gpu = KVCache(kv.keys.cuda(), kv.values.cuda(), kv.positions.cuda())
    gpu_frame = codec.encode(kv_gpu)
    cpu_frame = codec.encode(kv)
    ref_err = float(((codec.decode(cpu_frame).values.float() - kv.values) ** 2).mean())
    from_gpu = codec.decode(gpu_frame)  # CPU decode of a GPU-written frame
    on_gpu = codec.decode(cpu_frame, device="cuda")  # GPU decode of a CPU-written frame
    assert on_gpu.keys.is_cuda
    for rec in (from_gpu, KVCache(on_gpu.keys.cpu(), on_gpu.values.cpu(), on_gpu.positions.cpu())):
        err = float(((rec.values.float() - kv.values) ** 2).mean())
        assert err <= 1.05 * ref_err + 1e-6
