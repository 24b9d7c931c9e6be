"""`kvbm-codec bench throughput`: how close the block path runs to the codec, and the codec to the CPU.

Three figures measured in one process on the same real blocks (SmolLM2 KV of the held-out GPL text,
never the calibration corpus), so their ratios mean something on a loaded or unknown machine:

* the roofline: torch fp32 matmul GFLOP/s at the codec's own shapes (one thread), turned into the
  MB/s of decoded fp16 KV it allows through the FLOP per output byte the allocation implies (every
  kept component costs a multiply-add per feature of its basis);
* codec-only encode/decode MB/s per core (one torch thread), for the whole context as one frame and
  for the same tokens as batches of 1, 8, 64 blocks;
* the service's put/get MB/s over gRPC, NIXL and S3 on 127.0.0.1 at 1, 4 and 16 clients, the server
  in this process with its real front ends, store and admission; timed as the codec-only figures
  are, after a warm-up round of the same size, the best of ``repeats`` rounds (each put round
  stores new blocks; the median is kept beside it).

MB/s always counts raw fp16 KV bytes (what the engine moves), never compressed bytes.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvbm_codec.api.blocks import BlockSpec, block_positions, kv_to_block
from kvbm_codec.bench.base import single_thread
from kvbm_codec.bench.scaling import S3_PATHS
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.quantize import active_components
from kvbm_codec.core.matmul import fp32_matmul_mode
from kvbm_codec.kv import KVCache

PATHS = ("grpc", "nixl", "s3", "obj")
WARM_ROUND = -1  # the service levels' untimed round
_S3_KEY = ("AKKVBMBENCH", "bench-secret-key")  # a throwaway credential of the in-process endpoint


@dataclass(frozen=True)
class ThroughputOptions:
    """What one run measures; the defaults are the issue's figures, ``quick()`` a smoke run for tests."""

    blocks: int = 64  # 32-token blocks of context: the whole-context frame covers the same tokens
    batches: tuple[int, ...] = (1, 8, 64)
    clients: tuple[int, ...] = (1, 4, 16)
    paths: tuple[str, ...] = PATHS
    blocks_per_client: int = 8  # one put and one get of this many blocks per client (one S3 object each)
    target_cr: float = 20.0
    repeats: int = 3  # codec and roofline timings keep the best of this many
    service_threads: int | None = None  # torch intra-op threads of the service (None: its config's)
    batch_threads: int | None = None  # the service's batch_threads (None: its config's, one per core)
    s3_window_s: float | None = None  # the S3 endpoint's coalesce_window_s (None: its config's)
    codec_processes: int = 0  # the service's codec worker processes (0: its own threads)
    scaling_clients: tuple[int, ...] = ()  # levels of the pinned-service 1-core vs all-cores run (none: skip)
    scaling_rounds: int = 2  # that run's alternating rounds (best of each level is kept)

    @classmethod
    def quick(cls) -> ThroughputOptions:
        return cls(blocks=8, batches=(1, 8), clients=(1, 2), blocks_per_client=2, repeats=1)

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.blocks_per_client < 1 or self.repeats < 1:
            raise ValueError("blocks, blocks_per_client and repeats must be at least 1")
        if not self.batches or min(self.batches) < 1 or max(self.batches) > self.blocks:
            raise ValueError(f"batches must be in 1..blocks ({self.blocks}), got {self.batches}")
        if not self.clients or min(self.clients) < 1 or max(self.clients) > 64:
            raise ValueError(f"clients must be in 1..64, got {self.clients}")
        if self.scaling_clients and (min(self.scaling_clients) < 1 or max(self.scaling_clients) > 64):
            raise ValueError(f"scaling clients must be in 1..64, got {self.scaling_clients}")
        if self.scaling_rounds < 1:
            raise ValueError("scaling_rounds must be at least 1")
        if self.codec_processes < 0:
            raise ValueError(f"codec_processes must be 0 or more, got {self.codec_processes}")
        bad = set(self.paths) - set(PATHS)
        if bad:
            raise ValueError(f"unknown paths {sorted(bad)}; known: {', '.join(PATHS)}")


