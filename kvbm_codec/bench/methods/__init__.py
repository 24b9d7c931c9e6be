"""Method registry: a method is named by a short spec string, so the CLI and the cache share one name.

Spec grammar: `fp16`, `deflate`, `zstd`, `fp8`, `kivi4`, `kivi2`, `pca-int8@16`, `pca-int4@16`,
`streaming@4`, `h2o@8`, `tova@4`, `dms@8`, `kvtc@20`, and `kvtc@16+tova@4` (KVTC on an eviction method).
"""

from __future__ import annotations

from kvbm_codec.bench.base import KVMethod
from kvbm_codec.bench.methods._eviction import EvictionMethod
from kvbm_codec.bench.methods.deflate import Deflate
from kvbm_codec.bench.methods.dms import DMS
from kvbm_codec.bench.methods.fp8 import FP8
from kvbm_codec.bench.methods.h2o import H2O
from kvbm_codec.bench.methods.kivi import KIVI
from kvbm_codec.bench.methods.kvtc import KVTC
from kvbm_codec.bench.methods.pca_int import PCAUniform
from kvbm_codec.bench.methods.raw import RawFP16
from kvbm_codec.bench.methods.streaming_llm import StreamingLLM
from kvbm_codec.bench.methods.tova import TOVA
from kvbm_codec.bench.methods.zstd import Zstd

EVICTION: dict[str, type[EvictionMethod]] = {"streaming": StreamingLLM, "h2o": H2O, "tova": TOVA, "dms": DMS}
SIMPLE: dict[str, type[KVMethod]] = {"fp16": RawFP16, "deflate": Deflate, "zstd": Zstd, "fp8": FP8}


def _ratio(spec: str, part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise ValueError(f"method {spec!r}: {part!r} is not a ratio") from None
    if value <= 1:
        raise ValueError(f"method {spec!r}: ratio must be > 1")
    return value


def build_method(spec: str) -> KVMethod:
    spec = spec.strip()
    if spec in SIMPLE:
        return SIMPLE[spec]()
    if spec in ("kivi4", "kivi2"):
        return KIVI(int(spec[-1]))
    if spec.startswith("kvtc@"):
        head, _, tail = spec.partition("+")
        evict = build_method(tail) if tail else None
        if evict is not None and not isinstance(evict, EvictionMethod):
            raise ValueError(f"method {spec!r}: KVTC can only stack on an eviction method, not {tail!r}")
        return KVTC(_ratio(spec, head[5:]), evict)
    name, sep, ratio = spec.partition("@")
    if sep and name in EVICTION:
        return EVICTION[name](_ratio(spec, ratio))
    if sep and name in ("pca-int8", "pca-int4"):
        return PCAUniform(_ratio(spec, ratio), bits=int(name[-1]))
    raise ValueError(f"unknown method {spec!r} (see kvbm_codec.bench.methods for the grammar)")


__all__ = ["KVMethod", "build_method"]
