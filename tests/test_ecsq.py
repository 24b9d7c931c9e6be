"""The entropy-coded quantizer (``quantizer="ecsq"``) end to end on real SmolLM2 KV: calibration fits
tables and steps that meet their targets on held-out calibration KV, frames restore close to the
original, the artifact carries the tables, blocks go through the block codec, and a frame that was
damaged, cut or sent to another calibration is refused, never decoded into other KV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvbm_codec.api.blocks import BlockSpec, kv_to_block
from kvbm_codec.calibration.artifact import load_calibration, save_calibration
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.codec.ecsq import EcsqBasis, decode_basis, encode_basis, gains, quantize_basis
from kvbm_codec.codec.errors import CalibrationMismatchError, FrameError, FrameHeaderError
from kvbm_codec.codec.kvtc import KVTCCodec, default_raw_mask
from kvbm_codec.codec.pca import to_features
from kvbm_codec.eval.run import relative_mse
from kvbm_codec.texts import calibration_texts


@pytest.fixture(scope="module")
def ecsq(smollm, small_ecsq_calibration, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("ecsq") / "ecsq.kvtc"
    save_calibration(small_ecsq_calibration, path)
    ids = smollm.encode(" ".join(calibration_texts()[20:26]))[:, :448]
    kv, _ = smollm.prefill(ids, return_logits=False)
    return load_calibration(path), kv


def test_calibration_meets_its_targets_with_tables_it_ships(ecsq) -> None:  # type: ignore[no-untyped-def]
    cal, _ = ecsq
    assert cal.config.quantizer == "ecsq" and cal.code_tables is not None
    assert sorted(cal.allocations) == ["cr20", "cr20@p32", "cr8", "cr8@p32"]
    for name, target in (("cr8", 8.0), ("cr20", 20.0), ("cr8@p32", 8.0), ("cr20@p32", 20.0)):
        a = cal.allocations[name]
        assert a.entropy_coded and a.meta["target_cr"] == target
        # real frames of held-out KV (whole contexts, or 32-token blocks) meet the target, just
        assert 1 <= a.meta["calibration_cr"] / target < 1.03
    # blocks: sized on block frames, one step no finer than the context's
    assert cal.block_allocation(20.0, 32) is cal.allocations["cr20@p32"]
    assert cal.allocations["cr20@p32"].step >= cal.allocations["cr20"].step
    assert cal.allocations["cr8"].step < cal.allocations["cr20"].step
    kept8 = sum(b.size for bl in cal.allocations["cr8"].blocks.values() for b in bl)
    kept20 = sum(b.size for bl in cal.allocations["cr20"].blocks.values() for b in bl)
    assert kept8 > kept20 > 0  # a finer step keeps more components


def test_frames_restore_close_and_the_ratio_follows_the_target(ecsq) -> None:  # type: ignore[no-untyped-def]
    cal, kv = ecsq
    mask = ~default_raw_mask(kv.positions, cal.config.sink_tokens, cal.config.window_tokens)
    errs, ratios = [], []
    for target in (8.0, 20.0):
        codec = KVTCCodec(cal, target)
        frame, stats = codec.encode_with_stats(kv)
        out = codec.decode(frame)
        assert torch.equal(out.positions, kv.positions)
        raw = ~mask  # sinks and the window travel exact
        assert torch.equal(out.keys[:, :, raw], kv.keys[:, :, raw].to(torch.float16))
        errs.append(relative_mse(kv.values[:, :, mask], out.values[:, :, mask]))
        ratios.append(stats.achieved_cr)
        assert codec.encode(kv) == frame  # deterministic
    assert errs[0] < errs[1] < 0.5 and errs[0] < 0.1
    assert 6.5 < ratios[0] < 9.5 and 16 < ratios[1] < 24  # unseen text: near, not at, the target


def test_the_artifact_round_trips_and_a_foreign_calibration_is_refused(ecsq, small_calibration) -> None:  # type: ignore[no-untyped-def]
    cal, kv = ecsq
    frame = KVTCCodec(cal, 20.0).encode(kv)
    with pytest.raises(CalibrationMismatchError):
        KVTCCodec(small_calibration, 20.0).decode(frame)
    bare = dataclasses.replace(cal, code_tables=None)
    with pytest.raises(CalibrationMismatchError, match="no code tables"):
        KVTCCodec(bare, 20.0).decode(frame)


def test_damaged_and_forged_frames_are_refused(ecsq) -> None:  # type: ignore[no-untyped-def]
    cal, kv = ecsq
    codec = KVTCCodec(cal, 20.0)
    frame = bytearray(codec.encode(kv))
    for off in (len(frame) // 3, len(frame) // 2, len(frame) - 40):
        bad = bytearray(frame)
        bad[off] ^= 0x10
        with pytest.raises(FrameError):
            codec.decode(bytes(bad))
    with pytest.raises(FrameError):
        codec.decode(bytes(frame[:-100]))
    # a forged frame with valid checksums: one basis' codes stream swapped for another's
    f = fr.read_frame(bytes(frame))
    secs = {s.name: f.section(s.name) for s in f.header.sections}
    secs["g0.k.codes"], secs["g0.v.codes"] = secs["g0.v.codes"], secs["g0.k.codes"]
    header = f.header.model_copy(update={"sections": []})
    forged = fr.write_frame(header, [(s.name, secs[s.name]) for s in f.header.sections])
    with pytest.raises(FrameHeaderError):
        codec.decode(forged)


def test_blocks_are_compact_version_2_frames_batched_like_single_calls(ecsq) -> None:  # type: ignore[no-untyped-def]
    """Blocks go through the block codec as v2 frames: one binary header, every basis' codes in
    one ANS stream, the batch's math done once; a batch (sink block and an exact block among them)
    gives the bytes single calls give, and decodes as they and the frame-at-a-time decoder do."""
    cal, kv = ecsq
    s = cal.shape
    spec = BlockSpec(
        n_layers=s.n_layers, n_kv_heads=s.n_kv_heads, head_dim=s.key_head_dim, page_size=32, dtype="float16"
    )
    codec = KVTCBlockCodec(KVTCCodec(cal, 20.0), spec)
    items = []
    for b in range(0, 6):
        sub = kv.select_tokens(torch.arange(b * 32, (b + 1) * 32)).to(torch.float16)
        items.append((kv_to_block(sub, spec), sub.positions))
    compress = [True, True, True, False, True, True]
    enc = codec.encode_many([b for b, _ in items], [p for _, p in items], compress)
    singles = [codec.encode(b, p, compress=c)[0] for (b, p), c in zip(items, compress, strict=True)]
    assert [f for f, _ in enc] == singles
    frames = [fr.read_frame(f) for f, _ in enc]
    assert all(f.version == fr.FORMAT_VERSION_BLOCK for f in frames)
    # the non-payload overhead of a compressed block (the exact one's raw stream is 12 chunks)
    assert all(
        fr.PREFIX_BYTES + f.header_bytes + fr.TRAILER_BYTES <= 160
        for f, c in zip(frames, compress, strict=True)
        if c
    )
    assert [len(f.header.sections) for f in frames] == [3, 2, 2, 3, 2, 2]  # sinks, exact: raw streams
    batch = codec.decode_many([f for f, _ in enc])
    for (frame, _), (block, pos), res, c in zip(enc, items, batch, compress, strict=True):
        assert not isinstance(res, Exception)
        got, got_pos = res
        assert torch.equal(got_pos, pos)
        if c:
            assert float((got.float() - block.float()).norm() / block.float().norm()) < 0.5
        else:
            assert torch.equal(got, block)
        one = codec.decode(frame)[0]
        assert torch.equal(got, one)
        assert torch.equal(got, kv_to_block(codec.codec.decode(frame), spec))  # the frame-at-a-time path
    # a block stores about what a whole context of the same tokens does (no per-frame JSON header)
    whole = kv.select_tokens(torch.arange(32, 6 * 32))
    context = codec.codec.encode_with_stats(whole, torch.zeros(whole.n_tokens, dtype=torch.bool))[1]
    blocks = sum(len(f) for (f, _), c in zip(enc[1:], compress[1:], strict=True) if c)
    ratio = 4 * items[0][0].numel() * 2 / blocks
    assert ratio > 0.9 * context.achieved_cr, (ratio, context.achieved_cr)


def test_damaged_and_forged_block_frames_are_refused_alone(ecsq) -> None:  # type: ignore[no-untyped-def]
    cal, kv = ecsq
    s = cal.shape
    spec = BlockSpec(
        n_layers=s.n_layers, n_kv_heads=s.n_kv_heads, head_dim=s.key_head_dim, page_size=32, dtype="float16"
    )
    codec = KVTCBlockCodec(KVTCCodec(cal, 20.0), spec)
    items = [kv.select_tokens(torch.arange(b * 32, (b + 1) * 32)).to(torch.float16) for b in (2, 3, 4)]
    frames = [
        f
        for f, _ in codec.encode_many(
            [kv_to_block(x, spec) for x in items], [x.positions for x in items], [True] * 3
        )
    ]
    good = fr.read_frame(frames[1])
    streams = [good.section(name) for name in good.section_names]
    codes = bytearray(streams[0])
    header = good.header.model_copy(update={"sections": []})

    def forge(codes_stream: bytes, scales: bytes = streams[1]) -> bytes:
        return fr.encode_block_frame(header, [codes_stream, scales])[0]

    assert forge(bytes(codes)) == frames[1]  # the forger writes what the encoder wrote
    bad = {
        "cut": forge(bytes(codes[:-4])),
        "longer": forge(bytes(codes) + bytes(4)),
        "one word flipped": forge(bytes(codes[:12]) + bytes([codes[12] ^ 0x40]) + bytes(codes[13:])),
        "escape count": forge(
            bytes(codes[:4])
            + (int.from_bytes(codes[4:8], "little") + 1).to_bytes(4, "little")
            + bytes(codes[8:])
        ),
        "gain zeroed": forge(bytes(codes), bytes(2) + bytes(streams[1][2:])),
        "gains cut": forge(bytes(codes), bytes(streams[1][:-2])),
    }
    for what, frame in bad.items():
        out = codec.decode_many([frames[0], frame, frames[2]])
        assert isinstance(out[1], FrameError), what
        assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception), what
        with pytest.raises(FrameError):
            codec.codec.decode(frame)


def test_the_floor_is_calibrations_choice_and_frames_keep_their_allocations_components(
    ecsq, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """How many components a basis keeps is the allocation's (hashed into its id): a later floor
    changes what calibration chooses, never how an existing frame decodes; an allocation that
    names more components than its basis has is refused as a calibration mismatch."""
    from kvbm_codec.calibration import entropy_fit
    from kvbm_codec.codec.allocation import Allocation
    from kvbm_codec.codec.quantize import Block

    cal, kv = ecsq
    alloc = cal.allocations["cr20"]
    frame = KVTCCodec(cal, alloc).encode(kv)
    before = KVTCCodec(cal, alloc).decode(frame)
    kept = {n: sum(b.size for b in bl) for n, bl in alloc.blocks.items()}
    assert kept == {n: entropy_fit.ecsq_basis(cal, n, alloc.step).n_kept for n in cal.bases}
    assert alloc.meta["min_scale"] == entropy_fit.MIN_SCALE
    monkeypatch.setattr(entropy_fit, "MIN_SCALE", entropy_fit.MIN_SCALE * 4)
    rich = entropy_fit.entropy_allocation(cal, alloc.step)
    assert sum(b.size for bl in rich.blocks.values() for b in bl) < sum(kept.values())
    assert rich.allocation_id != alloc.allocation_id
    after = KVTCCodec(cal, alloc).decode(frame)  # the codec never re-derives the floor
    assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
    name = next(iter(cal.bases))
    too_many = Allocation(
        blocks={**alloc.blocks, name: [Block(0, cal.bases[name].eigenvalues.numel() + 1, 8)]},
        step=alloc.step,
    )
    with pytest.raises(CalibrationMismatchError, match="kept components"):
        KVTCCodec(cal, too_many).encode(kv)


def test_basis_coding_is_exact_to_its_steps() -> None:
    """The quantizer alone: every coefficient within half a step (times its token's gain) of the
    original, gains as stored, the stream decoding to the codes bit for bit."""
    from kvbm_codec.codec.entropy import CodeTables

    rng = np.random.default_rng(0)
    sigma = np.sort(rng.uniform(0.01, 3.0, 40))[::-1].copy()
    eb = EcsqBasis(0.05, sigma)
    c = torch.from_numpy(rng.normal(0, sigma, (50, 40)) * rng.uniform(0.2, 3.0, (50, 1))).float()
    g = gains(c, sigma).numpy()
    q = np.rint(c.numpy() / (g.astype(np.float32)[:, None] * np.float32(eb.step))).astype(np.int32)
    tables = CodeTables.fit([(q, eb.classes(g))])
    codes, scales = encode_basis(c, eb, tables)
    back = decode_basis(codes, scales, 50, eb, tables)
    bound = torch.from_numpy(g.astype(np.float32))[:, None] * eb.step * 0.5 * 1.001
    assert bool(((back - c).abs() <= bound).all())
    with pytest.raises(ValueError, match="gains"):
        decode_basis(codes, scales[:-2], 50, eb, tables)
    with pytest.raises(ValueError, match="not finite"):
        encode_basis(torch.full((2, 40), float("nan")), eb, tables)


def test_a_frame_with_no_compressed_tokens_round_trips(ecsq) -> None:  # type: ignore[no-untyped-def]
    """Every token raw (a short prompt that is all sinks and window): empty code streams."""
    cal, kv = ecsq
    sub = kv.select_tokens(torch.arange(0, 40))
    codec = KVTCCodec(cal, 20.0)
    out = codec.decode(codec.encode(sub, torch.ones(40, dtype=torch.bool)))
    assert torch.equal(out.keys, sub.keys.to(torch.float16)) and torch.equal(
        out.values, sub.values.to(torch.float16)
    )


def test_an_entropy_coded_twin_of_a_min_max_calibration_is_the_direct_one(  # type: ignore[no-untyped-def]
    smollm, small_calibration, small_ecsq_calibration, request
) -> None:
    """Deriving tables and steps from an existing min/max calibration (a held-out prefill, not a
    calibration) gives what calibrating with quantizer="ecsq" gives: same bases, same steps, the
    same tables up to the prefills' float noise. A foreign corpus or a calibration of another
    quantizer is refused."""
    from kvbm_codec.calibration.entropy_twin import entropy_calibration_from

    twin = entropy_calibration_from(smollm, small_calibration, calibration_texts())
    direct = small_ecsq_calibration
    assert (
        twin.config == direct.config
        and twin.provenance["entropy_twin_of"] == small_calibration.calibration_id
    )
    assert sorted(twin.allocations) == sorted(direct.allocations)
    for name, a in direct.allocations.items():  # (the bisections' precision: 2e-4)
        assert twin.allocations[name].step == pytest.approx(a.step, rel=1e-3)
        kept = [sum(b.size for bl in x.blocks.values() for b in bl) for x in (twin.allocations[name], a)]
        assert abs(kept[0] - kept[1]) <= 2
    assert twin.code_tables is not None and direct.code_tables is not None
    # The same tables up to the prefills' float noise: two prefills of one text need not agree in
    # the last bit (threads split the matmuls differently run to run), which moves a few codes
    # across a rounding boundary, and in a class with a few dozen samples one code moves its
    # frequencies visibly. What a table is for must agree: the codes' length under either.
    a, b = twin.code_tables.to_array(), direct.code_tables.to_array()
    assert a.shape == b.shape and float(np.mean(a == b)) > 0.9
    _, kv = request.getfixturevalue("ecsq")
    cr20 = direct.allocations["cr20"]
    eb = KVTCCodec(direct, cr20)._ecsq_basis("g0.v", cr20, cr20.allocation_id)
    c = direct.bases["g0.v"].project(to_features(kv.values[:6].float()))[:, : eb.n_kept]
    q, _, classes = quantize_basis(c, eb)
    bits = [t.code_bits(q, classes) for t in (twin.code_tables, direct.code_tables)]
    assert bits[0] == pytest.approx(bits[1], rel=5e-3)
    with pytest.raises(ValueError, match="not the one"):
        entropy_calibration_from(smollm, small_calibration, calibration_texts()[1:])
    with pytest.raises(ValueError, match="min/max"):
        entropy_calibration_from(smollm, direct, calibration_texts())


def test_the_cli_derives_a_twin_and_refuses_one_without_ecsq(  # type: ignore[no-untyped-def]
    small_calibration, small_ecsq_calibration, tmp_path, capsys
) -> None:
    """`kvbm-codec calibrate --quantizer ecsq --twin-of CAL --out OUT`, in-process, as an operator runs it."""
    from kvbm_codec.cli import app

    source, out = tmp_path / "minmax.kvtc", tmp_path / "twin.kvtc"
    save_calibration(small_calibration, source)
    base = ["calibrate", "--corpus", "pydoc", "--twin-of", str(source), "--out", str(out)]
    with pytest.raises(SystemExit) as info:
        app(args=[*base, "--quantizer", "minmax"])
    assert info.value.code == 2 and "--quantizer ecsq" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        app(args=[*base, "--quantizer", "ecsq"])
    assert not info.value.code
    twin = load_calibration(out)
    assert twin.config.quantizer == "ecsq"
    assert twin.allocations["cr20"].step == pytest.approx(
        small_ecsq_calibration.allocations["cr20"].step, rel=1e-6
    )
