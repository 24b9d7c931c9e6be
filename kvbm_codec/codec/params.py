"""A calibration's parameters in memory: what the codec needs besides the frame.

The codec reads these; ``kvbm_codec.calibration`` makes them (from a model) and stores them (the
checked artifact file, the registry), so the codec never depends on how they were made or kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvbm_codec.codec.allocation import Allocation, ErrorTable
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.entropy import CodeTables
from kvbm_codec.codec.pca import PCABasis
from kvbm_codec.codec.rope import RotaryParams


@dataclass
class ModelShape:
    n_layers: int
    n_kv_heads: int
    key_head_dim: int
    value_head_dim: int


def basis_name(group: int, kind: str) -> str:
    """The key of layer group ``group``'s key (``kind="k"``) or value (``"v"``) basis: ``g{i}.k``."""
    if kind not in ("k", "v"):
        raise ValueError(f"basis kind must be 'k' or 'v', got {kind!r}")
    return f"g{group}.{kind}"


@dataclass
class Calibration:
    model_fingerprint: str
    model_name: str
    shape: ModelShape
    rope: RotaryParams
    config: CodecConfig
    bases: dict[str, PCABasis]  # basis_name(i, "k") / basis_name(i, "v")
    error_tables: dict[str, ErrorTable]
    allocations: dict[str, Allocation] = field(default_factory=dict)  # "cr20" -> Allocation
    provenance: dict[str, Any] = field(default_factory=dict)
    code_tables: CodeTables | None = None  # ANS tables of entropy-coded allocations (codec/entropy.py)
    calibration_id: str = ""  # sha256 prefix of the artifact's content, set when saved or loaded

    def basis_name(self, group: int, kind: str) -> str:
        return basis_name(group, kind)

    def allocation(self, name_or_ratio: str | float) -> Allocation:
        name = name_or_ratio if isinstance(name_or_ratio, str) else allocation_name(name_or_ratio)
        if name not in self.allocations:
            raise KeyError(
                f"calibration {self.calibration_id} has no allocation {name!r}; "
                f"available: {sorted(self.allocations, key=_ratio_of)}"
            )
        return self.allocations[name]

    def block_allocation(self, ratio: float, page_tokens: int) -> Allocation | None:
        """The allocation sized on ``page_tokens``-token block frames for ``ratio``, or None when this
        calibration has none (it predates them, or was made for other page sizes): the block codec then
        uses the whole-context allocation, whose blocks store a few % below the target."""
        return self.allocations.get(block_allocation_name(ratio, page_tokens))

    def context_allocation(self, ratio: float, compressed_tokens: int) -> Allocation:
        """The allocation for a whole-context frame of ``compressed_tokens`` compressed tokens at
        ``ratio``: of those sized on frames of a given length (``cr20``, ``cr20@c1024``, ...; their
        ``compressed_tokens`` meta), the one sized on the longest frame no longer than this one, so
        the frame meets the ratio (frames store better the longer they are); a frame shorter than all
        gets the shortest's. A calibration with one allocation per ratio (before context sizes) gets it."""
        plain = self.allocation(ratio)
        sized = [
            a
            for n, a in self.allocations.items()
            if (n == allocation_name(ratio) or n.startswith(f"{allocation_name(ratio)}@c"))
            and "compressed_tokens" in a.meta
        ]
        if not sized:
            return plain
        fits = [a for a in sized if a.meta["compressed_tokens"] <= compressed_tokens]
        pick = max if fits else min
        return pick(fits or sized, key=lambda a: a.meta["compressed_tokens"])

    def allocation_by_id(self, allocation_id: str) -> Allocation | None:
        for a in self.allocations.values():
            if a.allocation_id == allocation_id:
                return a
        return None


def allocation_name(ratio: float) -> str:
    return f"cr{ratio:g}"


def context_allocation_name(ratio: float, context_tokens: int) -> str:
    """``cr20@c1024``: the allocation whose whole-context frames of ``context_tokens``-token contexts
    (their compressed tokens) meet ``ratio``; the longest such length has the plain name."""
    return f"{allocation_name(ratio)}@c{context_tokens}"


def block_allocation_name(ratio: float, page_tokens: int) -> str:
    """``cr20@p32``: the allocation whose ``page_tokens``-token block frames meet ``ratio``."""
    return f"{allocation_name(ratio)}@p{page_tokens}"


def _ratio_of(name: str) -> float:
    try:
        return float(name.removeprefix("cr").split("@", 1)[0])
    except ValueError:
        return float("inf")
