"""Static ANS entropy coding of integer codes, with tables a calibration ships (issue 16).

DEFLATE codes bytes; many PCA components carry well under one bit per token, which byte-wise Huffman
cannot reach. Here every code has a *class*, the log-spaced bin of its component's standard deviation
in units of its quantization step (``sigma / step``), and each class has one integer frequency table
fitted offline on calibration codes. A frame then needs no side information for the model: the
decoder derives every code's class from the calibration and the frame's own steps, exactly as the
encoder did. The coder is constriction's stack ANS (Rust; pinned, since its table quantisation is
part of the bitstream; tests/test_entropy.py holds a golden stream).

A stream is ``u32 words | u32 escapes | ANS words | int16 escaped codes``. A code outside its class'
table (beyond +-width) is coded as the table's escape symbol and its value follows raw. Decoding
checks that the ANS words are consumed exactly and the escape count matches, so a stream of the
wrong length or for other classes is refused rather than decoded into other codes (the frame's
checksums catch damage first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import constriction
import numpy as np

from kvbm_codec.codec.errors import FrameHeaderError

N_CLASSES = 64
SCALE_RANGE = (0.05, 400.0)  # sigma / step spanned by the classes, log spaced
PROB_BITS = 16  # table precision: every symbol of a table keeps at least 2^-16
ESCAPE_LIMIT = 32767  # escaped codes travel as int16
_HEADER = np.dtype("<u4")


def _class_bounds() -> np.ndarray:
    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
    return np.array([math.exp(lo + (i + 0.5) * (hi - lo) / (N_CLASSES - 1)) for i in range(N_CLASSES - 1)])


_BOUNDS = _class_bounds()


def class_of(scale: np.ndarray) -> np.ndarray:
    """int8 class of each ``sigma / step`` (any shape): the table its code is coded with. A search
    among fixed bounds, not a logarithm, so encoder and decoder agree on every machine (a libm's
    last bit could otherwise move a code to the next table and derail the whole stream)."""
    s = np.nan_to_num(np.asarray(scale, dtype=np.float64), nan=np.inf)
    return np.searchsorted(_BOUNDS, s, side="right").astype(np.int8)


def class_width(k: int) -> int:
    """A class' table spans +-width codes: 8 standard deviations of its widest member, at least 4."""
    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
    s = math.exp(lo + (k + 0.5) / (N_CLASSES - 1) * (hi - lo))
    return max(4, math.ceil(8 * s))


