"""One vLLM (CPU) engine run of the engine demo and tests; runs in the vLLM environment (.venv-vllm).

``python -m kvbm_codec.adapters.vllm.engine REQUEST.json OUT.json``. The request names the offload
path ("native": the kvbm-codec tier, block data over NIXL where both ends have it; "native-grpc":
the same tier with block data in gRPC messages; "native-sharded": the tier over two replicas, each
block on its ring owner; "obj": vLLM's stock OBJ tier against the S3 endpoint),
the service, the prompt's token ids and what to measure. The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the native tier's counters are readable. The sequence:

1. cold: the prompt with one output token (time to first token = a full prefill); its full chunks
   cascade CPU tier -> kvbm-codec; then the greedy answer from the same, exact, cache (reference);
2. every vLLM cache reset (device prefix cache and the CPU tier: ``reset_prefix_cache(reset_connector
   =True)``), then the prompt again with one output token: its prefix now comes from kvbm-codec;
3. the greedy answer again (from the restored cache), and teacher-forced top-1 on the reference
   answer: one request per answer position, the restored prefix plus the reference tokens before it;
4. optionally a stream of distinct requests (offload under load), timing each step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def kv_transfer_config(req: dict[str, Any]) -> dict[str, Any]:
    """The exact ``kv_transfer_config`` of each path (docs/vllm.md shows the same)."""
    if req["path"] in ("native", "native-grpc", "native-sharded"):
        tier = {
            "type": "KvbmCodecTier",
            "module_path": "kvbm_codec.adapters.vllm.tier",
            "target": req["targets"] if req["path"] == "native-sharded" else req["target"],
            "max_pending_stores": req.get("max_pending_stores", 8),
            # block data over NIXL when both ends have it (else gRPC bytes, logged and counted)
            "transport": "grpc" if req["path"] == "native-grpc" else "auto",
            # one namespace per engine run: blocks a previous run stored never serve this run's cold prefill
            "namespace": req["path"] + "/",
        }
    else:
        tier = {
            "type": "obj",
            "prefix": "kv",
            # NIXL I/O threads, i.e. GETs in flight at once: the endpoint decodes concurrent GETs
            # as one batch, so more of them in flight restore a prefix in fewer, larger decodes
            "io_threads": req.get("obj_io_threads", 32),
            "store_config": {
                "bucket": req["bucket"],
                "endpoint_override": req["s3_url"],
                "access_key": req["access_key"],
                "secret_key": req["secret_key"],
                "region": "us-east-1",
                "scheme": "http",
            },
        }
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "CpuTieringOffloadingSpec",
            "spec_module_path": "kvbm_codec.adapters.vllm.cpu_spec",
            "cpu_bytes_to_use": req.get("cpu_bytes", 256 << 20),
            "block_size": 32,
            "secondary_tiers": [tier],
        },
    }


def main(request_path: str, out_path: str) -> None:
    req = json.loads(Path(request_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvbm_codec.adapters.vllm.tier import live_tiers

    out: dict[str, Any] = {"path": req["path"]}
    # "none": the same engine without offloading, the baseline of the stream timings
    ktc = None if req["path"] == "none" else KVTransferConfig(**kv_transfer_config(req))
    t0 = time.perf_counter()
    llm = LLM(
        model=req["model_dir"],
        dtype="float32",
        enforce_eager=True,
        block_size=32,
        max_model_len=req.get("max_model_len", 8192),
        kv_transfer_config=ktc,
        seed=0,
        disable_log_stats=False,
    )
    out["engine_start_s"] = time.perf_counter() - t0
    ids: list[int] = req["prompt_ids"]
    n_answer = int(req.get("answer_tokens", 32))
    one = SamplingParams(max_tokens=1, temperature=0)
    answer = SamplingParams(max_tokens=n_answer, temperature=0, ignore_eos=True)

    def gen(prompts: list[list[int]], sp: SamplingParams) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t, [list(r.outputs[0].token_ids) for r in res]

    def settle() -> None:
        """Wait until every offload the engine started has reached kvbm-codec."""
        for tier in live_tiers():
            tier.drain_jobs()
        # Resets the device prefix cache and the CPU tier; it first drains every secondary tier's
        # jobs (vLLM's stock OBJ tier included), so the prefix is then in kvbm-codec only.
        if not llm.reset_prefix_cache(reset_connector=True):
            raise RuntimeError("vLLM refused to reset its caches")

    out["ttft_recompute_s"], _ = gen([ids], one)
    out["answer_exact_s"], (ref,) = gen([ids], answer)
    if req.get("dump_primary"):  # the CPU tier's chunks as the engine wrote them (layout check)
        import torch

        for tier in live_tiers():
            tier.drain_jobs()
            torch.save(tier._primary.clone(), req["dump_primary"])
    settle()
    out["ttft_restored_s"], _ = gen([ids], one)
    out["answer_restored_s"], (got,) = gen([ids], answer)
    out["reference_answer"], out["restored_answer"] = ref, got
    agree = 0
    for a, b in zip(ref, got, strict=True):
        if a != b:
            break
        agree += 1
    out["greedy_prefix_agreement"] = agree / max(1, len(ref))
    out["greedy_position_agreement"] = sum(a == b for a, b in zip(ref, got, strict=True)) / max(1, len(ref))
    _, tf = gen([ids + ref[:i] for i in range(len(ref))], one)
    out["teacher_forced_top1"] = sum(t[0] == r for t, r in zip(tf, ref, strict=True)) / max(1, len(ref))
    if req.get("stream"):
        s = req["stream"]
        step = int(s.get("stride", 7))  # offsets off the 32-token grid: no two prompts share a chunk
        prompts = [ids[k * step : k * step + s["tokens"]] for k in range(s["requests"])]
        times = []
        for i in range(0, len(prompts), s.get("batch", 4)):
            dt, _ = gen(prompts[i : i + s.get("batch", 4)], SamplingParams(max_tokens=8, temperature=0))
            times.append(dt)
        out["stream_batch_s"] = times
    for tier in live_tiers():
        tier.drain_jobs()
        out["tier_counters"] = tier.counters.snapshot()
        out["tier_transport"] = tier.transport
    try:
        out["vllm_metrics"] = {
            m.name: getattr(m, "value", None)
            for m in llm.get_metrics()
            if "offload" in m.name or "kv_transfer" in m.name or "prefix_cache" in m.name
        }
    except Exception as e:  # metrics are a report, not the result
        out["vllm_metrics_error"] = f"{type(e).__name__}: {e}"
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
