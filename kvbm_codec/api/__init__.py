"""The block contract every layer speaks: spec and layout, request types, protocols, errors.

It imports nothing of kvbm_codec but ``kv`` (the in-memory KV layout), so every package may import it
and none of them needs another's internals to talk about a block.
"""

from kvbm_codec.api import errors
from kvbm_codec.api.blocks import (
    DTYPES,
    BlockSpec,
    InvalidBlockError,
    block_positions,
    block_to_kv,
    blocks_to_kv,
    kv_to_block,
    kv_to_blocks,
)
from kvbm_codec.api.codecs import (
    BlockCodec,
    BlockCodecFactory,
    UnknownCodecError,
    codec_names,
    get_codec,
    register_codec,
)
from kvbm_codec.api.types import DEFAULT_MODEL, BlockTransport, GetResult, LookupResult, PutItem, PutResult

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "BlockCodec",
    "BlockCodecFactory",
    "BlockSpec",
    "BlockTransport",
    "GetResult",
    "InvalidBlockError",
    "LookupResult",
    "PutItem",
    "PutResult",
    "UnknownCodecError",
    "block_positions",
    "block_to_kv",
    "blocks_to_kv",
    "codec_names",
    "errors",
    "get_codec",
    "kv_to_block",
    "kv_to_blocks",
    "register_codec",
]
