"""A short, fixed-budget fuzz of the frame parser and the full decoder (the long runs: docs/reliability.md).

Seeds are real frames of SmolLM2-135M KV. Hypothesis mutates them (bit flips, cuts, splices, and
header fields set to hostile integers with the digests recomputed, so the checks behind the
checksums are reached) and the oracles of ``fuzz/harness.py`` require: no exception but a
CodecError, no success of an altered frame whose digest was not recomputed, and KV consistent with
its header (bit-identical to the seed's when content equals the seed's). A second test runs the
atheris target itself for a few hundred executions, so the long-run entry point cannot rot.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.build_corpus import calibration_path, make_seeds, seeds_dir
from fuzz.harness import DecodeOracle, ParseOracle, WrongDecodeError, reseal, reseal_chunks
from kvbm_codec.calibration.artifact import save_calibration
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.errors import CodecError, FrameChecksumError
from kvbm_codec.codec.kvtc import KVTCCodec

pytestmark = pytest.mark.slow
PREFIX = struct.Struct("<4sHHI")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(smollm, small_calibration) -> list[bytes]:  # type: ignore[no-untyped-def]
    from kvbm_codec.texts import calibration_texts

    ids = smollm.tokenizer(calibration_texts()[7], add_special_tokens=False, return_tensors="pt")["input_ids"]
    kv, _ = smollm.prefill(ids[:, :64], return_logits=False)
    return list(make_seeds(KVTCCodec(small_calibration, 20.0), kv).values())


@pytest.fixture(scope="module")
def decode_oracle(small_calibration, seeds: list[bytes]) -> DecodeOracle:  # type: ignore[no-untyped-def]
    return DecodeOracle(KVTCCodec(small_calibration, 20.0), seeds)


# ---- mutations ---------------------------------------------------------------------------------------

HOSTILE_INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from(
        [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**9, 65536, 65537]
    ),
)
INT_FIELDS = ["n_tokens", "layer_start", "layer_end", "n_kv_heads", "key_head_dim", "value_head_dim"]


def _edit_header(frame: bytes, path: list[object], value: object) -> bytes | None:
    """Set one header field (a path into the JSON), keeping the digest valid; None if the path is absent."""
    _, version, flags, hlen = PREFIX.unpack_from(frame)
    try:
        header = json.loads(frame[12 : 12 + hlen])
    except ValueError:  # an earlier mutation broke the JSON: nothing to edit
        return None
    node: object = header
    try:
        for p in path[:-1]:
            node = node[p]  # type: ignore[index]
        node[path[-1]] = value  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    hj = json.dumps(header).encode()
    rebuilt = PREFIX.pack(b"KVTC", version, flags, len(hj)) + hj + frame[12 + hlen :]
    return reseal_chunks(rebuilt)


@st.composite
def header_edits(draw: st.DrawFn) -> tuple[list[object], object]:
    kind = draw(st.sampled_from(["int", "positions", "raw", "section", "chunk", "string"]))
    v = draw(HOSTILE_INTS)
    if kind == "int":
        return [draw(st.sampled_from(INT_FIELDS))], v
    if kind == "positions":
        return ["positions", draw(st.integers(0, 2)), draw(st.integers(0, 1))], v
    if kind == "raw":
        return ["raw_token_index", draw(st.integers(0, 1)), draw(st.integers(0, 1))], v
    if kind == "section":
        return ["sections", draw(st.integers(0, 12)), "raw_size"], v
    if kind == "chunk":
        field = draw(st.sampled_from(["raw_size", "compressed_size"]))
        return ["sections", draw(st.integers(0, 12)), "chunks", 0, field], v
    field = draw(st.sampled_from(["dtype", "codec", "allocation_id", "calibration_id"]))
    return [field], draw(st.sampled_from(["float16", "bfloat16", "float32", "kvtc", "", "x" * 300]))


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> tuple[bytes, bool]:
    """(frame, whether its digests were recomputed after the last mutation, i.e. a forgery)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    sealed = False
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "insert", "header"]))
        if not data:
            break
        sealed = False
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            a = draw(st.integers(0, len(data)))
            del data[a : a + draw(st.integers(1, 64))]
        elif op == "insert":
            data[draw(st.integers(0, len(data))) : 0] = draw(st.binary(min_size=1, max_size=16))
        else:
            path, value = draw(header_edits())
            edited = _edit_header(bytes(data), path, value) if len(data) > 28 else None
            if edited is not None:
                data, sealed = bytearray(edited), True
    return bytes(data), sealed