def _table_symbols(codes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    esc = np.abs(codes) > width
    return np.where(esc, 2 * width + 1, codes + width).astype(np.int32), codes[esc]


@dataclass(frozen=True)
class ClassRuns:
    """The classes of [T, n] codes whose class never rises along a row, as runs: a basis' kept
    components come in descending sigma, so along a token's row ``sigma / (step * gain)`` falls and
    each class holds one run of columns. ``edges[t, k]`` is how many leading columns of row t have a
    class >= k (``edges[:, 0] = n``, ``edges[:, N_CLASSES] = 0``); class k holds columns
    ``[edges[t, k + 1], edges[t, k])``. Grouping codes by class then costs a few vector ops, not a
    search per code and a sort (which were most of an encode)."""

    edges: np.ndarray  # [T, N_CLASSES + 1] int64
    n: int  # columns (a row-less stream still has them)

    @classmethod
    def of(cls, sigma: np.ndarray, divisors: np.ndarray) -> ClassRuns:
        """Runs of ``class_of(sigma[c] / divisors[t])``, exactly: each row divides as the elementwise
        form would and counts the quotients at or above each bound (``sigma`` must not rise)."""
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.size > 1 and bool((np.diff(sigma) > 0).any()):
            raise ValueError("class runs need sigma in descending order")
        n = sigma.size
        edges = np.zeros((divisors.size, N_CLASSES + 1), dtype=np.int64)
        edges[:, 0] = n
        rising = sigma[::-1]
        for t, d in enumerate(np.asarray(divisors, dtype=np.float64)):
            edges[t, 1:N_CLASSES] = n - np.searchsorted(rising / d, _BOUNDS, side="left")
        return cls(edges, n)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.edges.shape[0]), self.n

    def rows(self, start: int, stop: int) -> ClassRuns:
        """The runs of rows ``start .. stop - 1`` (one block's tokens of a batch)."""
        return ClassRuns(self.edges[start:stop], self.n)

    def lengths(self) -> np.ndarray:
        """[T, N_CLASSES]: codes of each class in each row."""
        return self.edges[:, :-1] - self.edges[:, 1:]

    def classes(self) -> np.ndarray:
        """The [T, n] int8 class array these runs describe."""
        t = self.edges.shape[0]
        along = np.tile(np.arange(N_CLASSES - 1, -1, -1, dtype=np.int8), t)
        return np.repeat(along, self.lengths()[:, ::-1].ravel()).reshape(self.shape)

    def plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What :func:`_plan` computes from the class array, from the runs: classes ascending, rows
        in order within a class, columns in order within a row."""
        t, n = self.shape
        lens = self.lengths()  # [T, N]
        starts = self.edges[:, 1:] + (np.arange(t, dtype=np.int64) * n)[:, None]
        run_len, run_start = lens.T.ravel(), starts.T.ravel()
        keep = run_len > 0
        run_len, run_start = run_len[keep], run_start[keep]
        before = np.cumsum(run_len) - run_len
        order = np.repeat(run_start - before, run_len) + np.arange(int(run_len.sum()), dtype=np.int64)
        counts = lens.sum(0)
        present = np.flatnonzero(counts)
        return order, np.concatenate([[0], np.cumsum(counts[present])]), present


Classes = np.ndarray | ClassRuns
"""A stream's classes: an array broadcast to its codes, or runs along its rows."""


