"""Accuracy of the block path: blocks encoded at the context allocation vs the block allocation.

One validation text (never the calibration corpus, never the held-out GPL/Hamlet used for the
reported curves): 2048 context tokens cut into 64 blocks of 32, each allocation's frames decoded
and scored by a 256-token teacher-forced continuation against the uncompressed cache, same tokens.
Usage: python bench/block_accuracy.py CALIBRATION TEXT OUT.json [ALLOCATION ...]
(default allocations: cr20 cr20@p32)
"""

import json
import sys
from pathlib import Path

import torch

from kvbm_codec.api.blocks import BlockSpec, block_positions, blocks_to_kv, kv_to_block
from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM

lm = CausalLM.load()
cal = load_calibration(sys.argv[1], expected_fingerprint=lm.info.fingerprint)
text = Path(sys.argv[2]).read_text()
ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
ctx, cont = ids[:, :2048], ids[:, 2048:2304]
kv, _ = lm.prefill(ctx, return_logits=False)
s = cal.shape
spec = BlockSpec(s.n_layers, 32, s.n_kv_heads, s.key_head_dim, "float16")
kv16 = kv.to(torch.float16)
blocks = [
    kv_to_block(kv16.select_tokens(torch.arange(b * 32, (b + 1) * 32)), spec).contiguous() for b in range(64)
]
pos = [block_positions(b * 32, 32) for b in range(64)]
ref = lm.logits_with_cache(kv, cont)
tg = cont[0, 1:]
rows = []
for name in sys.argv[4:] or ("cr20", "cr20@p32"):
    bc = KVTCBlockCodec(KVTCCodec(cal, name), spec)
    frames = [f for f, _ in bc.encode_many(blocks, pos, [True] * 64)]
    dec = bc.decode_many(frames)
    keys = torch.cat([blocks_to_kv(d[0].unsqueeze(0), d[1], spec).keys for d in dec], 2)
    vals = torch.cat([blocks_to_kv(d[0].unsqueeze(0), d[1], spec).values for d in dec], 2)
    rest = KVCache(keys.float(), vals.float(), torch.arange(2048))
    out = lm.logits_with_cache(rest, cont)
    r = {
        "allocation": name,
        "allocation_id": bc.codec.alloc.allocation_id,
        "block_stored_ratio": 64 * spec.nbytes / sum(len(f) for f in frames),
        "ppl_ref": perplexity(ref[:-1], tg),
        "ppl": perplexity(out[:-1], tg),
        "top1": top1_agreement(ref[:-1], out[:-1]),
        "kl": kl_divergence_mean(ref[:-1], out[:-1]),
        "nominal_bits": bc.codec.alloc.meta.get("nominal_bits_per_token"),
        "calibration_cr": bc.codec.alloc.meta.get("calibration_cr"),
    }
    print(json.dumps(r))
    rows.append(r)
Path(sys.argv[3]).write_text(json.dumps(rows, indent=1) + "\n")
