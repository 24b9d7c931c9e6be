"""KVTC encoder/decoder: KVCache <-> frame bytes, given a calibration and an allocation.

Pipeline per layer group: undo RoPE on keys -> project onto the calibrated PCA basis (only the
components the allocation gives bits) -> group-wise quantize -> pack -> chunked DEFLATE. Sink and
recent-window tokens travel uncompressed (fp16) in the same frame. Decoding runs group by group so a
caller can use layer 0 before the last layer is decoded (iter_decode).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbm_codec.api.blocks import DTYPES
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.allocation import Allocation
from kvbm_codec.codec.deflate import DeflateBackend, select_backend
from kvbm_codec.codec.errors import (
    CalibrationMismatchError,
    CodecError,
    FrameError,
    FrameHeaderError,
    ModelMismatchError,
)
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import PCABasis, from_features, to_features
from kvbm_codec.codec.quantize import (
    active_components,
    code_segments,
    decode_coefficients,
    decode_coefficients_batch,
    encode_coefficients,
    encode_coefficients_batch,
    stream_sizes,
)
from kvbm_codec.codec.rope import apply_rope, undo_rope
from kvbm_codec.kv import KVCache

CODEC_NAME = "kvtc"
_Parsed = tuple[int, fr.Frame, Allocation, dict[str, bytes | memoryview]]
"""(index in the batch, verified frame, its allocation, its sections by name)."""


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
        keys_c = kv.keys[:, :, comp_idx].to(torch.float32)
        if cfg.undo_rope:
            keys_c = undo_rope(keys_c, pos_c, self.cal.rope)
        values_c = kv.values[:, :, comp_idx].to(torch.float32)
        out_dtype = DTYPES[dtype]
        sections: list[tuple[str, bytes]] = []
        raw_names = []
        for gi, (a, b) in enumerate(self.groups):
            if a < kv.layer_start or b > kv.layer_end:
                continue
            lo, hi = a - kv.layer_start, b - kv.layer_start
            for kind, x in (("k", keys_c[lo:hi]), ("v", values_c[lo:hi])):
                name = self.cal.basis_name(gi, kind)
                feats = to_features(x)  # a block stored all-raw has 0 compressed tokens
                active = self._active[name].to(device)
                coeffs = self._basis(name, device).project(feats, active)
                codes, scales = encode_coefficients(coeffs, self.alloc.blocks[name])
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
        n_comp = h.n_tokens - n_raw
        itemsize = DTYPES[h.dtype].itemsize
        out: list[tuple[str, int]] = []
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            for kind in ("k", "v"):
                name = self.cal.basis_name(gi, kind)
                codes, scales = stream_sizes(alloc.blocks[name], n_comp)
                out += [(f"{name}.codes", codes), (f"{name}.scales", scales)]
            if n_raw:
                raw = (b - a) * h.n_kv_heads * n_raw * (h.key_head_dim + h.value_head_dim) * itemsize
                out.append((f"g{gi}.raw", raw))
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
            if got != size:
                raise FrameHeaderError(
                    f"section {name} holds {got} bytes; {f.header.n_tokens} tokens need {size}"
                )
        return {name: f.section(name, backend=backend) for name, _ in layout}

    def iter_decode(
        self, data: bytes | memoryview | fr.Frame, device: str | torch.device = "cpu"
    ) -> Iterator[KVCache]:
        """Yield one KVCache per layer group, in layer order, as soon as each is decoded."""
        device = torch.device(device)
        backend = self._backend(device)
        f = self._open(data)
        h = f.header
        alloc = self._allocation_for(f)
        active = {n: active_components(bl).to(device) for n, bl in alloc.blocks.items()}
        sections = self._sections(f, alloc, backend)
        positions = fr.runs_to_positions(h.positions)
        raw_mask = fr.runs_to_mask(h.raw_token_index, h.n_tokens)
        if positions.numel() != h.n_tokens:
            raise FrameHeaderError("positions do not cover n_tokens")
        positions, raw_mask = positions.to(device), raw_mask.to(device)
        raw_idx = torch.nonzero(raw_mask).flatten()
        comp_idx = torch.nonzero(~raw_mask).flatten()
        pos_c = positions[comp_idx]
        out_dtype = DTYPES[h.dtype]
        n_heads, dk, dv = h.n_kv_heads, h.key_head_dim, h.value_head_dim
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            nl = b - a
            keys = torch.empty(nl, n_heads, h.n_tokens, dk, dtype=out_dtype, device=device)
            values = torch.empty(nl, n_heads, h.n_tokens, dv, dtype=out_dtype, device=device)
            for kind, dst, d in (("k", keys, dk), ("v", values, dv)):
                name = self.cal.basis_name(gi, kind)
                try:
                    coeffs = decode_coefficients(
                        sections[f"{name}.codes"],
                        sections[f"{name}.scales"],
                        alloc.blocks[name],
                        int(comp_idx.numel()),
                    ).to(device)
                except ValueError as e:
                    raise FrameHeaderError(f"section {name}: {e}") from e
                feats = self._basis(name, device).reconstruct(coeffs, active[name])
                x = from_features(feats, nl, n_heads, d)
                if kind == "k" and self.cal.config.undo_rope:
                    x = apply_rope(x, pos_c, self.cal.rope)
                dst[:, :, comp_idx] = x.to(out_dtype)
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
        not one run, raw tokens not one run) gets a version-1 frame from ``encode_with_stats``."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if len(kvs) != len(raw_masks):
            raise ValueError(f"{len(kvs)} caches but {len(raw_masks)} raw masks")
        out: list[tuple[bytes, EncodeStats] | None] = [None] * len(kvs)
        groups: dict[tuple[int, int, int, tuple[int, int] | None], list[int]] = {}
        for i, (kv, mask) in enumerate(zip(kvs, raw_masks, strict=True)):
            self._check_shape(kv)
            runs = fr.mask_to_runs(mask.cpu())
            pos_runs = fr.positions_to_runs(kv.positions.cpu())
            if len(runs) > 1 or len(pos_runs) != 1:
                out[i] = self.encode_with_stats(kv, mask, window_tokens=0, dtype=dtype)
                continue
            key = (kv.layer_start, kv.layer_end, kv.n_tokens, runs[0] if runs else None)
            groups.setdefault(key, []).append(i)
        for (ls, le, n_tokens, raw_run), idx in groups.items():
            encoded = self._encode_group([kvs[i] for i in idx], ls, le, n_tokens, raw_run, dtype)
            for i, res in zip(idx, encoded, strict=True):
                out[i] = res
        return [r for r in out if r is not None]

    def _encode_group(
        self,
        kvs: list[KVCache],
        ls: int,
        le: int,
        n_tokens: int,
        raw_run: tuple[int, int] | None,
        dtype: str,
    ) -> list[tuple[bytes, EncodeStats]]:
        cfg = self.cal.config
        n = len(kvs)
        device = kvs[0].keys.device
        mask = torch.zeros(n_tokens, dtype=torch.bool)
        if raw_run is not None:
            mask[raw_run[0] : raw_run[0] + raw_run[1]] = True
        comp_idx = torch.nonzero(~mask).flatten().to(device)
        raw_idx = torch.nonzero(mask).flatten().to(device)
        n_comp = int(comp_idx.numel())
        keys = torch.stack([kv.keys for kv in kvs])  # [N, L, H, T, d]
        values = torch.stack([kv.values for kv in kvs])
        positions = torch.stack([kv.positions.to(device) for kv in kvs])  # [N, T]
        if n_comp != n_tokens:
            keys_c, values_c, pos_c = (
                keys[:, :, :, comp_idx],
                values[:, :, :, comp_idx],
                positions[:, comp_idx],
            )
        else:
            keys_c, values_c, pos_c = keys, values, positions

        # [N, L, H, Tc, d] -> [L, H, N*Tc, d]: the token axis is blocks x tokens, one matmul for all
        def tokens_last(x: torch.Tensor) -> torch.Tensor:
            return x.permute(1, 2, 0, 3, 4).reshape(x.shape[1], x.shape[2], n * n_comp, x.shape[4])

        kc = tokens_last(keys_c).to(torch.float32)
        if cfg.undo_rope:
            kc = undo_rope(kc, pos_c.reshape(-1), self.cal.rope)
        vc = tokens_last(values_c).to(torch.float32)
        out_dtype = DTYPES[dtype]
        per_block: list[list[tuple[str, bytes]]] = [[] for _ in range(n)]
        for gi, (a, b) in enumerate(self.groups):
            if a < ls or b > le:
                continue
            lo, hi = a - ls, b - ls
            for kind, x in (("k", kc[lo:hi]), ("v", vc[lo:hi])):
                name = self.cal.basis_name(gi, kind)
                active = self._active[name].to(device)
                coeffs = self._basis(name, device).project(to_features(x), active)
                codes, scales = encode_coefficients_batch(coeffs, self.alloc.blocks[name], n)
                for i in range(n):
                    per_block[i] += [
                        (f"{name}.codes", codes[i].tobytes()),
                        (f"{name}.scales", scales[i].tobytes()),
                    ]
            if raw_idx.numel():
                rk = keys[:, lo:hi][:, :, :, raw_idx].to(out_dtype).cpu().contiguous()
                rv = values[:, lo:hi][:, :, :, raw_idx].to(out_dtype).cpu().contiguous()
                for i in range(n):
                    per_block[i].append((f"g{gi}.raw", _tensor_bytes(rk[i]) + _tensor_bytes(rv[i])))
        backend = self._backend(device)
        n_raw = n_tokens - n_comp
        cuts = (self._codes_cuts(ls, le, n_comp),)
        results = []
        for i, kv in enumerate(kvs):
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
                results.append(self.encode_with_stats(kv, mask, window_tokens=0, dtype=dtype))
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
        device = torch.device(device)
        backend = self._backend(device)
        out: list[KVCache | CodecError | None] = [None] * len(frames)
        groups: dict[tuple[object, ...], list[_Parsed]] = {}
        for i, data in enumerate(frames):
            try:
                f = self._open(data)
                if f.version != fr.FORMAT_VERSION_BLOCK:
                    out[i] = self.decode(f, device)
                    continue
                alloc = self._allocation_for(f)
                secs = self._sections(f, alloc, backend)
            except CodecError as e:
                out[i] = e
                continue
            h = f.header
            runs = tuple(h.raw_token_index)
            key = (alloc.allocation_id, h.layer_start, h.layer_end, h.n_tokens, runs, h.dtype)
            groups.setdefault(key, []).append((i, f, alloc, secs))
        for items in groups.values():
            try:
                kvs = self._decode_group(items, device)
            except FrameError as e:
                for i, *_ in items:
                    out[i] = e
                continue
            for (i, *_), kv in zip(items, kvs, strict=True):
                out[i] = kv
        return [r for r in out if r is not None]

    def _decode_group(
        self,
        items: list[_Parsed],
        device: torch.device,
    ) -> list[KVCache]:
        h = items[0][1].header
        alloc = items[0][2]
        n = len(items)
        raw_mask = fr.runs_to_mask(h.raw_token_index, h.n_tokens)
        comp_idx = torch.nonzero(~raw_mask).flatten().to(device)
        raw_idx = torch.nonzero(raw_mask).flatten().to(device)
        n_comp = int(comp_idx.numel())
        positions = torch.stack([fr.runs_to_positions(f.header.positions) for _, f, _, _ in items]).to(device)
        pos_c = positions[:, comp_idx].reshape(-1)
        out_dtype = DTYPES[h.dtype]
        nh, dk, dv, nl_all = h.n_kv_heads, h.key_head_dim, h.value_head_dim, h.n_layers
        keys = torch.empty(n, nl_all, nh, h.n_tokens, dk, dtype=out_dtype, device=device)
        values = torch.empty(n, nl_all, nh, h.n_tokens, dv, dtype=out_dtype, device=device)
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            nl, lo = b - a, a - h.layer_start
            for kind, dst, d in (("k", keys, dk), ("v", values, dv)):
                name = self.cal.basis_name(gi, kind)
                codes = np.stack([np.frombuffer(s[f"{name}.codes"], dtype=np.uint8) for *_, s in items])
                scales = np.stack([np.frombuffer(s[f"{name}.scales"], dtype=np.uint8) for *_, s in items])
                try:
                    coeffs = decode_coefficients_batch(codes, scales, alloc.blocks[name], n_comp).to(device)
                except ValueError as e:
                    raise FrameHeaderError(f"section {name}: {e}") from e
                active = active_components(alloc.blocks[name]).to(device)
                x = from_features(self._basis(name, device).reconstruct(coeffs, active), nl, nh, d)
                if kind == "k" and self.cal.config.undo_rope:
                    x = apply_rope(x, pos_c, self.cal.rope)
                # [nl, H, N*Tc, d] -> [N, nl, H, Tc, d]
                x = x.reshape(nl, nh, n, n_comp, d).permute(2, 0, 1, 3, 4)
                dst[:, lo : lo + nl, :, comp_idx] = x.to(out_dtype)
            if raw_idx.numel():
                nr = int(raw_idx.numel())
                n_k, n_v = nl * nh * nr * dk, nl * nh * nr * dv
                for j, (*_, s) in enumerate(items):
                    arr = np.frombuffer(s[f"g{gi}.raw"], dtype=_np_dtype(out_dtype))
                    t = torch.from_numpy(arr.copy()).view(out_dtype).to(device)
                    keys[j, lo : lo + nl, :, raw_idx] = t[:n_k].reshape(nl, nh, nr, dk)
                    values[j, lo : lo + nl, :, raw_idx] = t[n_k : n_k + n_v].reshape(nl, nh, nr, dv)
        return [KVCache(keys[j], values[j], positions[j], layer_start=h.layer_start) for j in range(n)]


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