@dataclass(frozen=True)
class CodeTables:
    """One integer frequency table per class (escape symbol last), each summing to 2^PROB_BITS."""

    freqs: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.freqs) != N_CLASSES:
            raise ValueError(f"code tables need {N_CLASSES} classes, got {len(self.freqs)}")
        for k, f in enumerate(self.freqs):
            if f.shape != (2 * class_width(k) + 2,) or int(f.min()) < 1 or int(f.sum()) != 1 << PROB_BITS:
                raise ValueError(f"code table {k} is malformed")
        cat = constriction.stream.model.Categorical
        object.__setattr__(self, "_models", [cat(f.astype(np.float64), perfect=False) for f in self.freqs])
        flat = np.concatenate(self.freqs).astype(np.float64)
        object.__setattr__(self, "_flat_bits", PROB_BITS - np.log2(flat))

    @classmethod
    def fit(cls, samples: Iterable[tuple[np.ndarray, Classes]]) -> CodeTables:
        """Tables from (codes, classes) pairs (classes broadcast to the codes; a generator is read
        once, so samples can stream): add-one smoothed counts scaled to 2^PROB_BITS, each >= 1."""
        hist = np.ones(_OFFSETS[-1], dtype=np.float64)
        for codes, classes in samples:
            hist += np.bincount(_flat_index(codes, classes)[0], minlength=hist.size)
        total = 1 << PROB_BITS
        freqs = []
        for k in range(N_CLASSES):
            h = hist[_OFFSETS[k] : _OFFSETS[k + 1]]
            f = np.maximum(1, np.floor(h / h.sum() * (total - h.size))).astype(np.int64)
            f[np.argmax(f)] += total - int(f.sum())
            freqs.append(f)
        return cls(tuple(freqs))

    def to_array(self) -> np.ndarray:
        """All tables end to end (int32): what an artifact stores; the widths are implied."""
        return np.concatenate(self.freqs).astype(np.int32)

    @classmethod
    def from_array(cls, flat: np.ndarray) -> CodeTables:
        sizes = [2 * class_width(k) + 2 for k in range(N_CLASSES)]
        if flat.shape != (sum(sizes),):
            raise ValueError(f"code tables hold {sum(sizes)} entries, got {flat.shape}")
        cuts = np.cumsum(sizes)[:-1]
        return cls(tuple(part.astype(np.int64) for part in np.split(flat, cuts)))

    def code_bits(self, codes: np.ndarray, classes: Classes) -> float:
        """Bits :func:`encode` spends on these codes (escapes 16 raw bits each), without coding."""
        idx, n_esc = _flat_index(codes, classes)
        return float(self._flat_bits[idx].sum()) + 16.0 * n_esc  # type: ignore[attr-defined]

    def encode(self, streams: Sequence[tuple[np.ndarray, Classes]], *, by_class: bool = False) -> bytes:
        """(codes, classes) pairs -> one stream; the decoder needs each pair's shape and classes.

        Symbol order: each pair's codes grouped by class (classes ascending, codes in row-major
        order within a class), the pairs one after the other; ``by_class``: every pair's codes of a
        class together (class ascending, then pair, then row-major), so a class is one coder call
        however many pairs (bases) the stream holds."""
        plans = [_plan(codes.shape, classes) for codes, classes in streams]
        grouped = [codes.ravel()[order] for (codes, _), (order, _, _) in zip(streams, plans, strict=True)]
        runs = []  # (class, its codes) in decode order
        for kk, parts in _symbol_runs(plans, by_class):
            q = [grouped[s][a:b] for s, a, b in parts]
            runs.append((kk, q[0] if len(q) == 1 else np.concatenate(q)))
        # every class' table symbols and escapes (escapes follow the symbols' order), each formed once
        coded = [(kk, *_table_symbols(q, _WIDTH_OF[kk])) for kk, q in runs]
        escaped = [esc for _, _, esc in coded]
        if any(e.size and int(np.abs(e).max()) > ESCAPE_LIMIT for e in escaped):
            raise ValueError(f"a code exceeds +-{ESCAPE_LIMIT}: its step is too fine for its data")
        coder = constriction.stream.stack.AnsCoder()
        for kk, sym, _ in reversed(coded):  # a stack coder: pushed in reverse, popped in order
            coder.encode_reverse(sym, self._models[kk])  # type: ignore[attr-defined]
        words = coder.get_compressed()
        esc_all = np.concatenate(escaped).astype("<i2") if escaped else np.zeros(0, "<i2")
        head = np.array([words.size, esc_all.size], dtype=_HEADER)
        return head.tobytes() + words.astype("<u4").tobytes() + esc_all.tobytes()

    def decode(
        self,
        data: bytes | memoryview,
        shapes: Sequence[tuple[tuple[int, ...], Classes]],
        *,
        by_class: bool = False,
    ) -> list[np.ndarray]:
        """Inverse of :func:`encode`: ``shapes`` are each stream's (codes shape, classes)."""
        view = memoryview(data).cast("B")
        if len(view) < 8:
            raise FrameHeaderError("entropy stream shorter than its header")
        n_words, n_esc = (int(x) for x in np.frombuffer(view[:8], dtype=_HEADER))
        if len(view) != 8 + 4 * n_words + 2 * n_esc:
            raise FrameHeaderError(
                f"entropy stream is {len(view)} bytes; its header promises {8 + 4 * n_words + 2 * n_esc}"
            )
        words = np.frombuffer(view[8 : 8 + 4 * n_words], dtype="<u4").astype(np.uint32)
        esc = np.frombuffer(view[8 + 4 * n_words :], dtype="<i2").astype(np.int32)
        try:
            return self._decode_words(words, esc, shapes, by_class)
        except ValueError as e:  # constriction refuses words no encoder wrote
            raise FrameHeaderError(f"entropy stream is malformed: {e}") from e

    def _decode_words(
        self,
        words: np.ndarray,
        esc: np.ndarray,
        shapes: Sequence[tuple[tuple[int, ...], Classes]],
        by_class: bool,
    ) -> list[np.ndarray]:
        coder = constriction.stream.stack.AnsCoder(words)
        plans = [_plan(shape, classes) for shape, classes in shapes]
        flats = [np.empty(order.size, dtype=np.int32) for order, _, _ in plans]
        used = 0
        for kk, parts in _symbol_runs(plans, by_class):
            w = _WIDTH_OF[kk]
            total = sum(b - a for _, a, b in parts)
            sym = coder.decode(self._models[kk], total).astype(np.int32)  # type: ignore[attr-defined]
            vals = sym - w
            hit = sym == 2 * w + 1
            n = int(hit.sum())
            if used + n > esc.size:
                raise FrameHeaderError("entropy stream has fewer escaped codes than its symbols need")
            vals[hit] = esc[used : used + n]
            used += n
            off = 0
            for s, a, b in parts:
                flats[s][plans[s][0][a:b]] = vals[off : off + b - a]
                off += b - a
        if used != esc.size or not coder.is_empty():
            raise FrameHeaderError("entropy stream does not end where its codes do: not these codes' stream")
        return [flat.reshape(shape) for flat, (shape, _) in zip(flats, shapes, strict=True)]


