"""Onboard through `kvbm-codec serve` with the streamed get's prefetch on and off, side by side.

Two `kvbm-codec serve` processes of the same build and calibration, one with ``get_prefetch`` (a
GetBlocks stream decodes its next batch while the current one is sent; off by default) and one without,
hold the same real blocks (SmolLM2 KV of the held-out demo text, 64 blocks of 32 tokens repeated
under new hashes); rounds alternate between them: the README job's onboard (``KvbmTierClient.onboard``
over gRPC, and ``get_blocks_nixl`` into a registered buffer), against the codec alone decoding the
same frames in batches of 16 on one thread in this process. Prints best and median per variant, the
ratio of each to the decode-only time, and whether both services restored identical bytes:

    python bench/onboard_ab.py --repeat 2 --rounds 4 [--calibration CAL.kvtc] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=Path, help="a calibration file (default: the default recipe's)")
    ap.add_argument("--repeat", type=int, default=2, help="copies of the 64 blocks stored (new hashes each)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kvbm_codec.adapters.kvbm import KvbmBlocks, KvbmLayout, KvbmTierClient
    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.bench.throughput import real_blocks
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.frontends.grpc.client import CodecClient
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.server.process import ServiceProcess
    from kvbm_codec.service.config import ModelConfig

    lm = CausalLM.load()
    cal = given_or_default(lm, args.calibration)
    s, mc = cal.shape, ModelConfig()
    spec = BlockSpec(s.n_layers, mc.page_size, s.n_kv_heads, s.key_head_dim, mc.dtype)
    rb = real_blocks(lm, spec, 64)
    codec = KVTCBlockCodec.create(cal, spec, 20.0)
    tensors = torch.stack(rb.tensors * args.repeat)
    n = tensors.shape[0]
    hashes = [(rb.hashes[i % 64] ^ (i // 64 + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(n)]
    firsts = [(i % 64) * spec.page_size for i in range(n)]
    blocks = KvbmBlocks.from_canonical(tensors, spec, KvbmLayout.FULLY_CONTIGUOUS, hashes, firsts)
    variants = {"prefetch": "true", "serial": "false"}
    svcs: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    regs: dict[str, tuple[Any, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-onboard-ab-") as d:
        registry = Path(d) / "registry"
        models = None
        if args.calibration is not None:  # serve exactly this calibration, as bench/scaling does
            from kvbm_codec.calibration.registry import Registry

            Registry.from_url(registry).publish(cal, promote=True)
            models = [
                {
                    "name": lm.info.name,
                    "fingerprint": cal.model_fingerprint,
                    "registry": str(registry),
                    "calibration": cal.calibration_id,
                    "target_cr": 20.0,
                    "page_size": spec.page_size,
                    "dtype": spec.dtype,
                }
            ]
        try:
            for k, v in variants.items():
                svcs[k] = ServiceProcess(
                    20.0,
                    Path(d) / f"serve-{k}.log",
                    model=lm.info.name,
                    models=models,
                    settings={"DYN_KVBM_CODEC_GET_PREFETCH": v},
                )
            tiers = {}
            for k, svc in svcs.items():
                clients[k] = CodecClient(svc.target, timeout_s=120.0)
                svc.wait_healthy(clients[k])
                tiers[k] = KvbmTierClient(clients[k], spec)
                tiers[k].offload(blocks, context_tokens=64 * spec.page_size)
                dest = torch.zeros((n, *spec.shape), dtype=spec.torch_dtype)
                regs[k] = (clients[k].nixl_agent().register(dest), dest)
            frames = [g.data for g in clients["serial"].get_blocks(hashes, as_frames=True)]
            torch.set_num_threads(1)

            def decode() -> None:
                for s0 in range(0, n, 16):
                    codec.decode_many(frames[s0 : s0 + 16])

            runs: dict[str, Any] = {"decode_only": decode}
            offsets = [i * spec.nbytes for i in range(n)]
            for k in variants:
                runs[f"grpc_{k}"] = lambda k=k: tiers[k].onboard(hashes, firsts)
                runs[f"nixl_{k}"] = lambda k=k: clients[k].get_blocks_nixl(regs[k][0], hashes, offsets)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            on, off = (tiers[k].onboard(hashes, firsts).blocks for k in variants)
            grpc_same = torch.equal(on.canonical(), off.canonical())
            nixl_same = torch.equal(regs["prefetch"][1], regs["serial"][1])
        finally:
            for reg, _ in regs.values():
                reg.close()
            for c in clients.values():
                c.close()
            codes = {k: svc.stop() for k, svc in svcs.items()}
    out: dict[str, Any] = {
        "blocks": n,
        "rounds": args.rounds,
        "identical_grpc": grpc_same,
        "identical_nixl": nixl_same,
    }
    best_dec = min(times["decode_only"])
    print(
        f"restored bytes identical with/without prefetch: gRPC {grpc_same}, NIXL {nixl_same}; exits {codes}"
    )
    for k, v in times.items():
        v.sort()
        out[k] = {"best_s": v[0], "median_s": v[len(v) // 2], "decode_only_over_this": best_dec / v[0]}
        print(
            f"{k:14} best {v[0]:.3f} s, median {v[len(v) // 2]:.3f} s; decode-only/this {best_dec / v[0]:.0%}"
        )
    for path in ("grpc", "nixl"):
        out[f"{path}_serial_over_prefetch"] = min(times[f"{path}_serial"]) / min(times[f"{path}_prefetch"])
        print(f"{path}: serial / prefetch (best) = {out[f'{path}_serial_over_prefetch']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
