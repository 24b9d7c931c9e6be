"""Bounded flood from one tenant while a second tenant measures its put/get latency (issue 18).

One process serves gRPC (bearer tokens for two tenants over loopback) and the S3 endpoint, with the
fairness limits on: ``max_inflight_per_tenant`` below ``max_inflight_requests``, a server-side
``max_deadline_s``, a short S3 body timeout and a per-tenant multipart bound. Tenant B first measures
put+get latency unloaded; then tenant A opens unread ``GetBlocks`` streams with hour-long deadlines,
stalled S3 uploads (a declared 737,280-byte body that sends 1 KB) and multipart spam up to its
bound, and tenant B measures again. Passes when B's p99 stays within ``--max-ratio`` of unloaded
and the process RSS stays under ``--rss-bound-mb`` (the process holds the model too), and nothing of
tenant B's is refused (refusals are reported per tenant class: tenant A is class ``flood``). The
unloaded and loaded rounds run in one process, one after the other, so the ratio compares like with
like on a shared machine; the 1-minute load average at the end is reported. Everything listens on
127.0.0.1 and is stopped; ``--time-limit-s`` bounds the whole run.

    .venv/bin/python bench/hostile_flood.py --ops 40 --json /tmp/flood.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import socket
import statistics
import sys
import threading
import time

import boto3
import grpc
import psutil
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.adapters.kv_blocks import kv_blocks
from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.types import PutItem
from kvbm_codec.calibration.calibrate import calibrate_small
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.auth import Authenticator, AuthPolicy, TokenTable
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.frontends.grpc.server import CodecServer
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.server.app import build_service
from kvbm_codec.service.config import NixlConfig, ServiceConfig
from kvbm_codec.texts import demo_document

SPEC = BlockSpec(n_layers=30, page_size=32, n_kv_heads=3, head_dim=64, dtype="float16")
MODEL = "smollm2-135m"
TOK_A, TOK_B = "a" * 32, "b" * 32
AK, SK = "AKFLOODA", "flood-secret-a"


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]


def measure(client: CodecClient, items: list[PutItem], ops: int) -> list[float]:
    out = []
    for i in range(ops):
        it = items[i % len(items)]
        t0 = time.perf_counter()
        client.put_blocks([it])
        (g,) = client.get_blocks([it.sequence_hash])
        assert g.status == "hit"
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=40)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stalled", type=int, default=6)
    ap.add_argument("--max-ratio", type=float, default=3.0)
    ap.add_argument("--rss-bound-mb", type=float, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--time-limit-s", type=float, default=900, help="exit 1 with every thread's stack past this"
    )
    a = ap.parse_args()
    t_start = time.monotonic()
    faulthandler.dump_traceback_later(a.time_limit_s, exit=True)  # bounded, whatever hangs

    lm = CausalLM.load()
    served = ServedModel(MODEL, calibrate_small(lm), SPEC, 20.0)
    blocks = kv_blocks(lm, demo_document(), SPEC, max_tokens=8 * SPEC.page_size)
    items = [PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks]
    cfg = ServiceConfig.load(
        grpc_port=0,
        metrics_port=0,
        workers=4,
        nixl=NixlConfig(enabled=False),
        max_inflight_requests=16,
        max_inflight_per_tenant=4,
        max_deadline_s=5.0,
        tenant_classes={"tenant-a": "flood"},
    )
    svc = build_service(cfg, models=[served])
    auth = Authenticator(AuthPolicy(tokens=TokenTable([("tenant-a", TOK_A), ("tenant-b", TOK_B)])))
    server = CodecServer(svc, cfg, authenticate=auth).start()
    s3 = start_s3_server(
        svc,
        S3Config(
            credentials=[CredentialConfig(access_key=AK, secret_key=SK, tenant="tenant-a")],
            buckets=[BucketBinding(max_position=4096)],
            body_timeout_s=3.0,
            max_uploads_per_tenant=8,
            workers=2,
        ),
    )
    target = f"127.0.0.1:{server.port}"
    b = CodecClient(target, model=MODEL, token=TOK_B, timeout_s=60, max_attempts=1)
    proc = psutil.Process()
    rss_peak = proc.memory_info().rss
    socks: list[socket.socket] = []
    ch = None
    try:
        measure(b, items, 4)  # warm up
        base = measure(b, items, a.ops)
        # ---- the flood ----
        ch = grpc.insecure_channel(target)
        stub = pb_grpc.KvbmCodecStub(ch)
        a_client = CodecClient(target, model=MODEL, token=TOK_A, timeout_s=60, max_attempts=1)
        a_client.put_blocks(items[:1])
        streams = [
            stub.GetBlocks(
                pb.GetBlocksRequest(
                    model=MODEL, sequence_hashes=[items[0].sequence_hash] * 256, batch_size=1
                ),
                timeout=3600,
                metadata=(("authorization", f"Bearer {TOK_A}"),),
            )
            for _ in range(a.streams)
        ]
        for _ in range(a.stalled):
            req = AWSRequest(method="PUT", url=f"{s3.url}/kvbm-smollm2-135m/stall", data=b"")
            S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1").add_auth(req)
            hdrs = {
                k: v for k, v in req.prepare().headers.items() if k.lower() not in ("content-length", "host")
            }
            s = socket.create_connection(("127.0.0.1", s3.port))
            head = [
                "PUT /kvbm-smollm2-135m/stall HTTP/1.1",
                f"Host: 127.0.0.1:{s3.port}",
                "Content-Length: 737280",
            ]
            s.sendall(
                ("\r\n".join(head + [f"{k}: {v}" for k, v in hdrs.items()]) + "\r\n\r\n").encode()
                + b"x" * 1024
            )
            socks.append(s)
        spam = boto3.client(
            "s3",
            endpoint_url=s3.url,
            aws_access_key_id=AK,
            aws_secret_access_key=SK,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        refused = 0
        for i in range(64):
            try:
                spam.create_multipart_upload(Bucket="kvbm-smollm2-135m", Key=f"spam{i}")
            except Exception:
                refused += 1
        stop = threading.Event()

        def sample() -> None:
            nonlocal rss_peak
            while not stop.is_set():
                rss_peak = max(rss_peak, proc.memory_info().rss)
                time.sleep(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        loaded = measure(b, items, a.ops)
        stop.set()
        th.join()
        for st in streams:
            st.cancel()
        refusals: dict[str, dict[str, int]] = {}
        for fam in svc.metrics.registry.collect():
            if fam.name == "kvbm_codec_requests_refused":
                for smp in fam.samples:
                    if smp.name.endswith("_total") and smp.value:
                        by = refusals.setdefault(smp.labels["tenant_class"], {})
                        by[smp.labels["reason"]] = int(smp.value)
        result = {
            "unloaded_p99_ms": round(p99(base) * 1000, 1),
            "loaded_p99_ms": round(p99(loaded) * 1000, 1),
            "unloaded_median_ms": round(statistics.median(base) * 1000, 1),
            "loaded_median_ms": round(statistics.median(loaded) * 1000, 1),
            "p99_ratio": round(p99(loaded) / p99(base), 2),
            "rss_peak_mb": round(rss_peak / 2**20),
            "multipart_refused_of_64": refused,
            "streams": a.streams,
            "stalled_uploads": a.stalled,
            "refusals_by_tenant_class": refusals,  # tenant-a is class flood, tenant-b default
            "seconds": round(time.monotonic() - t_start, 1),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        }
        result["ok"] = (
            result["p99_ratio"] <= a.max_ratio
            and result["rss_peak_mb"] <= a.rss_bound_mb
            and "default" not in refusals  # nothing of tenant B's was refused
        )
        print(json.dumps(result, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0 if result["ok"] else 1
    finally:
        for s in socks:
            s.close()
        if ch is not None:
            ch.close()
        b.close()
        s3.stop()
        server.stop(1.0)


if __name__ == "__main__":
    sys.exit(main())
