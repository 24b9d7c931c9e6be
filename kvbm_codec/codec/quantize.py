"""Group-wise min/max quantization of PCA coefficients, and the byte packing fed to DEFLATE.

Each token's coefficients are cut into blocks (start, size, bits) chosen by the DP allocator; every
block of every token gets its own fp16 shift (min) and fp16 scale, the paper's 16-bit scale/shift.
``symmetric`` groups (``CodecConfig.quantizer``) store the scale only: the range is +-max|x|, the
shift is -scale * (2^bits - 1) / 2, derived the same way by the encoder and every decoder. That halves
the side information, and the codes of a component then put 0 at one code in every token, which
DEFLATE codes better: at the same bits the distortion measured 0.90x of min/max groups'
(bench/quantizer_bound.py, docs/benchmarks.md "Session 24").
Codes are packed byte-aligned (8, 4, 2 or 1 codes per byte) and component-major, so that DEFLATE's
Huffman stage sees each component's skewed code distribution whole: padding bits are constant and
cost nothing after entropy coding, whereas tight bit packing would scramble symbol boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Block:
    start: int
    size: int
    bits: int


def slot_bits(bits: int) -> int:
    """Width of the byte-aligned slot a code of `bits` bits is stored in."""
    if bits <= 0 or bits > 8:
        raise ValueError(f"code width must be 1..8 bits, got {bits}")
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    slot = slot_bits(bits)
    per_byte = 8 // slot
    flat = codes.reshape(-1).astype(np.uint8, copy=False)
    if per_byte == 1:
        return flat.tobytes()
    pad = (-flat.size) % per_byte
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    lanes = flat.reshape(-1, per_byte)
    packed = np.zeros(lanes.shape[0], dtype=np.uint8)
    for j in range(per_byte):
        packed |= lanes[:, j] << np.uint8(slot * j)
    return packed.tobytes()


def unpack_codes(data: memoryview | bytes, count: int, bits: int) -> np.ndarray:
    slot = slot_bits(bits)
    per_byte = 8 // slot
    packed = np.frombuffer(data, dtype=np.uint8)
    if per_byte == 1:
        return packed[:count]
    mask = np.uint8((1 << slot) - 1)
    lanes = np.empty((packed.size, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        lanes[:, j] = (packed >> np.uint8(slot * j)) & mask
    return lanes.reshape(-1)[:count]


def packed_size(count: int, bits: int) -> int:
    per_byte = 8 // slot_bits(bits)
    return -(-count // per_byte)


def quantize_groups(
    x: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, n, g] -> codes uint8 [T, n, g], shift [T, n] (fp16; float32 derived from the scale when
    ``symmetric``), scale fp16 [T, n]."""
    if symmetric:
        return _quantize_symmetric(x, x.abs().amax(-1), bits)
    return _quantize_in_range(x, x.amin(-1), x.amax(-1), bits)


def _check_range(coeffs: torch.Tensor, symmetric: bool) -> None:
    """A symmetric 1-bit group's scale is 2 max|x|: it must stay finite in fp16 as well."""
    limit = FP16_MAX / 2 if symmetric else FP16_MAX
    if coeffs.numel() and float(coeffs.abs().max()) > limit:
        raise ValueError("PCA coefficients exceed the fp16 range of the scale/shift fields")


