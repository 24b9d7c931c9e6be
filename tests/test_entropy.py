"""The static ANS entropy stage (codec/entropy.py): exact round trips, sizes that match the tables'
code lengths, sub-bit codes, a pinned bitstream, and refusal of every stream it did not write."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kvbm_codec.codec import entropy as E
from kvbm_codec.codec.errors import FrameHeaderError


def _codes(seed: int, tokens: int = 32, comps: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Laplace codes of components whose sigma/step spans the classes, each token with its own gain:
    (codes, static classes [n], per-token classes [T, n])."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.06), np.log(300.0), comps))
    gain = np.exp(rng.normal(0.0, 0.4, tokens))
    x = rng.laplace(0.0, sigma[None, :] / np.sqrt(2.0), (tokens, comps))
    codes = np.rint(x).astype(np.int32)
    return codes, E.class_of(sigma), E.class_of(sigma[None, :] / gain[:, None])


@pytest.fixture(scope="module")
def tables() -> E.CodeTables:
    fit = [_codes(s)[:2] for s in range(4)] + [(c, k2) for c, _, k2 in (_codes(s) for s in range(4, 6))]
    return E.CodeTables.fit(fit)


@pytest.mark.parametrize("by_class", [False, True])
def test_round_trip_is_exact_for_static_and_per_token_classes(tables: E.CodeTables, by_class: bool) -> None:
    codes, k, k2 = _codes(10)
    codes[3, 5] = 5000  # far beyond its table: escapes
    codes[0, 0] = -E.ESCAPE_LIMIT
    codes[5, 7] = 4000
    streams = [(codes, k), (codes[:7], k2[:7]), (np.zeros((0, codes.shape[1]), np.int32), k)]
    data = tables.encode(streams, by_class=by_class)
    back = tables.decode(data, [(c.shape, kk) for c, kk in streams], by_class=by_class)
    for (c, _), b in zip(streams, back, strict=True):
        np.testing.assert_array_equal(b, c)


def test_by_class_groups_every_streams_codes_of_a_class_and_is_its_own_layout(tables: E.CodeTables) -> None:
    """A v2 frame's one stream over all its bases: the same symbols and code length, fewer coder
    calls; read in the other order it is refused or decodes to other codes, never to these."""
    codes, _, k2 = _codes(16)
    streams = [(codes, k2), (codes[::-1].copy(), k2)]
    shapes = [(c.shape, kk) for c, kk in streams]
    merged, apart = tables.encode(streams, by_class=True), tables.encode(streams)
    assert merged != apart and abs(len(merged) - len(apart)) <= 8
    try:
        wrong = tables.decode(merged, shapes)
    except FrameHeaderError:
        return
    assert any(not np.array_equal(w, c) for w, (c, _) in zip(wrong, streams, strict=True))


def test_stream_size_is_the_tables_code_length(tables: E.CodeTables) -> None:
    codes, k, _ = _codes(11, tokens=64)
    bits = tables.code_bits(codes, k)
    coded = 8 * (len(tables.encode([(codes, k)])) - 8)  # less the 8-byte header
    assert bits <= coded <= bits * 1.01 + 64  # ANS: within 1% (+ its final word)


def test_components_under_one_step_cost_a_fraction_of_a_bit() -> None:
    """What DEFLATE's byte-wise Huffman cannot do: a component of sigma 0.1 steps is nearly all zeros."""
    rng = np.random.default_rng(3)
    codes = np.rint(rng.laplace(0.0, 0.1 / np.sqrt(2.0), (4096, 8))).astype(np.int32)
    k = E.class_of(np.full(8, 0.1))
    tabs = E.CodeTables.fit([(codes, k)])
    per_code = 8 * len(tabs.encode([(codes, k)])) / codes.size
    assert per_code < 0.1


def test_tables_survive_their_array_form(tables: E.CodeTables) -> None:
    codes, _, k2 = _codes(12)
    again = E.CodeTables.from_array(tables.to_array())
    assert again.encode([(codes, k2)]) == tables.encode([(codes, k2)])
    with pytest.raises(ValueError, match="entries"):
        E.CodeTables.from_array(tables.to_array()[:-1])
    bad = tables.to_array().copy()
    bad[0] += 1  # no longer sums to 2^PROB_BITS
    with pytest.raises(ValueError, match="malformed"):
        E.CodeTables.from_array(bad)