@dataclass
class RealBlocks:
    """One context's KV, whole and cut into blocks: every figure of a run is measured on these."""

    kv: KVCache
    spec: BlockSpec
    tensors: list[torch.Tensor]
    positions: list[torch.Tensor]
    hashes: list[int]
    data: list[bytes] = field(default_factory=list)

    @property
    def block_bytes(self) -> int:
        return self.spec.nbytes


def real_blocks(lm: Any, spec: BlockSpec, n_blocks: int) -> RealBlocks:
    """Prefill the held-out demo text once; the whole context and its blocks share those tokens."""
    from kvbm_codec.adapters.kvbm import sequence_hashes
    from kvbm_codec.texts import demo_document

    n = n_blocks * spec.page_size
    ids = lm.encode(demo_document())[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"the demo text has only {ids.shape[1]} tokens, {n} asked")
    kv, _ = lm.prefill(ids, return_logits=False)
    kv = kv.to(spec.torch_dtype)  # the engine's blocks are fp16: both sides see the same values
    tensors, positions = [], []
    for b in range(n_blocks):
        sub = kv.select_tokens(torch.arange(b * spec.page_size, (b + 1) * spec.page_size))
        tensors.append(kv_to_block(sub, spec).contiguous())
        positions.append(block_positions(b * spec.page_size, spec.page_size))
    hashes = sequence_hashes(ids[0].tolist(), spec.page_size)
    return RealBlocks(kv, spec, tensors, positions, hashes, [spec.to_bytes(t) for t in tensors])


def default_model_blocks(n_blocks: int = 64) -> tuple[Calibration, RealBlocks]:
    """The default model's calibration (the one `serve` uses) and ``n_blocks`` real blocks of its KV
    in the served block spec: what the side-by-side service scripts in bench/ drive."""
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import ModelConfig

    lm = CausalLM.load()
    cal = given_or_default(lm, None)
    return cal, real_blocks(lm, ModelConfig().block_spec(cal.shape), n_blocks)


# ---- roofline ------------------------------------------------------------------------------------


def decode_flop_per_byte(codec: KVTCCodec) -> float:
    """FLOP of the reconstruction matmuls per byte of decoded fp16 KV at the codec's allocation."""
    flop = out = 0
    for name, blocks in codec.alloc.blocks.items():
        dim = codec.cal.bases[name].dim
        flop += 2 * int(active_components(blocks).numel()) * dim
        out += 2 * dim
    return flop / out


def roofline_work(codec: KVTCCodec, n_tokens: int) -> tuple[Callable[[], object], int]:
    """The reconstruction matmuls of ``n_tokens`` tokens at the codec's shapes, and their FLOP."""
    work: list[tuple[torch.Tensor, torch.Tensor]] = []
    flop = 0
    g = torch.Generator().manual_seed(0)
    for name, blocks in codec.alloc.blocks.items():
        basis = codec.cal.bases[name].basis[:, active_components(blocks)].T.contiguous()  # [k, p]
        coeffs = torch.randn(n_tokens, basis.shape[0], generator=g)
        work.append((coeffs, basis))
        flop += 2 * n_tokens * basis.shape[0] * basis.shape[1]
    return (lambda: [c @ b for c, b in work]), flop


def roofline(codec: KVTCCodec, n_tokens: int, repeats: int) -> dict[str, float]:
    """One thread's fp32 matmul speed on exactly the reconstruction shapes the codec runs."""
    run, flop = roofline_work(codec, n_tokens)
    with single_thread():
        best = _best(run, repeats)
    gflops = flop / best / 1e9
    fpb = decode_flop_per_byte(codec)
    return {"gflops": gflops, "flop_per_byte": fpb, "implied_decode_mbps": gflops * 1e3 / fpb}


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch allocations and lazy init are not throughput
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- codec only ----------------------------------------------------------------------------------


