"""KVTC as a block codec: one KVBM block <-> one frame, registered under the frame codec name "kvtc".

Blocks are compressed whole: the engine's recent window lives on the GPU, not in this tier, so the
codec's recent-window exemption does not apply per block (``window_tokens=0``). Attention sinks
(absolute positions < ``sink_tokens``) are kept fp16 as in the paper. A caller that wants a block kept
exact (e.g. the adapter for the last pages of a conversation) sends ``compress=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError, block_to_kv, kv_to_block
from kvbm_codec.api.codecs import register_codec
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.kvtc import CODEC_NAME, EncodeStats, KVTCCodec
from kvbm_codec.codec.params import Calibration


class KVTCBlockCodec:
    """KVTC for one block spec. Thread-safe: encode/decode keep no per-call state on self."""

    name = CODEC_NAME

    def __init__(self, codec: KVTCCodec, spec: BlockSpec) -> None:
        s = codec.cal.shape
        if (s.n_layers, s.n_kv_heads, s.key_head_dim) != (spec.n_layers, spec.n_kv_heads, spec.head_dim):
            raise ValueError(f"block spec {spec} does not match calibration shape {s}")
        self.codec = codec
        self.spec = spec

    @classmethod
    def create(cls, params: object, spec: BlockSpec, target_cr: float) -> KVTCBlockCodec:
        """The registry's factory: ``params`` is the calibration the frames name. Blocks are encoded
        with the allocation sized on block frames of the spec's page size when the calibration has one
        (a block frame stores a little less than a whole-context frame at the same allocation)."""
        if not isinstance(params, Calibration):
            raise TypeError(f"the kvtc codec needs a Calibration, got {type(params).__name__}")
        alloc = params.block_allocation(target_cr, spec.page_size)
        return cls(KVTCCodec(params, target_cr if alloc is None else alloc), spec)

    def describe(self) -> dict[str, str]:
        return {
            "calibration_id": self.codec.cal.calibration_id,
            "allocation_id": self.codec.alloc.allocation_id,
        }

    def encode(
        self, block: torch.Tensor, positions: torch.Tensor, *, compress: bool = True
    ) -> tuple[bytes, EncodeStats]:
        return self.encode_many([block], [positions], [compress])[0]

    def encode_many(
        self, blocks: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], compress: Sequence[bool]
    ) -> list[tuple[bytes, EncodeStats]]:
        """N blocks -> N compact (format v2) frames in one batched codec call."""
        if not len(blocks) == len(positions) == len(compress):
            raise ValueError(f"{len(blocks)} blocks, {len(positions)} position sets, {len(compress)} flags")
        if not blocks:
            return []
        kvs = [block_to_kv(b, p, self.spec) for b, p in zip(blocks, positions, strict=True)]  # views
        sinks = self.codec.cal.config.sink_tokens
        masks = [
            kv.positions < sinks if c else torch.ones(kv.n_tokens, dtype=torch.bool)
            for kv, c in zip(kvs, compress, strict=True)
        ]
        return self.codec.encode_batch(kvs, masks, dtype=self.spec.dtype)

    def decode(
        self, frame: bytes | memoryview | fr.Frame, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tensor in the spec's layout and dtype, positions). Raises FrameError on damage."""
        out = self.decode_many([frame], device)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def decode_many(
        self, frames: Sequence[bytes | memoryview | fr.Frame], device: str | torch.device = "cpu"
    ) -> list[tuple[torch.Tensor, torch.Tensor] | Exception]:
        out: list[tuple[torch.Tensor, torch.Tensor] | Exception] = []
        for res in self.codec.decode_batch_blocks(frames, device=device):
            if isinstance(res, Exception):
                out.append(res)
                continue
            kv = res.kv
            if kv.n_tokens != self.spec.page_size or kv.layer_start != 0 or kv.n_layers != self.spec.n_layers:
                out.append(
                    InvalidBlockError(
                        f"frame holds {kv.n_tokens} tokens of layers [{kv.layer_start}, {kv.layer_end}), "
                        f"not a whole block of {self.spec}"
                    )
                )
            elif res.block is not None and res.block.shape == self.spec.shape:
                out.append((res.block.to(self.spec.torch_dtype), kv.positions))
            else:
                out.append((kv_to_block(kv, self.spec), kv.positions))
        return out


register_codec(CODEC_NAME, KVTCBlockCodec.create)
