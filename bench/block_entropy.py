"""Where a 32-token block frame loses bytes against a whole-context frame at the same allocation.

Same tokens both ways (the demo document's KV, held out from calibration): the context frame's
sections and the block frames' streams per block (codes, scales, raw, header), then the codes and
scales streams of the block frames recompressed by each entropy-stage variant (docs/format.md,
"Entropy stage of small frames"). Usage:
    python bench/block_entropy.py [--calibration FILE] [--blocks 16] [--allocation cr20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.bench.throughput import real_blocks
from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.codec.deflate import deflate_chunks
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.quantize import _runs, packed_size
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.service.config import ModelConfig


def _zlib(data: bytes, level: int = 9, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> int:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
    return len(c.compress(data) + c.flush())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calibration", type=Path, default=None)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--allocation", default="cr20", help="allocation name in the calibration")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    s, mc = cal.shape, ModelConfig()
    spec = BlockSpec(s.n_layers, mc.page_size, s.n_kv_heads, s.key_head_dim, mc.dtype)
    rb = real_blocks(lm, spec, a.blocks)
    codec = KVTCBlockCodec(KVTCCodec(cal, a.allocation), spec)
    kvc = codec.codec
    ctx = fr.read_frame(kvc.encode(rb.kv, window_tokens=0))
    ctx_per_block: dict[str, float] = {}
    for sec in ctx.header.sections:
        kind = sec.name.rsplit(".", 1)[1]
        ctx_per_block[kind] = ctx_per_block.get(kind, 0) + sec.compressed_size / a.blocks
    frames = [f for f, _ in codec.encode_many(rb.tensors, rb.positions, [True] * a.blocks)]
    later = [fr.read_frame(f) for f in frames[1:]]  # block 0 also holds the sinks raw
    # the codes stream's runs of one code width, as the writer cuts them
    segs, off = [], 0
    for gi in range(len(kvc.groups)):
        for kind in ("k", "v"):
            for _, size, bits, count in _runs([b for b in kvc.alloc.blocks[f"g{gi}.{kind}"] if b.bits > 0]):
                nbytes = packed_size(size * count * spec.page_size, bits)
                segs.append((off, nbytes, bits))
                off += nbytes
    width_cuts = [o for i, (o, _, b) in enumerate(segs) if i and b != segs[i - 1][2]]
    run_cuts = [o for o, _, _ in segs[1:]]
    variants: dict[str, list[int]] = {}
    for f in later:
        codes, scales = f.section("codes"), f.section("scales")
        planes = np.ascontiguousarray(np.frombuffer(scales, np.uint8).reshape(-1, 2).T).tobytes()
        row = {
            "codes isal1 one block": len(deflate_chunks(codes)[1]),
            "codes isal3": len(deflate_chunks(codes, 3)[1]),
            "codes zlib9": _zlib(codes),
            "codes zlib9 huffman-only": _zlib(codes, 9, zlib.Z_HUFFMAN_ONLY),
            "codes isal1 cut per run": len(deflate_chunks(codes, 1, run_cuts)[1]),
            "codes isal1 cut per width change": len(deflate_chunks(codes, 1, width_cuts)[1]),
            "codes one stream per run": sum(len(deflate_chunks(codes[o : o + n])[1]) for o, n, _ in segs),
            "scales isal1": len(deflate_chunks(scales)[1]),
            "scales isal1 cut per run": len(deflate_chunks(scales, 1, run_cuts)[1]),
            "scales byte planes": len(deflate_chunks(planes, 1, [len(planes) // 2])[1]),
        }
        for k, v in row.items():
            variants.setdefault(k, []).append(v)
    out = {
        "calibration_id": cal.calibration_id,
        "allocation": a.allocation,
        "context_bytes_per_block": ctx_per_block,
        "context_stored_ratio": rb.kv.nbytes(2) / ctx.total_bytes,
        "block_stored_ratio": a.blocks * spec.nbytes / sum(len(f) for f in frames),
        "block_streams": {
            sec.name: float(np.mean([g.section_header(sec.name).compressed_size for g in later]))
            for sec in later[0].header.sections
        },
        "block_outside_payload": float(np.mean([g.total_bytes - g.payload_bytes for g in later])),
        "variants": {k: float(np.mean(v)) for k, v in variants.items()},
    }
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