# ---- tests -------------------------------------------------------------------------------------------


def test_seeds_decode_and_resealing_is_faithful(seeds: list[bytes], decode_oracle: DecodeOracle) -> None:
    """Guards the fuzzers' premises: seeds decode, resealing an intact frame is the identity, and a
    forgery equal in content to a seed is compared bit for bit with the seed's decode."""
    v1 = 0
    for s in seeds:
        assert reseal(s) == s and reseal_chunks(s) == s
        decode_oracle(s)
        _, version, flags, hlen = PREFIX.unpack_from(s)
        if version == fr.FORMAT_VERSION_BLOCK:  # a binary header has one spelling only
            continue
        v1 += 1
        spaced = json.dumps(json.loads(s[12 : 12 + hlen]), indent=1).encode()  # same content, new bytes
        body = PREFIX.pack(b"KVTC", version, flags, len(spaced)) + spaced + s[12 + hlen : -16]
        forged = reseal(body + bytes(16))
        assert forged is not None and forged != s
        decode_oracle._one("reseal", forged)
        with pytest.raises(WrongDecodeError):  # as given, a success of anything but a seed is a bypass
            decode_oracle._one("asis", forged)
    assert decode_oracle.stats["asis:ok"] == len(seeds) + v1
    assert decode_oracle.stats["reseal:ok_compared"] == v1


def test_v2_block_seeds_are_covered_and_rechunk_repairs_their_crcs(seeds: list[bytes]) -> None:
    """The fuzzers reach past the v2 binary header's chunk CRCs: reseal_chunks recomputes them, so a
    damaged payload byte is judged by the inflater and the decoder, not only by the checksum."""
    v2 = [s for s in seeds if PREFIX.unpack_from(s)[1] == fr.FORMAT_VERSION_BLOCK]
    assert len(v2) >= 3
    for s in v2:
        bad = bytearray(s)
        bad[-20] ^= 0x40  # inside the last stream's compressed bytes
        with pytest.raises(FrameChecksumError):
            fr.read_frame(reseal(bytes(bad))).verify()  # type: ignore[arg-type]
        fixed = reseal_chunks(bytes(bad))
        assert fixed is not None and fixed != s
        try:
            fr.read_frame(fixed).verify()  # CRCs and digest now hold: any refusal is the inflater's
        except CodecError as e:
            assert not isinstance(e, FrameChecksumError)


def test_oracle_catches_a_checksum_bypass(seeds: list[bytes], small_calibration) -> None:  # type: ignore[no-untyped-def]
    """The oracle must fail when a decoder accepts damage: fake one by decoding the pristine seed."""

    class Lenient(KVTCCodec):
        def decode(self, data, device="cpu"):  # type: ignore[no-untyped-def]
            return super().decode(seeds[0], device)

    oracle = DecodeOracle(Lenient(small_calibration, 20.0), seeds[:1])
    bad = bytearray(seeds[0])
    bad[100] ^= 1
    with pytest.raises(WrongDecodeError):
        oracle(bytes(bad))


