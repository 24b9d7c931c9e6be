"""Onboard through `kvbm-codec serve` with the streamed get's prefetch on and off, side by side; or,
with ``--base REV``, this tree's service against REV's (both serial), the client being this tree's.

Two `kvbm-codec serve` processes of the same build and calibration, one with ``get_prefetch`` (a
GetBlocks stream decodes its next batch while the current one is sent; off by default) and one without,
hold the same real blocks (SmolLM2 KV of the held-out demo text, 64 blocks of 32 tokens repeated
under new hashes); rounds alternate between them: the README job's onboard (``KvbmTierClient.onboard``
over gRPC, and ``get_blocks_nixl`` into a registered buffer), against the codec alone decoding the
same frames in batches of 16 on one thread in this process. Prints best and median per variant, the
ratio of each to the decode-only time, and whether both services restored identical bytes:

    python bench/onboard_ab.py --repeat 2 --rounds 4 [--calibration CAL.kvtc] [--json OUT.json]
    python bench/onboard_ab.py --base e040795 --repeat 4 --rounds 6    # variants "this" and "base"
    python bench/onboard_ab.py --variant one:DYN_KVBM_CODEC_BATCH_THREADS=1 \
        --variant split:DYN_KVBM_CODEC_BATCH_THREADS=0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
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
    ap.add_argument(
        "--base", help="serve a git revision's service beside this tree's instead of prefetch on/off"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=V[,KEY=V]",
        help="two of these instead: each service's settings (environment), "
        "e.g. one:DYN_KVBM_CODEC_BATCH_THREADS=1",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.core.matmul import configure_fp32_matmul
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.server.process import ServiceProcess
    from kvbm_codec.service.config import ModelConfig

    configure_fp32_matmul()  # the decode-only reference runs as the services do (their CLI sets it)
    lm = CausalLM.load()
    cal = given_or_default(lm, args.calibration)
    spec = ModelConfig().block_spec(cal.shape)
    codec = KVTCBlockCodec.create(cal, spec, 20.0)
    blocks = stored_copies(lm, spec, args.repeat)
    hashes, firsts, n = blocks.sequence_hashes, blocks.first_positions, blocks.n_blocks
    variants: dict[str, dict[str, str]] = {
        "prefetch": {"DYN_KVBM_CODEC_GET_PREFETCH": "true"},
        "serial": {"DYN_KVBM_CODEC_GET_PREFETCH": "false"},
    }
    svcs: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    regs: dict[str, tuple[Any, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-onboard-ab-") as d:
        registry = Path(d) / "registry"
        if args.variant:
            if len(args.variant) != 2:
                raise SystemExit("--variant: give exactly two")
            variants = {}
            for v in args.variant:
                name, _, kvs = v.partition(":")
                variants[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
        elif args.base:
            variants = {"this": {}, "base": {"PYTHONPATH": str(checkout(args.base, Path(d) / "base"))}}
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
                    settings=v,
                )
            tiers = connect_and_offload(svcs, clients, blocks)
            for k in svcs:
                dest = torch.zeros((n, *spec.shape), dtype=spec.torch_dtype)
                regs[k] = (clients[k].nixl_agent().register(dest), dest)
            frames = [g.data for g in clients[list(variants)[-1]].get_blocks(hashes, as_frames=True)]
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
            nixl_same = torch.equal(*(regs[k][1] for k in variants))
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
    print(f"restored bytes identical in both variants: gRPC {grpc_same}, NIXL {nixl_same}; exits {codes}")
    for k, v in times.items():
        v.sort()
        out[k] = {"best_s": v[0], "median_s": v[len(v) // 2], "decode_only_over_this": best_dec / v[0]}
        print(
            f"{k:14} best {v[0]:.3f} s, median {v[len(v) // 2]:.3f} s; decode-only/this {best_dec / v[0]:.0%}"
        )
    a, b = variants
    for path in ("grpc", "nixl"):
        out[f"{path}_{b}_over_{a}"] = min(times[f"{path}_{b}"]) / min(times[f"{path}_{a}"])
        print(f"{path}: {b} / {a} (best) = {out[f'{path}_{b}_over_{a}']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def stored_copies(lm: Any, spec: Any, repeat: int) -> Any:
    """64 real blocks of the held-out demo text, ``repeat`` times under new hashes (KvbmBlocks)."""
    from kvbm_codec.adapters.kvbm import KvbmBlocks, KvbmLayout
    from kvbm_codec.bench.throughput import real_blocks

    rb = real_blocks(lm, spec, 64)
    tensors = torch.stack(rb.tensors * repeat)
    n = tensors.shape[0]
    hashes = [(rb.hashes[i % 64] ^ (i // 64 + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(n)]
    firsts = [(i % 64) * spec.page_size for i in range(n)]
    return KvbmBlocks.from_canonical(tensors, spec, KvbmLayout.FULLY_CONTIGUOUS, hashes, firsts)


def connect_and_offload(svcs: dict[str, Any], clients: dict[str, Any], blocks: Any) -> dict[str, Any]:
    """A client per started service (into ``clients``, which the caller closes), once it is healthy,
    with ``blocks`` offloaded through it; the tier clients, by the same names."""
    from kvbm_codec.adapters.kvbm import KvbmTierClient
    from kvbm_codec.frontends.grpc.client import CodecClient

    tiers = {}
    for k, svc in svcs.items():
        clients[k] = CodecClient(svc.target, timeout_s=120.0)
        svc.wait_healthy(clients[k])
        tiers[k] = KvbmTierClient(clients[k], blocks.spec)
        tiers[k].offload(blocks, context_tokens=64 * blocks.spec.page_size)
    return tiers


def checkout(rev: str, into: Path) -> Path:
    """REV's package tree (git archive), with this tree's compiled protos: its ``serve`` runs from it."""
    root = Path(__file__).resolve().parent.parent
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "kvbm_codec"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shutil.copytree(root / "kvbm_codec" / "_proto", into / "kvbm_codec" / "_proto", dirs_exist_ok=True)
    return into


if __name__ == "__main__":
    main()