def codec_only(
    codec: KVTCBlockCodec,
    rb: RealBlocks,
    batches: Sequence[int],
    repeats: int,
    context: KVTCCodec | None = None,
) -> dict[str, Any]:
    """Per-core encode/decode MB/s and stored ratios, whole context vs batches of blocks. ``codec`` is
    the block codec the service serves (its allocation sized on block frames when the calibration has
    one); ``context`` the whole-context codec at the same target (default: the block codec's own)."""
    kvc = context or codec.codec
    raw_ctx = rb.kv.nbytes(2)
    with single_thread():
        # The context frame keeps the same tokens raw as its blocks do (sinks only): no recent window.
        ctx_frame, _ = kvc.encode_with_stats(rb.kv, window_tokens=0)
        t_enc = _best(lambda: kvc.encode_with_stats(rb.kv, window_tokens=0), repeats)
        t_dec = _best(lambda: kvc.decode(ctx_frame), repeats)
        encode = {"context": raw_ctx / t_enc / 1e6}
        decode = {"context": raw_ctx / t_dec / 1e6}
        n = len(rb.tensors)
        for b in batches:
            spans = [range(s, min(n, s + b)) for s in range(0, n - n % b or n, b)]
            used = sum(len(r) for r in spans)

            def enc(spans: list[range] = spans) -> list[list[bytes]]:
                return [
                    [
                        f
                        for f, _ in codec.encode_many(
                            [rb.tensors[i] for i in r], [rb.positions[i] for i in r], [True] * len(r)
                        )
                    ]
                    for r in spans
                ]

            encoded = enc()
            t_enc = _best(enc, repeats)
            t_dec = _best(lambda encoded=encoded: [codec.decode_many(part) for part in encoded], repeats)
            for out in codec.decode_many(encoded[0]):
                if isinstance(out, Exception):
                    raise out
            encode[str(b)] = used * rb.block_bytes / t_enc / 1e6
            decode[str(b)] = used * rb.block_bytes / t_dec / 1e6
    all_frames = [f for f, _ in codec.encode_many(rb.tensors, rb.positions, [True] * len(rb.tensors))]
    same = KVTCBlockCodec(KVTCCodec(kvc.cal, kvc.alloc), codec.spec)  # blocks at the context allocation
    same_frames = [f for f, _ in same.encode_many(rb.tensors, rb.positions, [True] * len(rb.tensors))]
    return {
        "block_stored_ratio_context_allocation": len(same_frames)
        * rb.block_bytes
        / sum(len(f) for f in same_frames),
        "encode": encode,
        "decode": decode,
        "context_stored_ratio": raw_ctx / len(ctx_frame),
        "block_stored_ratio": len(all_frames) * rb.block_bytes / sum(len(f) for f in all_frames),
        "block_frame_bytes": sum(len(f) for f in all_frames) / len(all_frames),
    }


def s3_placement(
    cal: Calibration, rb: RealBlocks, target_cr: float, repeats: int, batch: int
) -> dict[str, float]:
    """What an S3 put adds before encoding, per block, one thread: the RoPE position search (an
    object key carries no position) and the layout check (which searches the other readings too),
    for one block alone and for ``batch`` blocks placed together (what the endpoint does with
    concurrent PUTs)."""
    from kvbm_codec.core.service import ServedModel
    from kvbm_codec.frontends.s3.buckets import Bucket
    from kvbm_codec.service.config import BucketBinding

    s = rb.spec
    bucket = Bucket(
        BucketBinding(page_size=s.page_size, dtype=s.dtype), ServedModel("bench", cal, s, target_cr)
    )
    n = len(rb.tensors)
    spans = [range(i, min(i + batch, n)) for i in range(0, n, batch)]
    with single_thread():
        placed = [p for r in spans for p in bucket.place([rb.tensors[i] for i in r], [None] * len(r))]
        hits = sum(p.position == int(t[0]) for p, t in zip(placed, rb.positions, strict=True))
        t_one = _best(lambda: [bucket.place([t], [None]) for t in rb.tensors], repeats)
        t_est = _best(
            lambda: [bucket.place([rb.tensors[i] for i in r], [None] * len(r)) for r in spans], repeats
        )
        t_fit = _best(
            lambda: [
                bucket.misfit_many(
                    [rb.data[i] for i in r], [rb.tensors[i] for i in r], [placed[i] for i in r]
                )
                for r in spans
            ],
            repeats,
        )
    return {
        "batch": batch,
        "position_ms": t_est / n * 1e3,
        "position_ms_batch1": t_one / n * 1e3,
        "layout_check_ms": t_fit / n * 1e3,
        "positions_right": hits / n,
    }


