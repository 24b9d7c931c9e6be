"""The README's main job: start the service with its embedded defaults, then offload a real conversation's
KV cache to it as KVBM blocks, drop it, onboard it back (gRPC bytes path and NIXL path) and continue the
conversation from the restored cache, against the uncompressed run.

The service runs as a separate process (`kvbm-codec serve`), exactly as an operator starts it, and is
stopped with SIGTERM at the end (it drains and exits 0). Everything talks over 127.0.0.1.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvbm_codec.adapters.kvbm import KvbmTierClient, concat_tokens, kv_to_kvbm, kvbm_to_kv
from kvbm_codec.eval.continuation import compare_continuation, describe
from kvbm_codec.server.process import ServiceProcess
from kvbm_codec.texts import demo_conversation


def run_service_demo(
    lm: Any,
    target_cr: float = 20.0,
    answer_tokens: int = 48,
    say: Callable[[str], None] = print,
    calibration_id: str | None = None,
) -> dict[str, Any]:
    """``calibration_id``: a calibration of ``lm`` in the local registry (the one this process just
    loaded or computed). The service is then pointed at it by registry, fingerprint and id, an
    operator's configuration that starts without loading the model a second time (~6 s of a ~10 s
    start on 2 cores); without it the service resolves the default calibration itself."""
    from kvbm_codec.frontends.grpc.client import CodecClient

    prompt = demo_conversation(lm.tokenizer)
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    context, last = ids[:, :-1], ids[:, -1:]
    say(f"conversation: {ids.shape[1]} tokens (a user shares the GPL v3 and asks about it)")

    logdir = Path(tempfile.mkdtemp(prefix="kvbm-codec-demo-"))
    models = None
    if calibration_id is not None:
        from kvbm_codec.calibration.registry import default_root

        models = [
            {
                "name": lm.info.name,
                "target_cr": target_cr,
                "registry": str(default_root()),
                "fingerprint": lm.info.fingerprint,
                "calibration": calibration_id,
            }
        ]
    svc = ServiceProcess(target_cr, logdir / "serve.log", model=lm.info.name, models=models)
    client = CodecClient(svc.target, timeout_s=120.0)
    try:
        say(f"starting `kvbm-codec serve` on {svc.target} (metrics :{svc.metrics_port}, log {svc.log_path})")
        up_s = svc.wait_healthy(client)
        spec = client.spec()
        say(f"service SERVING after {up_s:.1f} s; block = {spec.shape} {spec.dtype} ({spec.nbytes} B)")

        t0 = time.perf_counter()
        kv, _ = lm.prefill(context, return_logits=False)
        prefill_s = time.perf_counter() - t0
        say(f"prefill (what a cache miss costs): {prefill_s:.2f} s")

        blocks, tail = kv_to_kvbm(kv, context[0], spec)
        tier = KvbmTierClient(client, spec)
        t0 = time.perf_counter()
        report = tier.offload(blocks, context_tokens=kv.n_tokens)
        offload_s = time.perf_counter() - t0
        tail_n = 0 if tail is None else tail.n_tokens
        say(
            f"offloaded {blocks.n_blocks} KVBM blocks ({report.compressed} KVTC-compressed, {report.exact} "
            f"in the recent window kept exact; {tail_n}-token partial block stays on the GPU): "
            f"{report.raw_bytes / 1e6:.1f} MB -> {report.stored_bytes / 1e6:.2f} MB = {report.ratio:.1f}x "
            f"in {offload_s:.2f} s"
        )
        hashes, firsts = list(blocks.sequence_hashes), list(blocks.first_positions)
        del blocks  # dropped from "GPU": from here on the KV exists only in the service

        # Restores land in memory the "engine" already holds, as an engine's KV pages: a NIXL WRITE
        # needs it registered anyway, and the gRPC path copies each block once, into it.
        pages = torch.zeros((len(hashes), *spec.shape), dtype=spec.torch_dtype)
        t0 = time.perf_counter()
        onboarded = tier.onboard(hashes, firsts, out=pages)
        onboard_s = time.perf_counter() - t0
        if not onboarded.complete:
            raise RuntimeError(f"{len(onboarded.misses)} blocks missing after offload")
        say(f"onboard over gRPC: {onboarded.blocks.n_blocks} blocks in {onboard_s:.2f} s")

        # The same blocks over NIXL: the service WRITEs them straight into our registered buffer.
        agent = client.nixl_agent()
        dest = torch.zeros((len(hashes), *spec.shape), dtype=spec.torch_dtype)
        with agent.register(dest) as reg:
            t0 = time.perf_counter()
            got = client.get_blocks_nixl(reg, hashes, [i * spec.nbytes for i in range(len(hashes))])
            nixl_s = time.perf_counter() - t0
        same = all(r.status == "hit" for r in got) and torch.equal(dest, onboarded.blocks.canonical())
        say(f"onboard over NIXL: {len(got)} blocks in {nixl_s:.2f} s, bit-identical to the gRPC path: {same}")
        if not same:
            raise RuntimeError("NIXL and gRPC onboard disagree")

        restored = kvbm_to_kv(onboarded.blocks)
        if tail is not None:
            restored = concat_tokens(restored, tail)
        restored = restored.to(torch.float32)
        say(
            f"restore (onboard + decode) is {prefill_s / onboard_s:.1f}x (gRPC) / {prefill_s / nixl_s:.1f}x "
            f"(NIXL) faster than recomputing the prefill on this CPU"
        )

        c = compare_continuation(lm, kv, restored, last, answer_tokens)
        for line in describe(c, "onboarded cache"):
            say(line)
        m = svc.metrics()
        say(
            f"service metrics: {m.get('kvbm_codec_blocks_put_total', 0):.0f} blocks put, "
            f"{m.get('kvbm_codec_block_lookups_total', 0):.0f} lookups, "
            f"{m.get('kvbm_codec_transfer_bytes_total', 0) / 1e6:.1f} MB moved (gRPC + NIXL)"
        )
    finally:
        client.close()
        code = svc.stop()
    say(f"service stopped with SIGTERM: exit code {code} (0 = drained cleanly)")
    return {
        "context_tokens": int(kv.n_tokens),
        "blocks": len(hashes),
        "target_cr": target_cr,
        "stored_ratio": report.ratio,
        "prefill_s": prefill_s,
        "offload_s": offload_s,
        "onboard_grpc_s": onboard_s,
        "onboard_nixl_s": nixl_s,
        "restore_speedup_grpc": prefill_s / onboard_s,
        "restore_speedup_nixl": prefill_s / nixl_s,
        "answer_token_match": c.answer_token_match,
        "top1_agreement": c.top1_agreement,
        "ppl_baseline": c.ppl_reference,
        "ppl_codec": c.ppl_restored,
        "service_exit_code": code,
    }