def symmetric_shift(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The shift of a symmetric group, float32, from its fp16 scale: one multiply, so every encoder and
    decoder (CPU or GPU) derives the same value."""
    return scale.to(torch.float32) * (-((1 << bits) - 1) / 2)


def _quantize_symmetric(
    x: torch.Tensor, peak: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric groups given each group's max |x|: codes over [-peak, peak], the shift derived."""
    levels = (1 << bits) - 1
    scale = (peak * (2 / levels)).to(torch.float16)
    shift = symmetric_shift(scale, bits)
    s32 = scale.to(torch.float32)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.round((x - shift[..., None]) / safe[..., None]).clamp_(0, levels).to(torch.uint8)
    return codes, shift, scale


def _quantize_in_range(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_groups given each group's min/max, so the error tables can reuse them across widths."""
    levels = (1 << bits) - 1
    shift = lo.to(torch.float16)
    scale = ((hi - shift.to(torch.float32)) / levels).to(torch.float16)
    s32 = scale.to(torch.float32)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.round((x - shift.to(torch.float32)[..., None]) / safe[..., None])
    codes = codes.clamp_(0, levels).to(torch.uint8)
    return codes, shift, scale


def dequantize_groups(codes: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return shift.to(torch.float32)[..., None] + codes.to(torch.float32) * scale.to(torch.float32)[..., None]


def _runs(blocks: list[Block]) -> list[tuple[int, int, int, int]]:
    """Consecutive blocks of equal (size, bits) -> (start, size, bits, count), vectorised together."""
    out = []
    for (size, bits), grp in groupby(blocks, key=lambda b: (b.size, b.bits)):
        grp = list(grp)
        out.append((grp[0].start, size, bits, len(grp)))
    return out


def active_components(blocks: list[Block]) -> torch.Tensor:
    """Indices of components that carry bits, in stream order (the rest decode as zero)."""
    idx = [torch.arange(b.start, b.start + b.size) for b in blocks if b.bits > 0]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def _side(shift: torch.Tensor, scale: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """[..., T, count] shift and scale -> the side values a scales stream holds, [..., k, count, T]."""
    if symmetric:
        return scale.transpose(-1, -2).unsqueeze(-3)
    return torch.stack([shift.transpose(-1, -2), scale.transpose(-1, -2)], dim=-3)


def encode_coefficients(
    coeffs: torch.Tensor, blocks: list[Block], symmetric: bool = False
) -> tuple[bytes, bytes]:
    """coeffs [T, n_active] (active components only, in stream order) -> (codes stream, scales stream)."""
    _check_range(coeffs, symmetric)
    n_tokens = coeffs.shape[0]
    codes_out: list[bytes] = []
    scales_out: list[bytes] = []
    col = 0
    for _start, size, bits, count in _runs([b for b in blocks if b.bits > 0]):
        width = size * count
        x = coeffs[:, col : col + width].reshape(n_tokens, count, size)
        col += width
        codes, shift, scale = quantize_groups(x, bits, symmetric)
        codes_out.append(pack_codes(codes.permute(1, 2, 0).contiguous().cpu().numpy(), bits))
        scales_out.append(_side(shift, scale, symmetric).contiguous().cpu().numpy().tobytes())
    return b"".join(codes_out), b"".join(scales_out)


@dataclass(frozen=True)
class Tiling:
    """A basis' active groups as runs of equal (size, bits): ``(start, size, bits, count)``, what every
    pass over its streams walks. Built once per allocation and basis by the codec: walking the
    allocation's groups again for every frame cost ~3% of a batched block decode."""

    runs: tuple[tuple[int, int, int, int], ...]
    n_active: int
    symmetric: bool = False

    @classmethod
    def of(cls, blocks: list[Block], symmetric: bool = False) -> Tiling:
        runs = tuple(_runs([b for b in blocks if b.bits > 0]))
        return cls(runs, sum(size * count for _, size, _, count in runs), symmetric)

    @property
    def side_values(self) -> int:
        """fp16 values per group and token in the scales stream: scale (symmetric) or shift + scale."""
        return 1 if self.symmetric else 2

    def stream_sizes(self, n_tokens: int) -> tuple[int, int]:
        """Exact byte sizes of the (codes, scales) streams of ``n_tokens`` tokens."""
        codes = sum(packed_size(s * c * n_tokens, bits) for _, s, bits, c in self.runs)
        return codes, sum(c * self.side_values * n_tokens * 2 for _, _, _, c in self.runs)


def stream_sizes(blocks: list[Block], n_tokens: int, symmetric: bool = False) -> tuple[int, int]:
    """Exact byte sizes of the (codes, scales) streams of ``n_tokens`` tokens under ``blocks``."""
    return Tiling.of(blocks, symmetric).stream_sizes(n_tokens)


def code_segments(blocks: list[Block], n_tokens: int) -> list[tuple[int, int]]:
    """(bytes, bits) of each run of equal-width groups in the codes stream, in stream order: where
    the code statistics change, so the entropy stage can start fresh tables there."""
    return [
        (packed_size(s * c * n_tokens, bits), bits)
        for _, s, bits, c in _runs([b for b in blocks if b.bits > 0])
    ]


def decode_coefficients(
    codes: bytes, scales: bytes, blocks: list[Block], n_tokens: int, symmetric: bool = False
) -> torch.Tensor:
    """Inverse of encode_coefficients -> [T, n_active] float32. Stream sizes are checked exactly."""
    tiling = Tiling.of(blocks, symmetric)
    k = tiling.side_values
    expected_codes, expected_scales = tiling.stream_sizes(n_tokens)
    if len(codes) != expected_codes or len(scales) != expected_scales:
        raise ValueError(
            f"coefficient streams have {len(codes)}/{len(scales)} bytes, "
            f"allocation needs {expected_codes}/{expected_scales}"
        )
    parts = []
    cpos = spos = 0
    cview, sview = memoryview(codes), memoryview(scales)
    for _start, size, bits, count in tiling.runs:
        n = size * count * n_tokens
        nbytes = packed_size(n, bits)
        c = unpack_codes(cview[cpos : cpos + nbytes], n, bits)
        cpos += nbytes
        ss = np.frombuffer(sview[spos : spos + count * n_tokens * 2 * k], dtype=np.float16)
        spos += count * n_tokens * 2 * k
        ss = torch.from_numpy(ss.copy()).reshape(k, count, n_tokens)
        c_t = torch.from_numpy(c.copy()).reshape(count, size, n_tokens).permute(2, 0, 1)
        scale = ss[-1].T
        x = dequantize_groups(c_t, symmetric_shift(scale, bits) if symmetric else ss[0].T, scale)
        parts.append(x.reshape(n_tokens, count * size))
    if not parts:
        return torch.zeros(n_tokens, 0)
    return torch.cat(parts, dim=1)


def block_error_table(
    coeffs: torch.Tensor, group_sizes: tuple[int, ...], max_bits: int, symmetric: bool = False
) -> dict[int, np.ndarray]:
    """Measured mean squared error per token of every aligned block, for every bit width.

    Returns {g: array [max_bits + 1, rank // g]}; row 0 is the error of dropping the block (its
    energy). These measurements are what the DP allocator minimises: the real quantizer on real
    calibration coefficients, not a 4^-b model.
    """
    n_tokens, rank = coeffs.shape
    tables: dict[int, np.ndarray] = {}
    for g in group_sizes:
        nblk = rank // g
        if nblk == 0:
            continue
        x = coeffs[:, : nblk * g].reshape(n_tokens, nblk, g).to(torch.float32)
        table = np.empty((max_bits + 1, nblk), dtype=np.float64)
        table[0] = (x.to(torch.float64) ** 2).sum(-1).mean(0).numpy()
        # min/max are the same for every width: computed once, the quantizer itself is unchanged.
        lo, hi = x.amin(-1), x.amax(-1)
        peak = torch.maximum(-lo, hi)
        for bits in range(1, max_bits + 1):
            if symmetric:
                codes, shift, scale = _quantize_symmetric(x, peak, bits)
            else:
                codes, shift, scale = _quantize_in_range(x, lo, hi, bits)
            err = (dequantize_groups(codes, shift, scale) - x).to(torch.float64) ** 2
            table[bits] = err.sum(-1).mean(0).numpy()
        tables[g] = table
    return tables


# ---- batched: many blocks of equal token count in one pass ----------------------------------------


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, m] codes -> [N, packed_size(m, bits)]: each row packed exactly as ``pack_codes`` would."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    rows = codes.astype(np.uint8, copy=False)
    if per_byte == 1:
        return rows
    pad = (-rows.shape[1]) % per_byte
    if pad:
        rows = np.pad(rows, ((0, 0), (0, pad)))
    lanes = rows.reshape(rows.shape[0], -1, per_byte)
    packed = np.zeros(lanes.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        packed |= lanes[:, :, j] << np.uint8(slot * j)
    return packed


def _unpack_rows(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """[N, packed] -> [N, count]: the inverse of ``_pack_rows``."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    if per_byte == 1:
        return packed[:, :count]
    mask = np.uint8((1 << slot) - 1)
    lanes = np.empty((*packed.shape, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        lanes[:, :, j] = (packed >> np.uint8(slot * j)) & mask
    return lanes.reshape(packed.shape[0], -1)[:, :count]


def encode_coefficients_batch(
    coeffs: torch.Tensor, blocks: list[Block], n_blocks: int, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """coeffs [N * T, n_active] of N frames of T tokens each -> (codes [N, c], scales [N, s]) uint8,
    row i byte-identical to ``encode_coefficients`` of frame i's T rows: quantized in one pass."""
    _check_range(coeffs, symmetric)
    n_tok = coeffs.shape[0] // n_blocks if n_blocks else 0
    codes_out: list[np.ndarray] = []
    scales_out: list[np.ndarray] = []
    col = 0
    for _start, size, bits, count in _runs([b for b in blocks if b.bits > 0]):
        width = size * count
        x = coeffs[:, col : col + width].reshape(n_blocks, n_tok, count, size)
        col += width
        codes, shift, scale = quantize_groups(x, bits, symmetric)  # [N, T, count, size], [N, T, count]
        rows = codes.permute(0, 2, 3, 1).reshape(n_blocks, -1).cpu().numpy()
        codes_out.append(_pack_rows(rows, bits))
        ss = _side(shift, scale, symmetric)  # [N, k, count, T]
        scales_out.append(ss.reshape(n_blocks, -1).cpu().contiguous().numpy().view(np.uint8))
    empty = np.zeros((n_blocks, 0), dtype=np.uint8)
    return (
        np.concatenate(codes_out, axis=1) if codes_out else empty,
        np.concatenate(scales_out, axis=1) if scales_out else empty,
    )


def decode_coefficients_batch(
    codes: np.ndarray, scales: np.ndarray, blocks: list[Block], n_tokens: int, symmetric: bool = False
) -> torch.Tensor:
    """Inverse of ``encode_coefficients_batch``: codes [N, c], scales [N, s] -> [N * T, n_active]."""
    tiling = Tiling.of(blocks, symmetric)
    out = torch.empty(codes.shape[0] * n_tokens, tiling.n_active)
    dequantize_batch_into(codes, scales, tiling, n_tokens, out)
    return out


def dequantize_batch_into(
    codes: np.ndarray, scales: np.ndarray, tiling: Tiling, n_tokens: int, out: torch.Tensor
) -> None:
    """``decode_coefficients_batch`` written into ``out`` [N * T, n_active] float32, each run straight
    into its columns: the same products and sums as ``dequantize_groups`` (the code times its scale,
    rounded once, plus its shift, rounded once), so the values agree bit for bit, without the
    per-run temporaries, the reshape copies and the final concatenation."""
    n = codes.shape[0]
    expected_codes, expected_scales = tiling.stream_sizes(n_tokens)
    if codes.shape[1] != expected_codes or scales.shape[1] != expected_scales:
        raise ValueError(
            f"coefficient streams have {codes.shape[1]}/{scales.shape[1]} bytes, "
            f"allocation needs {expected_codes}/{expected_scales}"
        )
    if tuple(out.shape) != (n * n_tokens, tiling.n_active) or out.dtype != torch.float32:
        raise ValueError(f"output must be float32 [{n * n_tokens}, {tiling.n_active}]")
    cpos = spos = col = 0
    for _start, size, bits, count in tiling.runs:
        m = size * count * n_tokens
        nbytes = packed_size(m, bits)
        c = _unpack_rows(codes[:, cpos : cpos + nbytes], m, bits)
        cpos += nbytes
        # writable C-order copies only where needed: torch refuses to wrap read-only frame bytes silently
        k = tiling.side_values
        sb = np.require(scales[:, spos : spos + count * n_tokens * 2 * k], requirements=("C", "W"))
        spos += count * n_tokens * 2 * k
        ss = torch.from_numpy(sb.view(np.float16)).reshape(n, k, count, n_tokens).to(torch.float32)
        c_t = torch.from_numpy(np.require(c, requirements=("C", "W")))
        c_t = c_t.reshape(n, count, size, n_tokens).permute(0, 3, 1, 2)
        dst = out[:, col : col + size * count].view(n, n_tokens, count, size)
        col += size * count
        scale = ss[:, -1].transpose(1, 2)
        torch.mul(c_t, scale[..., None], out=dst)
        dst.add_((symmetric_shift(scale, bits) if tiling.symmetric else ss[:, 0].transpose(1, 2))[..., None])