# ---- the service over its front ends -------------------------------------------------------------


class _Level:
    """One (path, clients) level: every client stores its own copy of the blocks, then reads it back."""

    def __init__(
        self,
        targets: dict[str, Any],
        path: str,
        n_clients: int,
        rb: RealBlocks,
        per_client: int,
        connect: Callable[[int], Any] | None = None,
    ):
        """``connect(c)``: client c's gRPC transport (e.g. a ShardedClient over several replicas),
        instead of a CodecClient of ``targets["grpc"]``; the grpc path only."""
        if connect is not None and path != "grpc":
            raise ValueError(f"a connect hook drives the grpc path only, not {path!r}")
        self.targets, self.path, self.n, self.rb = targets, path, n_clients, rb
        self.connect = connect
        self.idx = [
            [(c * per_client + k) % len(rb.data) for k in range(per_client)] for c in range(n_clients)
        ]
        self.salt = 1 + 64 * (PATHS.index(path) * 65 + n_clients)  # no two levels (or clients) share a key
        self.clients: list[Any] = []
        self.regs: list[tuple[Any, Any]] = []
        # an S3 client sends its objects concurrently, one request each (as vLLM's OBJ tier and
        # NIXL's OBJ backend do from their I/O threads): the endpoint may serve them as one batch
        self.pools: list[ThreadPoolExecutor] = []
        # obj: one NIXL agent per client with the OBJ backend, and its put and get buffers (one per
        # block: a NIXL OBJ transfer is one object per descriptor, sent concurrently by the backend)
        self.bufs: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def open(self) -> None:
        for c in range(self.n):
            if self.path == "s3":
                self.clients.append(_s3_client(self.targets["s3"], per_client=len(self.idx[c])))
                self.pools.append(ThreadPoolExecutor(len(self.idx[c]), thread_name_prefix="bench-s3"))
                continue
            if self.path == "obj":
                self.clients.append(_obj_client(self.targets["s3"], self.targets["bucket"], c))
                self.bufs.append(
                    (
                        [np.frombuffer(self.rb.data[i], dtype=np.uint8).copy() for i in self.idx[c]],
                        [np.empty(self.rb.block_bytes, dtype=np.uint8) for _ in self.idx[c]],
                    )
                )
                continue
            if self.connect is not None:
                self.clients.append(self.connect(c))
                continue
            from kvbm_codec.frontends.grpc.client import CodecClient

            client = CodecClient(
                self.targets["grpc"], model=self.targets["model"], timeout_s=600, max_attempts=5
            )
            self.clients.append(client)
            if self.path == "nixl":
                agent = client.nixl_agent()
                src = torch.frombuffer(
                    bytearray(b"".join(self.rb.data[i] for i in self.idx[c])), dtype=torch.uint8
                )
                self.regs.append((agent.register(src), agent.register(torch.zeros_like(src))))
        # warm-up outside the timed region, at the timed size: channels, for NIXL the peers' metadata
        # and UCX wire-up, and the first batch of this size through the codec and the store (a
        # one-block warm-up left those in the first timed put: ~1.5x its steady time)
        for c in range(self.n):
            self.put(c, WARM_ROUND)
            self.get(c, WARM_ROUND)

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)
        for src, dst in self.regs:
            src.close()
            dst.close()
        for c in self.clients:
            if hasattr(c, "close"):
                c.close()

    def hashes(self, c: int, rnd: int) -> list[int]:
        """Client c's keys in round ``rnd``: every put round stores new blocks (nothing is deduplicated),
        each get round reads the blocks its own put round stored."""
        mix = 0x9E3779B97F4A7C15 * (self.salt + c) + 0xD1B54A32D192ED03 * (rnd + 1)
        return [(self.rb.hashes[i] ^ mix) & (2**64 - 1) for i in self.idx[c]]

    def put(self, c: int, rnd: int) -> None:
        from kvbm_codec.api.types import PutItem

        ix, hs = self.idx[c], self.hashes(c, rnd)
        ps = self.rb.spec.page_size
        if self.path == "grpc":
            self.clients[c].put_blocks(
                [PutItem(h, self.rb.data[i], first_position=i * ps) for h, i in zip(hs, ix, strict=True)]
            )
        elif self.path == "nixl":
            nb = self.rb.block_bytes
            self.clients[c].put_blocks_nixl(
                self.regs[c][0], [(h, i * ps, k * nb) for k, (h, i) in enumerate(zip(hs, ix, strict=True))]
            )
        elif self.path == "obj":
            self.clients[c].write(self.bufs[c][0], hs)
        else:
            bucket, client, data = self.targets["bucket"], self.clients[c], self.rb.data
            list(
                self.pools[c].map(
                    lambda hi: client.put_object(Bucket=bucket, Key=f"{hi[0]:016x}", Body=data[hi[1]]),
                    list(zip(hs, ix, strict=True)),
                )
            )

    def get(self, c: int, rnd: int) -> None:
        hs = self.hashes(c, rnd)
        if self.path == "grpc":
            got = self.clients[c].get_blocks(hs)
            ok = all(
                g.status == "hit" and g.data is not None and len(g.data) == self.rb.block_bytes for g in got
            )
        elif self.path == "nixl":
            nb = self.rb.block_bytes
            got = self.clients[c].get_blocks_nixl(self.regs[c][1], hs, [k * nb for k in range(len(hs))])
            ok = all(g.status == "hit" for g in got)
        elif self.path == "obj":
            self.clients[c].read(self.bufs[c][1], hs)  # a missing object fails the transfer (ERR)
            ok = True
        else:
            bucket, client = self.targets["bucket"], self.clients[c]
            sizes = self.pools[c].map(
                lambda h: len(client.get_object(Bucket=bucket, Key=f"{h:016x}")["Body"].read()), hs
            )
            ok = all(n == self.rb.block_bytes for n in sizes)
        if not ok or len(hs) == 0:
            raise RuntimeError(f"{self.path} get of {len(hs)} blocks did not return them all")

    def run(self, op: str, rnd: int) -> float:
        """Wall seconds for every client to finish one ``op`` of all its blocks, started together."""
        fn = self.put if op == "put" else self.get
        barrier = threading.Barrier(self.n + 1)
        errors: list[BaseException] = []

        def worker(c: int) -> None:
            barrier.wait()
            try:
                fn(c, rnd)
            except BaseException as e:  # re-raised in the caller: a failed level is no figure
                errors.append(e)
            barrier.wait()

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(self.n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        barrier.wait()
        dt = time.perf_counter() - t0
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return dt


def _s3_client(endpoint: str, per_client: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=_S3_KEY[0],
        aws_secret_access_key=_S3_KEY[1],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            max_pool_connections=max(4, per_client),
            read_timeout=600,
        ),
    )