def _symbol_runs(
    plans: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], by_class: bool
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """A stream's symbol order, the one place encode and decode take it from: (class, [(pair,
    first, last) into that pair's class-grouped codes]) per coder call. Pairs one after the other,
    each class by class; ``by_class``: each class once, over every pair in order."""
    runs: list[tuple[int, list[tuple[int, int, int]]]] = []
    per_class: dict[int, list[tuple[int, int, int]]] = {}
    for s, (_, bounds, present) in enumerate(plans):
        for kk, a, b in zip(present.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            if by_class:
                per_class.setdefault(kk, []).append((s, a, b))
            else:
                runs.append((kk, [(s, a, b)]))
    return sorted(per_class.items()) if by_class else runs


_WIDTH_OF = tuple(class_width(k) for k in range(N_CLASSES))
_WIDTHS = np.array(_WIDTH_OF, dtype=np.int64)
_OFFSETS = np.concatenate([[0], np.cumsum(2 * _WIDTHS + 2)])


def _flat_index(codes: np.ndarray, classes: Classes) -> tuple[np.ndarray, int]:
    """(each code's index into all tables end to end, escapes): one gather instead of a loop over
    classes, for fitting and for the code lengths a step bisection asks for many times."""
    if isinstance(classes, ClassRuns):
        classes = _runs_for(codes.shape, classes).classes()
    k = np.broadcast_to(classes, codes.shape).ravel().astype(np.int64)
    q = codes.ravel().astype(np.int64)
    w = _WIDTHS[k]
    esc = np.abs(q) > w
    return _OFFSETS[k] + np.where(esc, 2 * w + 1, q + w), int(esc.sum())


def _runs_for(shape: tuple[int, ...], runs: ClassRuns) -> ClassRuns:
    if tuple(shape) != runs.shape:
        raise ValueError(f"class runs describe {runs.shape} codes, the stream has {tuple(shape)}")
    return runs


def _plan(shape: tuple[int, ...], classes: Classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(element order grouping each class' codes, class bounds in that order, classes present): a
    stable radix sort of the int8 classes, so codes keep their row-major order within a class."""
    if isinstance(classes, ClassRuns):
        return _runs_for(shape, classes).plan()
    k = np.ascontiguousarray(np.broadcast_to(classes, shape)).ravel()
    if k.size and (int(k.min()) < 0 or int(k.max()) >= N_CLASSES):
        raise ValueError(f"classes must lie in [0, {N_CLASSES})")
    k = k.astype(np.int8)
    order = np.argsort(k, kind="stable")
    counts = np.bincount(k.astype(np.int64), minlength=N_CLASSES)
    present = np.flatnonzero(counts)
    bounds = np.concatenate([[0], np.cumsum(counts[present])])
    return order, bounds, present
