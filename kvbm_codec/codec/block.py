"""KVTC as a block codec: one KVBM block <-> one frame, registered under the frame codec name "kvtc".

Blocks are compressed whole: the engine's recent window lives on the GPU, not in this tier, so the
codec's recent-window exemption does not apply per block (``window_tokens=0``). Attention sinks
(absolute positions < ``sink_tokens``) are kept fp16 as in the paper. A caller that wants a block kept
exact (e.g. the adapter for the last pages of a conversation) sends ``compress=False``.
"""

from __future__ import annotations

import torch

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError, block_to_kv, kv_to_block
from kvbm_codec.api.codecs import register_codec
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
        """The registry's factory: ``params`` is the calibration the frames name."""
        if not isinstance(params, Calibration):
            raise TypeError(f"the kvtc codec needs a Calibration, got {type(params).__name__}")
        return cls(KVTCCodec(params, target_cr), spec)

    def describe(self) -> dict[str, str]:
        return {
            "calibration_id": self.codec.cal.calibration_id,
            "allocation_id": self.codec.alloc.allocation_id,
        }

    def encode(
        self, block: torch.Tensor, positions: torch.Tensor, *, compress: bool = True
    ) -> tuple[bytes, EncodeStats]:
        kv = block_to_kv(block, positions, self.spec)
        if compress:
            raw_mask = kv.positions < self.codec.cal.config.sink_tokens
        else:
            raw_mask = torch.ones(kv.n_tokens, dtype=torch.bool)
        return self.codec.encode_with_stats(kv, raw_mask, window_tokens=0, dtype=self.spec.dtype)

    def decode(
        self, frame: bytes | memoryview, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tensor in the spec's layout and dtype, positions). Raises FrameError on damage."""
        kv = self.codec.decode(frame, device=device)
        if kv.n_tokens != self.spec.page_size or kv.layer_start != 0 or kv.n_layers != self.spec.n_layers:
            raise InvalidBlockError(
                f"frame holds {kv.n_tokens} tokens of layers [{kv.layer_start}, {kv.layer_end}), "
                f"not a whole block of {self.spec}"
            )
        return kv_to_block(kv, self.spec), kv.positions


register_codec(CODEC_NAME, KVTCBlockCodec.create)