def _obj_client(endpoint: str, bucket: str, c: int) -> Any:
    from kvbm_codec.frontends.s3.nixl_obj import ObjClient, obj_params

    return ObjClient(obj_params(endpoint, bucket, *_S3_KEY), name=f"bench-obj-{os.getpid()}-{c}")


@functools.cache
def obj_unavailable() -> str | None:
    """Why NIXL's OBJ backend cannot drive the S3 endpoint here (None: it can). Asked once per
    process: the probe starts a NIXL agent, and the answer cannot change while the process runs."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        return f"nixl is not installed ({e})"
    try:
        agent = nixl_agent(f"bench-obj-probe-{os.getpid()}", nixl_agent_config(backends=[]))
        plugins = agent.get_plugin_list()
    except Exception as e:  # a NIXL without its runtime: the path is skipped, and says why
        return f"a NIXL agent does not start: {e}"
    return None if "OBJ" in plugins else f"NIXL has no OBJ plugin (plugins: {plugins})"


def service_levels(
    cal: Calibration, spec: BlockSpec, rb: RealBlocks, opts: ThroughputOptions, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """put/get MB/s per (path, clients), through a real server on 127.0.0.1 in this process."""
    from kvbm_codec.core.service import ServedModel
    from kvbm_codec.frontends.grpc.server import CodecServer
    from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
    from kvbm_codec.server.app import apply_codec_threads, build_service
    from kvbm_codec.service.config import NixlConfig, ServiceConfig

    name = "smollm2-135m"
    served = ServedModel(name, cal, spec, opts.target_cr)
    most = max(opts.clients)
    overrides: dict[str, Any] = {}
    if opts.service_threads is not None:
        overrides["codec_threads"] = opts.service_threads
    if opts.batch_threads is not None:
        overrides["batch_threads"] = opts.batch_threads
    if opts.codec_processes:
        overrides["codec_processes"] = opts.codec_processes
    cfg = ServiceConfig.load(
        grpc_port=0,
        metrics_port=None,
        max_inflight_requests=max(64, 2 * most),
        nixl=NixlConfig(
            staging_bytes=2 * most * opts.blocks_per_client * spec.nbytes,
            slot_bytes=opts.blocks_per_client * spec.nbytes,
        ),
        **overrides,
    )
    threads_before = torch.get_num_threads()
    apply_codec_threads(cfg)  # what `kvbm-codec serve` does at start
    svc = build_service(cfg, models=[served])
    server = CodecServer(svc, cfg).start()
    s3 = None
    targets: dict[str, Any] = {"grpc": f"127.0.0.1:{server.port}", "model": name}
    if set(S3_PATHS) & set(opts.paths):
        binding = BucketBinding(model=name, page_size=spec.page_size, dtype=spec.dtype)
        s3 = start_s3_server(
            svc,
            S3Config(
                credentials=[CredentialConfig(access_key=_S3_KEY[0], secret_key=_S3_KEY[1], tenant="bench")],
                buckets=[binding],
                workers=most,
                **({} if opts.s3_window_s is None else {"coalesce_window_s": opts.s3_window_s}),
            ),
        )
        targets["s3"], targets["bucket"] = s3.url, binding.name
    rows: list[dict[str, Any]] = []
    try:
        for n in opts.clients:
            for path in opts.paths:
                if path == "nixl" and server.staging is None:
                    log("NIXL is not available here: the nixl path is skipped")
                    continue
                if path == "obj" and (why := obj_unavailable()) is not None:
                    log(f"the obj path is skipped: {why}")
                    continue
                level = _Level(targets, path, n, rb, opts.blocks_per_client)
                try:
                    level.open()
                    for op in ("put", "get"):
                        ep = s3.endpoint if s3 is not None else None
                        lane = None if ep is None else (ep.writes if op == "put" else ep.reads)
                        before = lane.stats() if lane is not None else None
                        # as the codec-only figures: warm, then the best of `repeats` rounds
                        dts = [level.run(op, r) for r in range(opts.repeats)]
                        mb = n * opts.blocks_per_client * spec.nbytes / 1e6
                        mbps = mb / min(dts)
                        row: dict[str, Any] = {
                            "path": path,
                            "op": op,
                            "clients": n,
                            "mbps": mbps,
                            "mbps_median": mb / sorted(dts)[len(dts) // 2],
                            "rounds": len(dts),
                        }
                        extra = ""
                        if path in S3_PATHS and lane is not None and before is not None:
                            after = lane.stats()  # objects per core call: the coalescer's batches
                            row["s3_blocks_per_batch"] = (after.items - before.items) / max(
                                1, after.batches - before.batches
                            )
                            extra = f"  ({row['s3_blocks_per_batch']:.1f} objects per batch)"
                        rows.append(row)
                        log(f"  {path:4} {op} {n:2} clients: {mbps:7.2f} MB/s{extra}")
                finally:
                    level.close()
    finally:
        if s3 is not None:
            s3.stop()
        server.stop(5.0)
        torch.set_num_threads(threads_before)
    return rows


# ---- the whole run -------------------------------------------------------------------------------


def run_throughput(
    lm: Any, cal: Calibration, opts: ThroughputOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every figure of the issue in one run; the JSON keys are the report's contract."""
    from kvbm_codec.service.config import ModelConfig, ServiceConfig

    spec = ModelConfig().block_spec(cal.shape)
    t0 = time.perf_counter()
    rb = real_blocks(lm, spec, opts.blocks)
    codec = KVTCBlockCodec.create(cal, spec, opts.target_cr)  # what the service encodes blocks with
    context = KVTCCodec(cal, opts.target_cr)
    n_comp = rb.kv.n_tokens - int((rb.kv.positions < cal.config.sink_tokens).sum())
    roof = roofline(codec.codec, n_comp, opts.repeats)
    log(
        f"roofline: {roof['gflops']:.1f} GFLOP/s fp32 ({fp32_matmul_mode()}, 1 thread) at "
        f"{roof['flop_per_byte']:.0f} FLOP per "
        f"decoded byte -> {roof['implied_decode_mbps']:.1f} MB/s of fp16 KV"
    )
    co = codec_only(codec, rb, opts.batches, opts.repeats, context)
    implied = roof["implied_decode_mbps"]
    for op in ("encode", "decode"):
        for k, v in co[op].items():
            what = "whole context" if k == "context" else f"batch of {k} blocks"
            log(f"codec {op} {what:>18}: {v:7.2f} MB/s per core  ({v / implied:.0%} of roofline)")
    log(
        f"stored ratio: block {co['block_stored_ratio']:.2f}x (allocation {codec.codec.alloc.allocation_id}; "
        f"{co['block_stored_ratio_context_allocation']:.2f}x at the context allocation), "
        f"whole context {co['context_stored_ratio']:.2f}x (allocation {context.alloc.allocation_id})"
    )
    # a request of blocks_per_client blocks is compared with the codec batch nearest below it
    ref_batch = str(max([b for b in opts.batches if b <= opts.blocks_per_client] or [min(opts.batches)]))
    place = s3_placement(cal, rb, opts.target_cr, opts.repeats, int(ref_batch))
    enc_ms = spec.nbytes / co["encode"][ref_batch] / 1e3
    place["encode_ms"] = enc_ms
    put_ms = enc_ms + place["position_ms"] + place["layout_check_ms"]
    place["position_share_of_put"] = place["position_ms"] / put_ms
    log(
        f"S3 placement per block, batches of {ref_batch}: position search {place['position_ms']:.1f} ms "
        f"(alone: {place['position_ms_batch1']:.1f} ms), layout check {place['layout_check_ms']:.1f} ms, "
        f"encode {enc_ms:.1f} ms: the search is {place['position_share_of_put']:.0%} of a put's codec work; "
        f"positions recovered {place['positions_right']:.0%}"
    )
    rows = service_levels(cal, spec, rb, opts, log) if opts.paths else []
    for r in rows:
        ref = co["encode" if r["op"] == "put" else "decode"][ref_batch]
        r["ratio_to_codec"] = r["mbps"] / ref
        r["ratio_to_roofline"] = r["mbps"] / implied
    if rows:
        log(f"service (ratios to codec-only at batch {ref_batch} and to the roofline, per core):")
        for r in rows:
            log(
                f"  {r['path']:4} {r['op']} {r['clients']:2} clients: {r['mbps']:7.2f} MB/s  "
                f"{r['ratio_to_codec']:.0%} of codec, {r['ratio_to_roofline']:.0%} of roofline"
            )
    scaling = None
    if opts.scaling_clients:
        scaling = _scaling(cal, spec, rb, opts, log)
    if scaling is not None:  # the service in its own process, against the same codec-only figure
        for r in scaling["rows"]:
            r["ratio_to_codec"] = r["mbps"] / co["encode" if r["op"] == "put" else "decode"][ref_batch]
        log(f"pinned `serve` on every core, ratios to codec-only at batch {ref_batch} (per core):")
        for r in scaling["rows"]:
            if r["cores"] == max(x["cores"] for x in scaling["rows"]):
                what = f"{r['path']:4} {r['op']} {r['clients']:2} clients"
                log(f"  {what}: {r['mbps']:7.2f} MB/s  {r['ratio_to_codec']:.0%} of codec")
    return {
        "core_scaling": scaling,
        "roofline_gflops": roof["gflops"],
        "roofline_flop_per_byte": roof["flop_per_byte"],
        "roofline_decode_mbps": implied,
        "codec_encode_mbps_per_core": co["encode"],
        "codec_decode_mbps_per_core": co["decode"],
        "service": rows,
        "service_reference_batch": int(ref_batch),
        "block_stored_ratio": co["block_stored_ratio"],
        "context_stored_ratio": co["context_stored_ratio"],
        "block_stored_ratio_context_allocation": co["block_stored_ratio_context_allocation"],
        "block_frame_bytes": co["block_frame_bytes"],
        "s3_placement": place,
        "calibration_id": cal.calibration_id,
        "allocation_id": codec.codec.alloc.allocation_id,
        "context_allocation_id": context.alloc.allocation_id,
        "target_cr": opts.target_cr,
        "blocks": opts.blocks,
        "blocks_per_client": opts.blocks_per_client,
        "torch_threads": torch.get_num_threads(),
        "service_codec_threads": (
            opts.service_threads
            if opts.service_threads is not None
            else ServiceConfig.model_fields["codec_threads"].default
        ),
        "service_batch_threads": (
            opts.batch_threads
            if opts.batch_threads is not None
            else ServiceConfig.model_fields["batch_threads"].default
        ),
        "service_codec_processes": opts.codec_processes,
        "cpus": len(os.sched_getaffinity(0)),
        "fp32_matmul": fp32_matmul_mode(),  # every MB/s and the roofline depend on it (core/matmul.py)
        "seconds": time.perf_counter() - t0,
    }