def test_bitstream_is_pinned(tables: E.CodeTables) -> None:
    """Tables and streams are part of the format: a constriction upgrade that changes a byte of
    either must fail here, not decode old frames into other codes."""
    codes, k, k2 = _codes(13)
    data = tables.encode([(codes, k), (codes, k2)])
    merged = tables.encode([(codes, k), (codes, k2)], by_class=True)
    assert hashlib.sha256(tables.to_array().tobytes()).hexdigest()[:16] == TABLES_SHA
    assert hashlib.sha256(data).hexdigest()[:16] == STREAM_SHA
    assert hashlib.sha256(merged).hexdigest()[:16] == BY_CLASS_SHA


TABLES_SHA = "859e5c659ce232d0"
STREAM_SHA = "e3f06bdfe8efc66d"
BY_CLASS_SHA = "b96a247b8c617a6a"


def test_streams_it_did_not_write_are_refused(tables: E.CodeTables) -> None:
    codes, k, k2 = _codes(14)
    shapes = [(codes.shape, k), (codes.shape, k2)]
    data = tables.encode([(codes, k), (codes, k2)])
    for bad in (data[:-2], data + b"\0\0", data[:5]):
        with pytest.raises(FrameHeaderError, match="entropy stream"):
            tables.decode(bad, shapes)
    zeroed = data[:8] + bytes(len(data) - 8)
    with pytest.raises(FrameHeaderError, match="entropy stream"):
        tables.decode(zeroed, shapes)
    with pytest.raises(FrameHeaderError, match="does not end"):
        tables.decode(data, shapes[:1])  # another frame's layout: fewer codes than the stream holds


def test_encode_refuses_what_it_cannot_carry(tables: E.CodeTables) -> None:
    codes, k, _ = _codes(15)
    codes[1, 1] = E.ESCAPE_LIMIT + 1
    with pytest.raises(ValueError, match="exceeds"):
        tables.encode([(codes, k)])
    with pytest.raises(ValueError, match="classes"):
        tables.encode([(codes, np.full(codes.shape[1], E.N_CLASSES, np.int64))])


def test_class_runs_are_the_class_array_exactly(tables: E.CodeTables) -> None:
    """A basis' classes as runs (descending sigma) give the elementwise classes, the same grouping
    and the same bytes, including scales that sit exactly on a class bound."""
    rng = np.random.default_rng(16)
    # with divisor 1, a quotient exactly on every fifth bound
    sigma = np.sort(np.concatenate([np.exp(rng.uniform(np.log(0.01), np.log(500.0), 300)), E._BOUNDS[::5]]))
    sigma = sigma[::-1].copy()
    divisors = np.exp(rng.normal(0.0, 0.7, 20))
    divisors[0] = 1.0
    runs = E.ClassRuns.of(sigma, divisors)
    dense = E.class_of(sigma[None, :] / divisors[:, None])
    np.testing.assert_array_equal(runs.classes(), dense)
    for a, b in zip(runs.plan(), E._plan(dense.shape, dense), strict=True):
        np.testing.assert_array_equal(a, b)
    codes = np.rint(rng.laplace(0.0, sigma[None, :] / divisors[:, None])).astype(np.int32)
    assert tables.encode([(codes, runs)]) == tables.encode([(codes, dense)])
    np.testing.assert_array_equal(
        tables.decode(tables.encode([(codes, runs)]), [(codes.shape, runs)])[0], codes
    )
    assert tables.code_bits(codes, runs) == tables.code_bits(codes, dense)
    empty = E.ClassRuns.of(sigma, divisors[:0])  # no tokens: still the basis' width
    assert empty.shape == (0, sigma.size) and empty.classes().shape == (0, sigma.size)
    assert tables.decode(tables.encode([(codes[:0], empty)]), [((0, sigma.size), empty)])[0].shape == (
        0,
        sigma.size,
    )
    with pytest.raises(ValueError, match="describe"):
        tables.encode([(codes[:5], runs)])
    with pytest.raises(ValueError, match="descending"):
        E.ClassRuns.of(sigma[::-1].copy(), divisors)
