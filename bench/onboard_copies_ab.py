"""The gRPC onboard's copies, old vs new, on both sides: a base revision's server against this tree's,
and the base's client code path against this tree's (with and without ``out=``), interleaved.

The base client path is re-stated here as e040795 ran it (protobuf parses each message, ``.data``
copies each block into its own bytes, ``from_bytes`` makes a writable copy, ``torch.stack`` a
fourth); this tree reads each block's data as a view into the received message and copies it
once, into fresh memory or into ``out`` (memory the caller already holds, as an engine's KV pages).
All six combinations restore the same 256 real SmolLM2 blocks (64 distinct, stored 4 times under new
hashes) and must return identical bytes. Prints best and median per combination:

    python bench/onboard_copies_ab.py --base e040795 --rounds 8 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision whose server runs beside this tree's")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 64 blocks stored (new hashes each)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onboard_ab import checkout, connect_and_offload, stored_copies

    from kvbm_codec._proto import kvbm_codec_pb2 as pb
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.server.process import ServiceProcess
    from kvbm_codec.service.config import ModelConfig

    lm = CausalLM.load()
    cal = given_or_default(lm, None)
    spec = ModelConfig().block_spec(cal.shape)
    blocks = stored_copies(lm, spec, args.repeat)
    hashes, firsts, n = blocks.sequence_hashes, blocks.first_positions, blocks.n_blocks

    def base_client(c: Any) -> torch.Tensor:
        got: list[bytes] = []
        for st in range(0, n, 64):
            part = hashes[st : st + 64]
            req = pb.GetBlocksRequest(
                model=c.model, sequence_hashes=part, encoding=pb.ENCODING_RAW, dtype=c.dtype or ""
            )
            for msg in c.stub.GetBlocks(req, timeout=120):
                got += [b.data for b in msg.blocks]
        return torch.stack([spec.from_bytes(x) for x in got])

    with tempfile.TemporaryDirectory(prefix="kvbm-codec-copies-ab-") as d:
        pp = str(checkout(args.base, Path(d) / "base"))
        svcs = {
            "base": ServiceProcess(
                20.0, Path(d) / "base.log", model=lm.info.name, settings={"PYTHONPATH": pp}
            ),
            "this": ServiceProcess(20.0, Path(d) / "this.log", model=lm.info.name),
        }
        clients: dict[str, Any] = {}
        try:
            tiers = connect_and_offload(svcs, clients, blocks)
            pages = torch.zeros((n, *spec.shape), dtype=spec.torch_dtype)
            runs = {}
            for k in svcs:
                runs[f"{k} server, base client"] = lambda k=k: base_client(clients[k])
                runs[f"{k} server, this client"] = lambda k=k: (
                    tiers[k].onboard(hashes, firsts).blocks.canonical()
                )
                runs[f"{k} server, this client out="] = lambda k=k: (
                    tiers[k].onboard(hashes, firsts, out=pages).blocks.canonical()
                )
            ref = base_client(clients["base"])
            identical = all(torch.equal(f(), ref) for f in runs.values())
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        finally:
            for c in clients.values():
                c.close()
            codes = {k: svc.stop() for k, svc in svcs.items()}
    print(f"{n} blocks; identical restores: {identical}; service exits {codes}")
    out: dict[str, Any] = {"base": args.base, "blocks": n, "rounds": args.rounds, "identical": identical}
    for k, v in times.items():
        out[k] = {"best_s": min(v), "median_s": statistics.median(v), "all_s": v}
        print(f"{k:32} best {min(v):.3f} s, median {statistics.median(v):.3f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