def _scaling(
    cal: Calibration, spec: BlockSpec, rb: RealBlocks, opts: ThroughputOptions, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The service as its own process on one core, then on every core this process may use."""
    from kvbm_codec.bench.scaling import core_scaling

    cores = sorted(os.sched_getaffinity(0))
    paths = list(opts.paths or ("grpc", "nixl"))
    if "obj" in paths and (why := obj_unavailable()) is not None:
        log(f"core scaling: the obj path is skipped: {why}")
        paths.remove("obj")
    if len(cores) < 2 or not paths:
        log("core scaling needs 2+ cores and a service path: skipped")
        return None
    log(f"core scaling: `kvbm-codec serve` pinned to core {cores[0]}, then to cores {cores}")
    res = core_scaling(
        cal,
        spec,
        lambda targets, path, n: _Level(targets, path, n, rb, opts.blocks_per_client),
        core_sets=[cores[:1], cores],
        clients=opts.scaling_clients,
        paths=paths,
        blocks_per_client=opts.blocks_per_client,
        target_cr=opts.target_cr,
        rounds=opts.scaling_rounds,
        batch_threads=opts.batch_threads,
        log=log,
        s3_key=_S3_KEY,
        codec_processes=opts.codec_processes,
    )
    for r in res["ratios"]:
        what = f"{r['path']:4} {r['op']} {r['clients']:2} clients"
        log(f"  {what}: {len(cores)} cores / 1 core = {r['ratio']:.2f}x")
    log(f"  all levels summed: {res['sum_ratio']:.2f}x")
    return res


def write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
