"""KVTC encoder/decoder: KVCache <-> frame bytes, given a calibration and an allocation.

Pipeline per layer group: undo RoPE on keys -> project onto the calibrated PCA basis (only the
components the allocation gives bits) -> group-wise quantize -> pack -> chunked DEFLATE. Sink and
recent-window tokens travel uncompressed (fp16) in the same frame. Decoding runs group by group so a
caller can use layer 0 before the last layer is decoded (iter_decode).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kvbm_codec.api.blocks import DTYPES
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.allocation import Allocation
from kvbm_codec.codec.deflate import DeflateBackend, select_backend
from kvbm_codec.codec.errors import CalibrationMismatchError, FrameHeaderError, ModelMismatchError
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import PCABasis, from_features, to_features
from kvbm_codec.codec.quantize import (
    active_components,
    decode_coefficients,
    encode_coefficients,
    stream_sizes,
)
from kvbm_codec.codec.rope import apply_rope, undo_rope
from kvbm_codec.kv import KVCache

CODEC_NAME = "kvtc"


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
            allocation_id=self.alloc.allocation_id,
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

    def _open(self, data: bytes | memoryview) -> fr.Frame:
        f = fr.read_frame(data)
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
        if f.header.allocation_id == self.alloc.allocation_id:
            return self.alloc
        other = self.cal.allocation_by_id(f.header.allocation_id)
        if other is None:
            raise CalibrationMismatchError(
                f"frame allocation {f.header.allocation_id} is not in calibration {self.cal.calibration_id}"
            )
        return other

    def _check_section_sizes(self, f: fr.Frame, alloc: Allocation) -> None:
        """Every section must be exactly as large as n_tokens implies, checked on the header before
        anything is allocated: a forged header with valid checksums could otherwise ask for terabytes."""
        h = f.header
        n_raw = sum(length for _, length in h.raw_token_index)
        n_comp = h.n_tokens - n_raw
        itemsize = DTYPES[h.dtype].itemsize
        for gi, (a, b) in enumerate(self.groups):
            if a < h.layer_start or b > h.layer_end:
                continue
            want: dict[str, int] = {}
            for kind in ("k", "v"):
                name = self.cal.basis_name(gi, kind)
                want[f"{name}.codes"], want[f"{name}.scales"] = stream_sizes(alloc.blocks[name], n_comp)
            if n_raw:
                want[f"g{gi}.raw"] = (
                    (b - a) * h.n_kv_heads * n_raw * (h.key_head_dim + h.value_head_dim) * itemsize
                )
            for name, size in want.items():
                got = f.section_header(name).raw_size
                if got != size:
                    raise FrameHeaderError(
                        f"section {name} holds {got} bytes; {h.n_tokens} tokens need {size}"
                    )

    def iter_decode(self, data: bytes | memoryview, device: str | torch.device = "cpu") -> Iterator[KVCache]:
        """Yield one KVCache per layer group, in layer order, as soon as each is decoded."""
        device = torch.device(device)
        backend = self._backend(device)
        f = self._open(data)
        h = f.header
        alloc = self._allocation_for(f)
        active = {n: active_components(bl).to(device) for n, bl in alloc.blocks.items()}
        self._check_section_sizes(f, alloc)
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
                        f.section(f"{name}.codes", backend=backend),
                        f.section(f"{name}.scales", backend=backend),
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
                raw = f.section(f"g{gi}.raw", backend=backend)
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

    def decode(self, data: bytes | memoryview, device: str | torch.device = "cpu") -> KVCache:
        return KVCache.concat_layers(list(self.iter_decode(data, device)))


def _np_dtype(dtype: torch.dtype) -> type:
    return {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.int16}[dtype]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