@settings(
    max_examples=int(os.environ.get("KVBM_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_frames_never_crash_or_decode_wrong(
    data: st.DataObject, seeds: list[bytes], decode_oracle: DecodeOracle
) -> None:
    frame, forged = data.draw(mutated(seeds))
    for oracle in (decode_oracle, ParseOracle(seeds)):  # each raises on a non-CodecError or a wrong decode
        if forged:
            oracle.forged(frame)
        else:
            oracle(frame)


@pytest.fixture(scope="module", params=["symmetric", "ecsq"])
def quantizer_seeds(request, smollm) -> tuple[DecodeOracle, list[bytes]]:  # type: ignore[no-untyped-def]
    """Seeds of the other quantizers' calibrations (CodecConfig.quantizer), so every size check behind
    the checksums meets their layouts too: symmetric groups' scales streams hold one fp16 value per
    group; entropy-coded frames are version 1 with ANS code streams of data-dependent size and
    per-token gains, where the entropy stage's own refusals meet every mutation."""
    from kvbm_codec.calibration.calibrate import calibrate_small
    from kvbm_codec.texts import calibration_texts

    if request.param == "ecsq":
        cal = request.getfixturevalue("small_ecsq_calibration")
    else:
        cal = calibrate_small(smollm, quantizer=request.param)
    codec = KVTCCodec(cal, 20.0)
    ids = smollm.tokenizer(calibration_texts()[7], add_special_tokens=False, return_tensors="pt")["input_ids"]
    kv, _ = smollm.prefill(ids[:, :64], return_logits=False)
    seeds = list(make_seeds(codec, kv).values())
    return DecodeOracle(codec, seeds), seeds


@settings(
    max_examples=int(os.environ.get("KVBM_FUZZ_EXAMPLES", "250")) // 2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_frames_of_other_quantizers_never_crash_or_decode_wrong(
    data: st.DataObject, quantizer_seeds: tuple[DecodeOracle, list[bytes]]
) -> None:
    oracle, seeds = quantizer_seeds
    frame, forged = data.draw(mutated(seeds))
    if forged:
        oracle.forged(frame)
    else:
        oracle(frame)


def test_hostile_header_values_are_codec_errors(seeds: list[bytes], decode_oracle: DecodeOracle) -> None:
    """Sizes that would allocate terabytes or overflow int64 must be refused before any allocation."""
    base = seeds[0]
    n = decode_oracle.codec.decode(base).n_tokens
    cases = [
        (["positions", 0, 0], 2**63),
        (["positions", 0, 0], 2**64 + 5),
        (["positions", 0, 1], 10**12),
        (["n_tokens"], 10**12),
        (["raw_token_index", 0, 1], 10**12),
    ]
    for path, value in cases:
        forged = _edit_header(base, path, value)
        assert forged is not None
        with pytest.raises(CodecError):
            decode_oracle.codec.decode(forged)
    # both together (consistent header, inconsistent payload): the allocation must not happen
    forged = _edit_header(base, ["positions"], [[0, 10**12]])
    assert forged is not None
    forged = _edit_header(forged, ["n_tokens"], 10**12)
    assert forged is not None and n < 10**12
    with pytest.raises(CodecError):
        decode_oracle.codec.decode(forged)


def test_atheris_target_runs(tmp_path: Path, seeds: list[bytes], small_calibration) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "fuzz"
    seeds_dir(root).mkdir(parents=True)
    save_calibration(small_calibration, calibration_path(root))
    for i, s in enumerate(seeds):
        (seeds_dir(root) / f"{i}.kvtc").write_bytes(s)
    work = tmp_path / "corpus"
    work.mkdir()
    runs = 400
    env = {**os.environ, "KVBM_FUZZ_DIR": str(root), "KVBM_FUZZ_REPORT_EVERY": "100000"}
    proc = subprocess.run(
        # same memory limit as the recorded long run (libFuzzer's default 2 GiB is below what torch +
        # the calibration + libFuzzer's own corpus take at start on some machines)
        [sys.executable, "-m", "fuzz.fuzz_decode", f"-runs={runs}", "-timeout=30", "-seed=1",
         "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/", str(work),
         str(seeds_dir(root))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stderr.splitlines()
        if line.startswith("#kvbm-fuzz {")
    ]
    assert stats and stats[-1]["executions"] == runs, proc.stderr[-2000:]
    outcomes = stats[-1]["outcomes"]
    assert outcomes.get("asis:ok", 0) >= len(seeds)  # the seeds themselves ran and decoded
    assert sum(v for k, v in outcomes.items() if not k.endswith("ok") and "compared" not in k) > 0
