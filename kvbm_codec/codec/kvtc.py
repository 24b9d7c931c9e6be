"""KVTC encoder/decoder: KVCache <-> frame bytes, given a calibration and an allocation.

Pipeline per layer group: undo RoPE on keys -> project onto the calibrated PCA basis (only the
components the allocation gives bits) -> group-wise quantize -> pack -> chunked DEFLATE. Sink and
recent-window tokens travel uncompressed (fp16) in the same frame. Decoding runs group by group so a
caller can use layer 0 before the last layer is decoded (iter_decode).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbm_codec.api.blocks import DTYPES
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.allocation import Allocation
from kvbm_codec.codec.deflate import DeflateBackend, select_backend
from kvbm_codec.codec.ecsq import (
    EcsqBasis,
    decode_bases,
    decode_basis,
    encode_basis,
    max_codes_bytes,
    quantize_checked,
)
from kvbm_codec.codec.entropy import ClassRuns, CodeTables
from kvbm_codec.codec.errors import (
    CalibrationMismatchError,
    CodecError,
    FrameError,
    FrameHeaderError,
    ModelMismatchError,
)
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import PCABasis
from kvbm_codec.codec.quantize import (
    Tiling,
    active_components,
    code_segments,
    dequantize_batch_into,
    encode_coefficients,
    encode_coefficients_batch,
)
from kvbm_codec.codec.rope import rope_tables, rotate, rotate_
from kvbm_codec.kv import KVCache

CODEC_NAME = "kvtc"
_Parsed = tuple[int, fr.Frame, Allocation, dict[str, bytes | memoryview], dict[str, torch.Tensor] | None]
"""(index in the batch, verified frame, its allocation, its sections by name, and for an
entropy-coded allocation each basis' decoded coefficients: decoded frame by frame, so a forged code
stream is refused alone)."""
_ECSQ_CODES = "ecsq.codes"
"""A v2 entropy-coded frame's one code stream (every basis' codes, grouped by class across bases)."""
_SCATTER_BLOCKS = 8
"""Blocks of feature rows gathered, de-rotated and centred at a time by the batched encoder (~2 MB of
rows at SmolLM2's widths): small enough to stay in cache between the steps."""
_SCATTER_ROWS = 256
"""Decoded feature rows re-rotated and converted at a time (8 blocks of 32 tokens, ~2 MB of rows at
SmolLM2's widths): small enough to stay in cache between the two; measured fastest of 1, 2, 4 and 8
blocks' worth."""
_LAYOUTS_KEPT = 64
"""Section layouts remembered per codec (one per frame shape seen: blocks have one or two); bounded,
since a hostile client could send frames of many shapes."""


@dataclass(frozen=True)
class _Weights:
    """One basis' matrices at one allocation, sliced to its active components and with the per-feature
    scale folded in, built once per codec: the per-call column gather and the separate scale pass
    used to cost as much as a third of the matmul at block sizes."""

    mean: torch.Tensor  # [p]
    enc: torch.Tensor  # [p, k]: basis[:, active] / scale, so coeffs = (x - mean) @ enc
    dec: torch.Tensor  # [k, p]: (basis[:, active] * scale).T, so x = mean + coeffs @ dec


@dataclass
class EncodeStats:
    frame_bytes: int
    raw_section_bytes: int  # compressed bytes spent on sink/window tokens
    compressed_tokens: int
    raw_tokens: int
    fp16_bytes: int  # the cache at fp16, the reference for every ratio

    @property
    def achieved_cr(self) -> float:
        """Compressed tokens only: their fp16 bytes / the frame's bytes spent on them (headers in)."""
        n = self.compressed_tokens + self.raw_tokens
        return (self.fp16_bytes * self.compressed_tokens / n) / (self.frame_bytes - self.raw_section_bytes)

    @property
    def achieved_cr_total(self) -> float:
        return self.fp16_bytes / self.frame_bytes


def default_raw_mask(positions: torch.Tensor, sink_tokens: int, window_tokens: int) -> torch.Tensor:
    """Sinks are absolute positions < sink_tokens; the window is the last window_tokens of this cache."""
    n = positions.shape[0]
    mask = positions < sink_tokens
    if window_tokens > 0:
        mask[max(0, n - window_tokens) :] = True
    return mask


class KVTCCodec:
    """Encodes on the device the KV lives on (CUDA when the engine's cache is there) and decodes onto
    the device asked for; DEFLATE runs on nvCOMP when a GPU and nvCOMP are present, else on isal.
    Both write the same RFC 1951 chunk layout, so frames move freely between the two."""

    def __init__(self, calibration: Calibration, allocation: Allocation | str | float) -> None:
        self.cal = calibration
        self.alloc = allocation if isinstance(allocation, Allocation) else calibration.allocation(allocation)
        self.groups = calibration.config.layer_groups(calibration.shape.n_layers)
        self._active = {name: active_components(bl) for name, bl in self.alloc.blocks.items()}
        self._device_bases: dict[tuple[str, str], PCABasis] = {}
        self._allocs_by_id: dict[str, Allocation] = {self.alloc.allocation_id: self.alloc}
        self._alloc_id = self.alloc.allocation_id
        self._weights_cache: dict[tuple[str, str, str], _Weights] = {}
        self._tilings: dict[tuple[str, str], Tiling] = {}
        self._layouts: dict[tuple[object, ...], list[tuple[str, int]]] = {}
        self._symmetric = calibration.config.quantizer == "symmetric"
        self._ecsq_bases: dict[tuple[str, str], EcsqBasis] = {}
        if self.alloc.entropy_coded:  # an allocation its bases cannot hold is refused here, not mid-encode
            for name in self.alloc.blocks:
                self._ecsq_basis(name, self.alloc, self._alloc_id)

    def _basis(self, name: str, device: torch.device) -> PCABasis:
        if device.type == "cpu":
            return self.cal.bases[name]
        key = (name, str(device))
        if key not in self._device_bases:
            b = self.cal.bases[name]
            self._device_bases[key] = PCABasis(
                b.mean.to(device),
                b.scale.to(device),
                b.basis.to(device),
                b.eigenvalues.to(device),
                b.residual_variance,
            )
        return self._device_bases[key]

    @staticmethod
    def _backend(device: torch.device) -> DeflateBackend:
        return select_backend(prefer_gpu=device.type == "cuda")

    # ---- the math both frame versions share, so their values agree bit for bit -------------------

    def _weights(self, name: str, alloc: Allocation, alloc_id: str, device: torch.device) -> _Weights:
        key = (alloc_id, name, str(device))
        w = self._weights_cache.get(key)
        if w is None:  # a race builds the same matrices twice; either copy is right
            b = self._basis(name, device)
            cols = b.basis[:, active_components(alloc.blocks[name]).to(b.basis.device)]
            scale = b.scale[:, None]
            w = _Weights(b.mean.contiguous(), (cols / scale).contiguous(), (cols * scale).T.contiguous())
            self._weights_cache[key] = w
        return w

    def _tiling(self, name: str, alloc: Allocation, alloc_id: str) -> Tiling:
        key = (alloc_id, name)
        t = self._tilings.get(key)
        if t is None:
            t = self._tilings[key] = Tiling.of(alloc.blocks[name], self._symmetric)
        return t

    def _ecsq_basis(self, name: str, alloc: Allocation, alloc_id: str) -> EcsqBasis:
        """An entropy-coded allocation's step and kept sigmas for one basis (its one block)."""
        key = (alloc_id, name)
        eb = self._ecsq_bases.get(key)
        if eb is None:
            weight = self.cal.error_tables[name].weight
            kept = sum(b.size for b in alloc.blocks[name] if b.bits > 0)
            try:
                eb = EcsqBasis.of(self.cal.bases[name].eigenvalues, weight, alloc.step, kept)
            except ValueError as e:  # the allocation and the artifact's bases disagree
                raise CalibrationMismatchError(f"allocation {alloc_id}, basis {name}: {e}") from e
            self._ecsq_bases[key] = eb
        return eb

    def _code_tables(self) -> CodeTables:
        if self.cal.code_tables is None:
            raise CalibrationMismatchError(
                f"calibration {self.cal.calibration_id} has entropy-coded allocations but no code tables"
            )
        return self.cal.code_tables

    def _coefficients(self, name: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One basis' KV [layers, heads, n, dim] -> the active coefficients [n, k] of this codec's
        allocation; keys are de-rotated first. Takes the KV, not feature rows, so a caller that
        already holds the projection (calibration's RatioProbe) skips the converting copy too."""
        feats = _feature_rows(x)  # this call's own float32 buffer: changed in place below
        if name.endswith(".k") and self.cal.config.undo_rope:
            feats = self._rope(feats, positions, inverse=True)
        w = self._weights(name, self.alloc, self._alloc_id, feats.device)
        return feats.sub_(w.mean) @ w.enc

    def _rope(self, feats: torch.Tensor, positions: torch.Tensor, *, inverse: bool) -> torch.Tensor:
        """RoPE on feature rows, in place (they are the caller's own buffer): viewed
        [n, layers * heads, head_dim], one table row per token."""
        d = self.cal.shape.key_head_dim
        cos, sin = rope_tables(positions, self.cal.rope, inverse=inverse)
        x = feats.view(feats.shape[0], feats.shape[1] // d, d)
        rotate_(x, cos[:, None], sin[:, None], self.cal.rope.head_dim, inverse=inverse)
        return feats

    # ---- encode ----------------------------------------------------------------------------------

    def _check_shape(self, kv: KVCache) -> None:
        s = self.cal.shape
        if (kv.n_heads, kv.key_head_dim, kv.value_head_dim) != (
            s.n_kv_heads,
            s.key_head_dim,
            s.value_head_dim,
        ):
            raise ValueError(
                f"KV shape (heads={kv.n_heads}, dk={kv.key_head_dim}, dv={kv.value_head_dim}) does not match "
                f"calibration {self.cal.calibration_id} (heads={s.n_kv_heads}, dk={s.key_head_dim}, "
                f"dv={s.value_head_dim})"
            )
        starts = {a for a, _ in self.groups}
        ends = {b for _, b in self.groups}
        if kv.layer_start not in starts or kv.layer_end not in ends:
            raise ValueError(
                f"layer range [{kv.layer_start}, {kv.layer_end}) does not align with the calibration's "
                f"layer groups {self.groups}"
            )

    def encode(
        self,
        kv: KVCache,
        raw_mask: torch.Tensor | None = None,
        *,
        window_tokens: int | None = None,
        dtype: str = "float16",
    ) -> bytes:
        return self.encode_with_stats(kv, raw_mask, window_tokens=window_tokens, dtype=dtype)[0]

    def encode_with_stats(
        self,
        kv: KVCache,
        raw_mask: torch.Tensor | None = None,
        *,
        window_tokens: int | None = None,
        dtype: str = "float16",
    ) -> tuple[bytes, EncodeStats]:
        """raw_mask [n_tokens] bool marks tokens stored uncompressed; default: sinks + recent window."""
        self._check_shape(kv)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        cfg = self.cal.config
        if raw_mask is None:
            wt = cfg.window_tokens if window_tokens is None else window_tokens
            raw_mask = default_raw_mask(kv.positions, cfg.sink_tokens, wt)
        device = kv.keys.device
        raw_mask = raw_mask.to(device)
        raw_idx = torch.nonzero(raw_mask).flatten()
        comp_idx = torch.nonzero(~raw_mask).flatten()
        pos_c = kv.positions.to(device)[comp_idx]
        keys_c, values_c = _token_subset(kv, comp_idx)
        out_dtype = DTYPES[dtype]
        sections: list[tuple[str, bytes]] = []
        raw_names = []
        for gi, (a, b) in enumerate(self.groups):
            if a < kv.layer_start or b > kv.layer_end:
                continue
            lo, hi = a - kv.layer_start, b - kv.layer_start
            for kind, x in (("k", keys_c[lo:hi]), ("v", values_c[lo:hi])):
                name = self.cal.basis_name(gi, kind)
                # a block stored all-raw has 0 compressed tokens
                coeffs = self._coefficients(name, x, pos_c)
                if self.alloc.entropy_coded:
                    eb = self._ecsq_basis(name, self.alloc, self._alloc_id)
                    codes, scales = encode_basis(coeffs, eb, self._code_tables())
                else:
                    codes, scales = encode_coefficients(coeffs, self.alloc.blocks[name], self._symmetric)
                sections += [(f"{name}.codes", codes), (f"{name}.scales", scales)]
            if raw_idx.numel():
                rk = kv.keys[lo:hi][:, :, raw_idx].to(out_dtype).cpu().contiguous()
                rv = kv.values[lo:hi][:, :, raw_idx].to(out_dtype).cpu().contiguous()
                sections.append((f"g{gi}.raw", _tensor_bytes(rk) + _tensor_bytes(rv)))
                raw_names.append(f"g{gi}.raw")
        header = fr.FrameHeader(
            model_fingerprint=self.cal.model_fingerprint,
            calibration_id=self.cal.calibration_id,
            allocation_id=self._alloc_id,
            codec=CODEC_NAME,
            dtype=dtype,
            layer_start=kv.layer_start,
            layer_end=kv.layer_end,
            n_kv_heads=kv.n_heads,
            key_head_dim=kv.key_head_dim,
            value_head_dim=kv.value_head_dim,
            positions=fr.positions_to_runs(kv.positions.cpu()),
            n_tokens=kv.n_tokens,
            raw_token_index=fr.mask_to_runs(raw_mask.cpu()),
            meta={},
            sections=[],
        )
        data, written = fr.encode_frame(header, sections, backend=self._backend(device))
        raw_bytes = sum(s.compressed_size for s in written.sections if s.name in raw_names)
        return data, EncodeStats(
            len(data), raw_bytes, int(comp_idx.numel()), int(raw_idx.numel()), kv.nbytes(2)
        )

    # ---- decode ----------------------------------------------------------------------------------

    def _open(self, data: bytes | memoryview | fr.Frame) -> fr.Frame:
        f = data if isinstance(data, fr.Frame) else fr.read_frame(data)
        h = f.header
        if h.codec != CODEC_NAME:
            raise FrameHeaderError(f"frame codec {h.codec!r} is not {CODEC_NAME!r}")
        if h.model_fingerprint != self.cal.model_fingerprint:
            raise ModelMismatchError(
                f"frame was encoded for model {h.model_fingerprint}, this decoder serves "
                f"{self.cal.model_fingerprint}"
            )
        if h.calibration_id != self.cal.calibration_id:
            raise CalibrationMismatchError(
                f"frame needs calibration {h.calibration_id}, decoder has {self.cal.calibration_id}"
            )
        s = self.cal.shape
        if (h.n_kv_heads, h.key_head_dim, h.value_head_dim) != (
            s.n_kv_heads,
            s.key_head_dim,
            s.value_head_dim,
        ):
            raise FrameHeaderError("frame head shape disagrees with its calibration")
        starts = {a for a, _ in self.groups}
        ends = {b for _, b in self.groups}
        if h.layer_start not in starts or h.layer_end not in ends:
            raise FrameHeaderError(f"frame layer range [{h.layer_start}, {h.layer_end}) is not group aligned")
        return f

    def _allocation_for(self, f: fr.Frame) -> Allocation:
        # allocation_id hashes the whole tiling (~3 ms): look ids up once per codec, not per frame
        found = self._allocs_by_id.get(f.header.allocation_id)
        if found is not None:
            return found
        other = self.cal.allocation_by_id(f.header.allocation_id)
        if other is not None:
            self._allocs_by_id[f.header.allocation_id] = other
        if other is None:
            raise CalibrationMismatchError(
                f"frame allocation {f.header.allocation_id} is not in calibration {self.cal.calibration_id}"
            )
        return other

    def _layout(self, h: fr.FrameHeader, alloc: Allocation) -> list[tuple[str, int]]:
        """Every section's name and exact size, in payload order, as n_tokens and the allocation imply.

        Version 1 frames list their sections and are checked against this before anything is
        allocated (a forged header with valid checksums could otherwise ask for terabytes); version 2
        frames do not repeat it: this *is* their section table."""
        n_raw = sum(length for _, length in h.raw_token_index)
        key = (h.allocation_id, h.layer_start, h.layer_end, h.n_tokens, n_raw, h.dtype, h.n_kv_heads,
               h.key_head_dim, h.value_head_dim)  # fmt: skip
        known = self._layouts.get(key)
        if known is not None:
            return known
        n_comp = h.n_tokens - n_raw
        itemsize = DTYPES[h.dtype].itemsize
        out: list[tuple[str, int]] = []
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            for kind in ("k", "v"):
                name = self.cal.basis_name(gi, kind)
                if alloc.entropy_coded:  # codes: the most an encoder writes (checked as a bound)
                    kept = self._ecsq_basis(name, alloc, h.allocation_id).n_kept
                    codes, scales = max_codes_bytes(n_comp, kept), 2 * n_comp
                else:
                    codes, scales = self._tiling(name, alloc, h.allocation_id).stream_sizes(n_comp)
                out += [(f"{name}.codes", codes), (f"{name}.scales", scales)]
            if n_raw:
                raw = (b - a) * h.n_kv_heads * n_raw * (h.key_head_dim + h.value_head_dim) * itemsize
                out.append((f"g{gi}.raw", raw))
        if len(self._layouts) >= _LAYOUTS_KEPT:
            self._layouts.clear()  # a flood of odd shapes: start over rather than grow
        self._layouts[key] = out
        return out

    def _sections(
        self, f: fr.Frame, alloc: Allocation, backend: DeflateBackend
    ) -> dict[str, bytes | memoryview]:
        """The frame's sections by name, sizes checked against the layout before use."""
        layout = self._layout(f.header, alloc)
        if f.version == fr.FORMAT_VERSION_BLOCK:
            streams = _v2_streams(layout)
            if [sec.name for sec in f.header.sections] != list(streams):
                raise FrameHeaderError(
                    f"frame has streams {f.section_names}, its layout needs {list(streams)}"
                )
            out: dict[str, bytes | memoryview] = {}
            for stream, parts in streams.items():
                want = sum(size for _, size in parts)
                got = f.section_header(stream).raw_size
                if stream == "codes" and alloc.entropy_coded:  # one ANS stream: its size is its own
                    if got > want:
                        raise FrameHeaderError(
                            f"stream codes holds {got} bytes; {f.header.n_tokens} tokens code in at "
                            f"most {want}"
                        )
                    out[_ECSQ_CODES] = f.section(stream, backend=backend)
                    continue
                if got != want:
                    raise FrameHeaderError(
                        f"stream {stream} holds {got} bytes; {f.header.n_tokens} tokens need {want}"
                    )
                data = memoryview(f.section(stream, backend=backend))
                off = 0
                for name, size in parts:
                    out[name] = data[off : off + size]
                    off += size
            return out
        for name, size in layout:
            got = f.section_header(name).raw_size
            if alloc.entropy_coded and name.endswith(".codes"):
                if got > size:
                    raise FrameHeaderError(
                        f"section {name} holds {got} bytes; {f.header.n_tokens} tokens code in at most {size}"
                    )
            elif got != size:
                raise FrameHeaderError(
                    f"section {name} holds {got} bytes; {f.header.n_tokens} tokens need {size}"
                )
        return {name: f.section(name, backend=backend) for name, _ in layout}

    def _coefficients_of(
        self,
        name: str,
        alloc: Allocation,
        alloc_id: str,
        sections: dict[str, bytes | memoryview],
        n_comp: int,
        scratch: _Scratch,
    ) -> torch.Tensor:
        """One basis' dequantized coefficients [n_comp, kept] from a version-1 frame's sections."""
        codes, scales = sections[f"{name}.codes"], sections[f"{name}.scales"]
        try:
            if alloc.entropy_coded:
                eb = self._ecsq_basis(name, alloc, alloc_id)
                return decode_basis(codes, scales, n_comp, eb, self._code_tables())
            tiling = self._tiling(name, alloc, alloc_id)
            coeffs = scratch.take("coeffs", (n_comp, tiling.n_active), torch.device("cpu"))
            c8 = np.frombuffer(codes, dtype=np.uint8)[None]
            s8 = np.frombuffer(scales, dtype=np.uint8)[None]
            dequantize_batch_into(c8, s8, tiling, n_comp, coeffs)
            return coeffs
        except ValueError as e:
            raise FrameHeaderError(f"section {name}: {e}") from e

    def iter_decode(
        self, data: bytes | memoryview | fr.Frame, device: str | torch.device = "cpu"
    ) -> Iterator[KVCache]:
        """Yield one KVCache per layer group, in layer order, as soon as each is decoded."""
        device = torch.device(device)
        backend = self._backend(device)
        f = self._open(data)
        h = f.header
        alloc = self._allocation_for(f)
        sections = self._sections(f, alloc, backend)
        positions = fr.runs_to_positions(h.positions)
        raw_mask = fr.runs_to_mask(h.raw_token_index, h.n_tokens)
        if positions.numel() != h.n_tokens:
            raise FrameHeaderError("positions do not cover n_tokens")
        positions, raw_mask = positions.to(device), raw_mask.to(device)
        raw_idx = torch.nonzero(raw_mask).flatten()
        comp_idx = torch.nonzero(~raw_mask).flatten()
        pos_c = positions[comp_idx]
        comp_run = _as_slice(comp_idx)
        out_dtype = DTYPES[h.dtype]
        n_heads, dk, dv = h.n_kv_heads, h.key_head_dim, h.value_head_dim
        n_comp = int(comp_idx.numel())
        scratch = _Scratch()
        rope = self.cal.config.undo_rope
        cos, sin = rope_tables(pos_c, self.cal.rope, inverse=False) if rope else (None, None)
        whole = (  # a v2 frame codes every basis in one ANS stream: decoded at once
            self._ecsq_block_coefficients(h, alloc, sections)
            if alloc.entropy_coded and f.version == fr.FORMAT_VERSION_BLOCK
            else None
        )
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            nl = b - a
            keys = torch.empty(nl, n_heads, h.n_tokens, dk, dtype=out_dtype, device=device)
            values = torch.empty(nl, n_heads, h.n_tokens, dv, dtype=out_dtype, device=device)
            for kind, dst in (("k", keys), ("v", values)):
                name = self.cal.basis_name(gi, kind)
                coeffs = (
                    whole[name]
                    if whole is not None
                    else self._coefficients_of(name, alloc, h.allocation_id, sections, n_comp, scratch)
                )
                w = self._weights(name, alloc, h.allocation_id, device)
                feats = scratch.take("feats", (n_comp, w.dec.shape[1]), device)
                torch.addmm(w.mean, coeffs.to(device), w.dec, out=feats)
                tables = (cos, sin) if kind == "k" and rope else None
                # [layers, heads, T, d] seen as [layers, T, heads, d]: the rows' own order
                self._scatter(feats, tables, [dst.transpose(1, 2)], n_comp, comp_run, comp_idx, scratch)
            if raw_idx.numel():
                raw = sections[f"g{gi}.raw"]
                n_k = nl * n_heads * raw_idx.numel() * dk
                n_v = nl * n_heads * raw_idx.numel() * dv
                arr = np.frombuffer(raw, dtype=_np_dtype(out_dtype))
                if arr.size != n_k + n_v:
                    raise FrameHeaderError(
                        f"raw section g{gi}.raw has {arr.size} values, expected {n_k + n_v}"
                    )
                # bfloat16 travels as int16 bit patterns (numpy has no bfloat16); view restores it
                t = torch.from_numpy(arr.copy()).view(out_dtype).to(device)
                keys[:, :, raw_idx] = t[:n_k].reshape(nl, n_heads, -1, dk)
                values[:, :, raw_idx] = t[n_k:].reshape(nl, n_heads, -1, dv)
            yield KVCache(keys, values, positions, layer_start=a)

    def decode(self, data: bytes | memoryview | fr.Frame, device: str | torch.device = "cpu") -> KVCache:
        return KVCache.concat_layers(list(self.iter_decode(data, device)))

    # ---- batched block frames (format version 2) ------------------------------------------------

    def encode_batch(
        self, kvs: Sequence[KVCache], raw_masks: Sequence[torch.Tensor], *, dtype: str = "float16"
    ) -> list[tuple[bytes, EncodeStats]]:
        """N caches (blocks) -> N version-2 frames, the math done once for all of them.

        Caches with the same layer range, token count and raw-token run share one RoPE pass, one
        projection matmul per basis over all their tokens and one quantization pass; only DEFLATE and
        the checksums run per frame (each frame stands alone). A cache v2 cannot describe (positions
        not one run, raw tokens not one run) gets a version-1 frame from ``encode_with_stats``. Under
        an entropy-coded allocation each frame's codes are one ANS stream over all its bases (its
        length is the stream's own: v2 states the codes stream's size, which the layout bounds)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if len(kvs) != len(raw_masks):
            raise ValueError(f"{len(kvs)} caches but {len(raw_masks)} raw masks")
        out: list[tuple[bytes, EncodeStats] | None] = [None] * len(kvs)
        groups: dict[tuple[int, int, int, tuple[int, int] | None], list[int]] = {}
        block_runs: dict[int, tuple[int, int] | None] = {}
        for i, (kv, mask) in enumerate(zip(kvs, raw_masks, strict=True)):
            self._check_shape(kv)
            runs = fr.mask_to_runs(mask.cpu())
            pos_runs = fr.positions_to_runs(kv.positions.cpu())
            if len(runs) > 1 or len(pos_runs) != 1:
                out[i] = self.encode_with_stats(kv, mask, window_tokens=0, dtype=dtype)
                continue
            run = runs[0] if runs else None
            # Blocks that differ only in a partial raw run (the sequence's first block keeps its sinks
            # raw) share the group: its math runs on every token, each block then keeps its own
            # compressed tokens. Alone, a sink block paid a whole batch's per-call cost (~3 blocks'
            # worth of encode). Wholly raw blocks do no math and stay apart.
            whole = run if run is not None and run[1] == kv.n_tokens else None
            key = (kv.layer_start, kv.layer_end, kv.n_tokens, whole)
            groups.setdefault(key, []).append(i)
            block_runs[i] = run
        for (ls, le, n_tokens, _), idx in groups.items():
            encoded = self._encode_group(
                [kvs[i] for i in idx], ls, le, n_tokens, [block_runs[i] for i in idx], dtype
            )
            for i, res in zip(idx, encoded, strict=True):
                out[i] = res
        return [r for r in out if r is not None]

    def _encode_group(
        self,
        kvs: list[KVCache],
        ls: int,
        le: int,
        n_tokens: int,
        raw_runs: list[tuple[int, int] | None],
        dtype: str,
    ) -> list[tuple[bytes, EncodeStats]]:
        """One batched encode of blocks with the same layers and token count. With one raw run for
        all (the common case) the math skips the raw tokens; with several (a sink block among
        others) it runs on every token and each block's own compressed rows are quantized, which
        gives the same bytes: projection and quantization work row by row."""
        n = len(kvs)
        device = kvs[0].keys.device
        uniform = all(r == raw_runs[0] for r in raw_runs)
        math_run = raw_runs[0] if uniform else None
        mask = torch.zeros(n_tokens, dtype=torch.bool)
        if math_run is not None:
            mask[math_run[0] : math_run[0] + math_run[1]] = True
        comp_idx = torch.nonzero(~mask).flatten().to(device)
        n_comp = int(comp_idx.numel())
        comp_run = _as_slice(comp_idx)
        own = [_run_tokens(r, n_tokens, device) for r in raw_runs]  # each block's (comp, raw) tokens
        by_run: dict[tuple[int, int] | None, list[int]] = {}
        for i, r in enumerate(raw_runs):
            by_run.setdefault(r, []).append(i)
        rows_of: dict[tuple[int, int] | None, torch.Tensor] = {}
        if not uniform:  # the coefficient rows of each run's blocks' compressed tokens
            for r, idx in by_run.items():
                comp = own[idx[0]][0]
                rows_of[r] = torch.cat([i * n_comp + comp for i in idx])
        positions = torch.stack([kv.positions.to(device) for kv in kvs])  # [N, T]
        pos_c = positions[:, comp_idx].reshape(-1)
        out_dtype = DTYPES[dtype]
        per_block: list[list[tuple[str, bytes]]] = [[] for _ in range(n)]
        ecsq_codes: list[list[tuple[np.ndarray, ClassRuns]]] = [[] for _ in range(n)]
        scratch = _Scratch()
        rope = self.cal.config.undo_rope
        tables = rope_tables(pos_c, self.cal.rope, inverse=True) if rope else None
        for gi, (a, b) in enumerate(self.groups):
            if a < ls or b > le:
                continue
            lo, hi = a - ls, b - ls
            for kind in ("k", "v"):
                name = self.cal.basis_name(gi, kind)
                parts = [(kv.keys if kind == "k" else kv.values)[lo:hi] for kv in kvs]
                sources = [x[:, :, comp_run] if comp_run is not None else x[:, :, comp_idx] for x in parts]
                coeffs = self._group_coefficients(name, sources, tables if kind == "k" else None, scratch)
                for r, idx in by_run.items():
                    part = coeffs if uniform else coeffs.index_select(0, rows_of[r])
                    if self.alloc.entropy_coded:
                        eb = self._ecsq_basis(name, self.alloc, self._alloc_id)
                        q, g, classes = quantize_checked(part, eb)
                        n_own = q.shape[0] // len(idx)
                        for j, i in enumerate(idx):
                            rows_j = slice(j * n_own, (j + 1) * n_own)
                            ecsq_codes[i].append((q[rows_j], classes.rows(rows_j.start, rows_j.stop)))
                            per_block[i].append((f"{name}.scales", g[rows_j].astype("<f2").tobytes()))
                        continue
                    codes, scales = encode_coefficients_batch(
                        part, self.alloc.blocks[name], len(idx), self._symmetric
                    )
                    for j, i in enumerate(idx):
                        per_block[i] += [
                            (f"{name}.codes", codes[j].tobytes()),
                            (f"{name}.scales", scales[j].tobytes()),
                        ]
            for i, kv in enumerate(kvs):
                raw_idx = own[i][1]
                if raw_idx.numel():
                    rk = kv.keys[lo:hi][:, :, raw_idx].to(out_dtype).cpu().contiguous()
                    rv = kv.values[lo:hi][:, :, raw_idx].to(out_dtype).cpu().contiguous()
                    per_block[i].append((f"g{gi}.raw", _tensor_bytes(rk) + _tensor_bytes(rv)))
        if self.alloc.entropy_coded:  # each block's codes, all its bases, as one ANS stream by class
            for i in range(n):
                codes = self._code_tables().encode(ecsq_codes[i], by_class=True)
                per_block[i].append((_ECSQ_CODES, codes))
        backend = self._backend(device)
        cuts_of: dict[int, tuple[list[int]]] = {}
        results = []
        for i, kv in enumerate(kvs):
            raw_run = raw_runs[i]
            n_raw = 0 if raw_run is None else raw_run[1]
            n_comp = n_tokens - n_raw
            if n_comp not in cuts_of:  # an ANS stream has no code widths to cut at
                cuts_of[n_comp] = ([] if self.alloc.entropy_coded else self._codes_cuts(ls, le, n_comp),)
            cuts = cuts_of[n_comp]
            header = fr.FrameHeader(
                model_fingerprint=self.cal.model_fingerprint,
                calibration_id=self.cal.calibration_id,
                allocation_id=self._alloc_id,
                codec=CODEC_NAME,
                dtype=dtype,
                layer_start=ls,
                layer_end=le,
                n_kv_heads=kv.n_heads,
                key_head_dim=kv.key_head_dim,
                value_head_dim=kv.value_head_dim,
                positions=[(int(positions[i, 0]), n_tokens)],
                n_tokens=n_tokens,
                raw_token_index=[raw_run] if raw_run is not None else [],
            )
            if not fr.block_header_fits(header):
                own_mask = torch.zeros(n_tokens, dtype=torch.bool)
                if raw_run is not None:
                    own_mask[raw_run[0] : raw_run[0] + raw_run[1]] = True
                results.append(self.encode_with_stats(kv, own_mask, window_tokens=0, dtype=dtype))
                continue
            streams: dict[str, list[bytes]] = {}
            for name, part in per_block[i]:
                streams.setdefault(_stream_of(name), []).append(part)
            data, written = fr.encode_block_frame(
                header,
                [b"".join(streams.get(st, [])) for st in fr.BLOCK_STREAMS[: 3 if n_raw else 2]],
                backend=backend,
                cuts=cuts,
            )
            raw_est = written.sections[2].compressed_size if n_raw else 0
            results.append((data, EncodeStats(len(data), raw_est, n_comp, n_raw, kv.nbytes(2))))
        return results

    def _codes_cuts(self, ls: int, le: int, n_comp: int) -> list[int]:
        """Offsets in a v2 codes stream where the code width changes: DEFLATE block boundaries.

        One Huffman table fitted to every width of a block's codes at once measured 11.6% larger than
        a table per run of one width (docs/format.md, "Entropy stage of small frames")."""
        cuts, off, prev = [], 0, None
        for gi, (a, b) in enumerate(self.groups):
            if a < ls or b > le:
                continue
            for kind in ("k", "v"):
                for nbytes, bits in code_segments(self.alloc.blocks[self.cal.basis_name(gi, kind)], n_comp):
                    if prev is not None and bits != prev:
                        cuts.append(off)
                    off, prev = off + nbytes, bits
        return cuts

    def decode_batch(
        self, frames: Sequence[bytes | memoryview | fr.Frame], device: str | torch.device = "cpu"
    ) -> list[KVCache | CodecError]:
        """N frames -> N caches, or the error that refused each one (one damaged frame spoils no
        other). Each frame is parsed and verified once; version-2 frames of the same shape share one
        dequantization pass, one reconstruction matmul per basis and one RoPE pass."""
        return [r if isinstance(r, CodecError) else r.kv for r in self.decode_batch_blocks(frames, device)]

    def decode_batch_blocks(
        self, frames: Sequence[bytes | memoryview | fr.Frame], device: str | torch.device = "cpu"
    ) -> list[DecodedBlock | CodecError]:
        """``decode_batch``, each result also in the block layout [layers, 2, tokens, heads * dim]
        when keys and values are equally wide: the decoder writes that layout directly and the
        cache's keys/values are views of it, so a block costs no second copy."""
        device = torch.device(device)
        backend = self._backend(device)
        out: list[DecodedBlock | CodecError | None] = [None] * len(frames)
        groups: dict[tuple[object, ...], list[_Parsed]] = {}
        for i, data in enumerate(frames):
            try:
                f = self._open(data)
                if f.version != fr.FORMAT_VERSION_BLOCK:
                    out[i] = DecodedBlock(self.decode(f, device), None)
                    continue
                alloc = self._allocation_for(f)
                secs = self._sections(f, alloc, backend)
                coeffs = self._ecsq_block_coefficients(f.header, alloc, secs) if alloc.entropy_coded else None
            except CodecError as e:
                out[i] = e
                continue
            h = f.header
            runs = tuple(tuple(r) for r in h.raw_token_index)
            # as in encode_batch: a partial raw run (sinks) shares its batch's group and math
            whole = runs if len(runs) == 1 and runs[0][1] == h.n_tokens else ()
            key = (h.allocation_id, h.layer_start, h.layer_end, h.n_tokens, whole, h.dtype)
            groups.setdefault(key, []).append((i, f, alloc, secs, coeffs))
        for items in groups.values():
            try:
                decoded = self._decode_group(items, device)
            except FrameError as e:
                for i, *_ in items:
                    out[i] = e
                continue
            for (i, *_), d in zip(items, decoded, strict=True):
                out[i] = d
        return [r for r in out if r is not None]

    def _decode_group(
        self,
        items: list[_Parsed],
        device: torch.device,
    ) -> list[DecodedBlock]:
        h = items[0][1].header
        alloc = items[0][2]
        n = len(items)
        block_runs = [tuple(tuple(r) for r in f.header.raw_token_index) for _, f, *_ in items]
        uniform = all(r == block_runs[0] for r in block_runs)
        # one raw run for all: the math skips it; several (a sink block among others): the math runs
        # on every token, each block's coefficient rows are its own compressed tokens (the raw ones
        # zero), and the raw sections then overwrite the raw tokens: the same values as alone
        raw_mask = fr.runs_to_mask(list(block_runs[0]) if uniform else [], h.n_tokens)
        comp_idx = torch.nonzero(~raw_mask).flatten().to(device)
        n_comp = int(comp_idx.numel())
        comp_run = _as_slice(comp_idx)
        own = [_run_tokens(r[0] if r else None, h.n_tokens, device) for r in block_runs]
        by_run: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for j, r in enumerate(block_runs):
            by_run.setdefault(r, []).append(j)
        rows_of = (
            {r: torch.cat([j * n_comp + own[idx[0]][0] for j in idx]) for r, idx in by_run.items()}
            if not uniform
            else {}
        )
        positions = torch.stack([fr.runs_to_positions(f.header.positions) for _, f, *_ in items]).to(device)
        pos_c = positions[:, comp_idx].reshape(-1)
        out_dtype = DTYPES[h.dtype]
        nh, dk, dv, nl_all, nt = h.n_kv_heads, h.key_head_dim, h.value_head_dim, h.n_layers, h.n_tokens
        # one output tensor per block (a block-sized allocation the allocator reuses; one tensor for
        # the batch was fresh pages, first-touched by the copies, every call), each [L, T, H, d]
        # token-major inside each layer: the feature rows' own order. With dk == dv keys and values
        # share the block layout [L, 2, T, H, d].
        if dk == dv:
            blocks: list[torch.Tensor] | None = [
                torch.empty(nl_all, 2, nt, nh, dk, dtype=out_dtype, device=device) for _ in range(n)
            ]
            keys, values = [b[:, 0] for b in blocks], [b[:, 1] for b in blocks]
        else:
            blocks = None
            keys = [torch.empty(nl_all, nt, nh, dk, dtype=out_dtype, device=device) for _ in range(n)]
            values = [torch.empty(nl_all, nt, nh, dv, dtype=out_dtype, device=device) for _ in range(n)]
        scratch = _Scratch()
        rope = self.cal.config.undo_rope
        cos, sin = rope_tables(pos_c, self.cal.rope, inverse=False) if rope else (None, None)
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            nl, lo = b - a, a - h.layer_start
            for kind, dst in (("k", keys), ("v", values)):
                name = self.cal.basis_name(gi, kind)
                if alloc.entropy_coded:
                    coeffs = self._ecsq_batch(items, name, by_run, rows_of, n * n_comp, uniform, scratch)
                else:
                    coeffs = self._dequantize_batch(
                        items, name, alloc, by_run, rows_of, own, n * n_comp, uniform, scratch
                    )
                w = self._weights(name, alloc, h.allocation_id, device)
                # the whole batch in one matmul (a smaller one repacks the basis per call)
                feats = scratch.take("feats", (n * n_comp, w.dec.shape[1]), device)
                torch.addmm(w.mean, coeffs.to(device), w.dec, out=feats)
                tables = (cos, sin) if kind == "k" and rope else None
                self._scatter(
                    feats, tables, [t[lo : lo + nl] for t in dst], n_comp, comp_run, comp_idx, scratch
                )
            for j, (_, _, _, s, _) in enumerate(items):
                raw_idx = own[j][1]
                nr = int(raw_idx.numel())
                if nr:
                    n_k, n_v = nl * nh * nr * dk, nl * nh * nr * dv
                    arr = np.frombuffer(s[f"g{gi}.raw"], dtype=_np_dtype(out_dtype))
                    t = torch.from_numpy(arr.copy()).view(out_dtype).to(device)
                    # raw sections hold [layers, heads, tokens, dim]
                    keys[j][lo : lo + nl, raw_idx] = t[:n_k].reshape(nl, nh, nr, dk).transpose(1, 2)
                    values[j][lo : lo + nl, raw_idx] = (
                        t[n_k : n_k + n_v].reshape(nl, nh, nr, dv).transpose(1, 2)
                    )
        out = []
        for j in range(n):
            kv = KVCache(
                keys[j].transpose(1, 2), values[j].transpose(1, 2), positions[j], layer_start=h.layer_start
            )
            out.append(DecodedBlock(kv, None if blocks is None else blocks[j].view(nl_all, 2, nt, nh * dk)))
        return out

    def _dequantize_batch(
        self,
        items: list[_Parsed],
        name: str,
        alloc: Allocation,
        by_run: dict[tuple[tuple[int, int], ...], list[int]],
        rows_of: dict[tuple[tuple[int, int], ...], torch.Tensor],
        own: list[tuple[torch.Tensor, torch.Tensor]],
        n_rows: int,
        uniform: bool,
        scratch: _Scratch,
    ) -> torch.Tensor:
        """One basis' coefficients [n_rows, active] of a batch of DP frames, block-major, each run
        of raw tokens' blocks dequantized in one pass (rows of raw tokens zero)."""
        h = items[0][1].header
        tiling = self._tiling(name, alloc, h.allocation_id)
        coeffs = scratch.take("coeffs", (n_rows, tiling.n_active), torch.device("cpu"))
        if not uniform:
            coeffs.zero_()
        for r, idx in by_run.items():
            codes = np.stack([np.frombuffer(items[j][3][f"{name}.codes"], dtype=np.uint8) for j in idx])
            scales = np.stack([np.frombuffer(items[j][3][f"{name}.scales"], dtype=np.uint8) for j in idx])
            n_own = int(own[idx[0]][0].numel())
            into = coeffs if uniform else torch.empty(len(idx) * n_own, tiling.n_active)
            try:
                dequantize_batch_into(codes, scales, tiling, n_own, into)
            except ValueError as e:
                raise FrameHeaderError(f"section {name}: {e}") from e
            if not uniform:
                coeffs.index_copy_(0, rows_of[r], into)
        return coeffs

    def _ecsq_batch(
        self,
        items: list[_Parsed],
        name: str,
        by_run: dict[tuple[tuple[int, int], ...], list[int]],
        rows_of: dict[tuple[tuple[int, int], ...], torch.Tensor],
        n_rows: int,
        uniform: bool,
        scratch: _Scratch,
    ) -> torch.Tensor:
        """One basis' coefficients [n_rows, kept] of a batch of entropy-coded frames (each decoded
        on its own when parsed), block-major, rows of raw tokens zero."""
        parts = [item[4][name] for item in items]  # type: ignore[index]
        coeffs = scratch.take("coeffs", (n_rows, parts[0].shape[1]), torch.device("cpu"))
        if uniform:
            torch.cat(parts, out=coeffs)
            return coeffs
        coeffs.zero_()
        for r, idx in by_run.items():
            coeffs.index_copy_(0, rows_of[r], torch.cat([parts[j] for j in idx]))
        return coeffs

    def _ecsq_block_coefficients(
        self, h: fr.FrameHeader, alloc: Allocation, sections: dict[str, bytes | memoryview]
    ) -> dict[str, torch.Tensor]:
        """Every basis' coefficients [compressed tokens, kept] of one v2 entropy-coded frame, from
        its one code stream and each basis' gains."""
        names = [
            self.cal.basis_name(gi, kind)
            for gi, (a, b) in enumerate(self.groups)
            if a >= h.layer_start and b <= h.layer_end
            for kind in ("k", "v")
        ]
        n_comp = h.n_tokens - sum(length for _, length in h.raw_token_index)
        bases = [self._ecsq_basis(name, alloc, h.allocation_id) for name in names]
        try:
            coeffs = decode_bases(
                sections[_ECSQ_CODES],
                [sections[f"{name}.scales"] for name in names],
                n_comp,
                bases,
                self._code_tables(),
            )
        except ValueError as e:
            raise FrameHeaderError(f"codes stream: {e}") from e
        return dict(zip(names, coeffs, strict=True))

    def _group_coefficients(
        self,
        name: str,
        sources: list[torch.Tensor],
        tables: tuple[torch.Tensor, torch.Tensor] | None,
        scratch: _Scratch,
    ) -> torch.Tensor:
        """One basis' compressed tokens of every block ([layers, heads, Tc, d] each) -> the active
        coefficients [N * Tc, k], block-major (the order positions and frames use): feature rows
        gathered straight from each cache in one converting copy per block, then one projection
        matmul. A method of its own so that calibration's BlockRatioProbe, which encodes the same
        blocks at many allocations, can hand over a column selection of one full projection."""
        nl, nh, n_comp, d = sources[0].shape
        device = sources[0].device
        rows = scratch.take("rows", (len(sources) * n_comp, nl * nh * d), device)
        w = self._weights(name, self.alloc, self._alloc_id, device)
        self._gather(sources, rows, tables, w.mean, scratch)
        return rows @ w.enc

    def _gather(
        self,
        sources: list[torch.Tensor],
        rows: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor] | None,
        mean: torch.Tensor,
        scratch: _Scratch,
    ) -> None:
        """Each block's [layers, heads, Tc, d] into float32 feature rows [N * Tc, layers * heads * d]
        (block-major), de-rotated (``tables``: cos/sin per row) and centred, a few blocks at a time so
        each slice is rotated and centred while it is still in cache: the same operations, in the
        same order, as ``_coefficients`` applies to the whole batch."""
        nl, nh, n_comp, d = sources[0].shape
        view = rows.view(len(sources), n_comp, nl, nh, d)
        for b0 in range(0, len(sources), _SCATTER_BLOCKS):
            b1 = min(len(sources), b0 + _SCATTER_BLOCKS)
            r0, r1 = b0 * n_comp, b1 * n_comp
            into = (
                view[b0:b1]
                if tables is None
                else scratch.take("gather", (b1 - b0, n_comp, nl, nh, d), rows.device)
            )
            for i in range(b0, b1):
                into[i - b0].copy_(sources[i].permute(2, 0, 1, 3))
            if tables is not None:
                cos, sin = tables
                out = rows[r0:r1].view(-1, nl * nh, d)
                x = into.view(-1, nl * nh, d)
                rotate(x, cos[r0:r1, None], sin[r0:r1, None], self.cal.rope.head_dim, inverse=True, out=out)
            rows[r0:r1].sub_(mean)

    def _scatter(
        self,
        feats: torch.Tensor,
        tables: tuple[torch.Tensor | None, torch.Tensor | None] | None,
        dst: list[torch.Tensor],
        n_comp: int,
        comp_run: slice | None,
        comp_idx: torch.Tensor,
        scratch: _Scratch,
    ) -> None:
        """Feature rows [N * Tc, layers * heads * d] (block-major) into each block's [layers, T, H, d]
        (any strides), keys re-rotated on the way (``tables``: cos/sin per row), ``_SCATTER_ROWS`` rows
        at a time: the rotated rows of a slice stay in cache until they are converted into the output,
        where rotating the whole batch first cost a third of the matmul."""
        nl, _, nh, d = dst[0].shape
        total = len(dst) * n_comp
        for r0 in range(0, total, _SCATTER_ROWS):
            r1 = min(total, r0 + _SCATTER_ROWS)
            src = feats[r0:r1]
            if tables is not None:
                cos, sin = tables
                assert cos is not None and sin is not None
                rot = scratch.take("rope", (r1 - r0, nl * nh, d), feats.device)
                x = src.view(-1, nl * nh, d)
                rotate(x, cos[r0:r1, None], sin[r0:r1, None], self.cal.rope.head_dim, inverse=False, out=rot)
                src = rot.view(r1 - r0, -1)
            # the slice's rows as (block, token range) pieces
            for j in range(r0 // n_comp, (r1 - 1) // n_comp + 1):
                t0, t1 = max(r0, j * n_comp) - j * n_comp, min(r1, (j + 1) * n_comp) - j * n_comp
                a = j * n_comp + t0 - r0
                x = src[a : a + t1 - t0].view(t1 - t0, nl, nh, d).transpose(0, 1)  # [nl, t, H, d]
                if comp_run is not None:
                    dst[j][:, comp_run.start + t0 : comp_run.start + t1].copy_(x)
                else:
                    dst[j][:, comp_idx[t0:t1]] = x.to(dst[j].dtype)


@dataclass(frozen=True)
class DecodedBlock:
    """One decoded frame: its cache, and the same values in the block layout when the decoder wrote
    them that way (``block`` shares memory with ``kv``)."""

    kv: KVCache
    block: torch.Tensor | None


class _Scratch:
    """float32 buffers one batched call reuses for every basis, by role: a fresh multi-MB tensor per
    basis cost the decoder more in first-touch page faults than the arithmetic done in it."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, str], torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        key = (role, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(shape)


def _token_subset(kv: KVCache, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv's keys and values at token indices ``idx``: a view when they are one consecutive run (a
    context's compressed tokens lie between its sinks and window), which spares a gather copy of
    nearly the whole KV; the feature rows are copied from it anyway."""
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1:
        a, b = int(idx[0]), int(idx[-1]) + 1
        return kv.keys[:, :, a:b], kv.values[:, :, a:b]
    return kv.keys[:, :, idx], kv.values[:, :, idx]


def _feature_rows(x: torch.Tensor) -> torch.Tensor:
    """[layers, heads, tokens, dim] (any dtype) -> a fresh float32 [tokens, layers * heads * dim]:
    the PCA feature layout (``pca.to_features``) in one converting copy."""
    nl, nh, nt, d = x.shape
    rows = torch.empty(nt, nl, nh, d, dtype=torch.float32, device=x.device)
    rows.copy_(x.permute(2, 0, 1, 3))
    return rows.view(nt, nl * nh * d)


def _run_tokens(
    run: tuple[int, int] | None, n_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed token indices, raw token indices) of a block whose raw tokens are ``run``."""
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    if run is not None:
        mask[run[0] : run[0] + run[1]] = True
    return torch.nonzero(~mask).flatten().to(device), torch.nonzero(mask).flatten().to(device)


def _as_slice(idx: torch.Tensor) -> slice | None:
    """``idx`` as a slice when it is one ascending run (a copy then beats an index gather/scatter)."""
    if idx.numel() == 0:
        return slice(0, 0)
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == idx.numel() and bool((idx[1:] > idx[:-1]).all()):
        return slice(first, last + 1)
    return None


def _stream_of(section: str) -> str:
    """The v2 stream a section travels in: ``*.codes`` -> codes, ``*.scales`` -> scales, raw tokens -> raw."""
    return section.rsplit(".", 1)[1]


def _v2_streams(layout: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    """The layout's sections grouped into v2 streams, in stream order (raw only when there is one)."""
    out: dict[str, list[tuple[str, int]]] = {"codes": [], "scales": []}
    for name, size in layout:
        out.setdefault(_stream_of(name), []).append((name, size))
    return out


def _np_dtype(dtype: torch.dtype) -> type:
    return {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.int16}[dtype]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
