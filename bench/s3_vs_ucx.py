"""PUT and GET throughput of KVBM blocks through NIXL's OBJ backend (S3, into this service's S3
endpoint, KVTC-compressed) and through NIXL UCX (raw bytes between two agents), in one run.

The two are not the same work, and the table says so: UCX moves the raw block bytes one-sided between
registered buffers (what the gRPC + NIXL data path does before and after the codec); OBJ goes through
HTTP + SigV4 + checksums into the S3 endpoint, which finds each block's RoPE position, encodes it with
KVTC and stores the frame (PUT), or decodes it back (GET). Both rates are raw block bytes per second
(10^6 B/s), so they compare what KVBM's object tier would see. Real SmolLM2-135M KV (a
``--blocks * 32``-token prefill of the bundled GPL text), one 737280-byte fp16 block per object.

Usage: python bench/s3_vs_ucx.py [--blocks 64] [--reps 3] [--modes default,required,crt] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _median_s(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="default,required,crt")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec, kv_to_block
    from kvbm_codec.calibration.cache import load_or_calibrate
    from kvbm_codec.core.service import BlockService, ServedModel
    from kvbm_codec.frontends.s3 import CredentialConfig, S3Config, start_s3_server
    from kvbm_codec.frontends.s3.nixl_obj import ObjClient, obj_params
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.store.memory import MemoryTier
    from kvbm_codec.store.tiered import TieredStore
    from kvbm_codec.texts import demo_document
    from kvbm_codec.transport import NixlAgent

    spec = BlockSpec(30, 32, 3, 64)
    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)
    ids = lm.tokenizer(demo_document(), return_tensors="pt")["input_ids"][:, : args.blocks * 32]
    kv, _ = lm.prefill(ids, return_logits=False)
    blocks = [
        spec.to_bytes(kv_to_block(kv.select_tokens(torch.arange(b * 32, (b + 1) * 32)), spec))
        for b in range(args.blocks)
    ]
    raw = spec.nbytes * args.blocks
    rows: list[dict[str, object]] = []

    def report(path: str, op: str, seconds: float, note: str = "") -> None:
        mbs = raw / seconds / 1e6
        rows.append({"path": path, "op": op, "seconds": seconds, "MB_per_s": mbs, "note": note})
        print(
            f"{path:<34} {op:<4} {mbs:9.1f} MB/s  ({seconds * 1e3:8.1f} ms for {args.blocks} blocks) {note}"
        )

    # ---- NIXL UCX: raw bytes, server pulls (PUT) / pushes (GET) the client's registered pool ------
    pool = torch.frombuffer(bytearray(b"".join(blocks)), dtype=torch.uint8)
    staging = torch.zeros(raw, dtype=torch.uint8)
    spans = [(i * spec.nbytes, i * spec.nbytes, spec.nbytes) for i in range(args.blocks)]
    with (
        NixlAgent("bench-s3ucx-server") as server,
        server.register(staging) as sreg,
        NixlAgent("bench-s3ucx-client") as client,
        client.register(pool) as creg,
    ):
        remote = creg.remote()
        server.read_many(remote, spans, sreg)  # warm-up (connection set-up)
        assert bytes(staging.numpy()) == bytes(pool.numpy())
        report(
            "NIXL UCX (raw, in-process)",
            "PUT",
            _median_s(lambda: server.read_many(remote, spans, sreg), args.reps),
        )
        report(
            "NIXL UCX (raw, in-process)",
            "GET",
            _median_s(lambda: server.write_many(remote, spans, sreg), args.reps),
        )

    # ---- NIXL OBJ -> S3 endpoint -> KVTC ---------------------------------------------------------
    ak, sk = "AKBENCH", os.urandom(16).hex()
    svc = BlockService([ServedModel("smollm2-135m", cal, spec, 20.0)], TieredStore([MemoryTier(4 << 30)]))
    handle = start_s3_server(svc, S3Config(credentials=[CredentialConfig(access_key=ak, secret_key=sk)]))
    try:
        buffers = [np.frombuffer(b, dtype=np.uint8).copy() for b in blocks]
        for m, mode in enumerate(args.modes.split(",")):
            obj = ObjClient(obj_params(handle.url, "kvbm-smollm2-135m", ak, sk, mode=mode))
            keys = [(m + 1) * 10**15 + i for i in range(args.blocks)]
            back = [np.zeros_like(b) for b in buffers]
            put = _median_s(lambda obj=obj, keys=keys: obj.write(buffers, keys), args.reps)
            get = _median_s(lambda obj=obj, keys=keys, back=back: obj.read(back, keys), args.reps)
            stored = sum(len(r.data or b"") for r in svc.get_blocks(ak, "smollm2-135m", keys, as_frames=True))
            ratio = f"stored {raw / max(1, stored):.1f}x smaller"
            report(f"NIXL OBJ -> S3 -> KVTC ({mode})", "PUT", put, ratio)
            report(f"NIXL OBJ -> S3 -> KVTC ({mode})", "GET", get)
    finally:
        handle.stop()
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(
            json.dumps({"blocks": args.blocks, "block_bytes": spec.nbytes, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
