"""The README's main job: a long real conversation's KV cache compressed, restored, continued."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvbm_codec.codec.params import Calibration
from kvbm_codec.eval.continuation import compare_continuation, describe
from kvbm_codec.eval.run import round_trip
from kvbm_codec.texts import demo_conversation


def run_demo(
    lm: Any, cal: Calibration, target_cr: float, answer_tokens: int = 48, say: Callable[[str], None] = print
) -> dict[str, Any]:
    prompt = demo_conversation(lm.tokenizer)
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    say(f"conversation: {ids.shape[1]} tokens (a user shares the GPL v3 and asks about it)")

    t0 = time.perf_counter()
    kv, _ = lm.prefill(ids[:, :-1], return_logits=False)
    prefill_s = time.perf_counter() - t0
    say(f"prefill (recompute) of the context: {prefill_s:.2f} s")

    rt = round_trip(cal, target_cr, kv)
    stats, restored, encode_s, restore_s = rt.stats, rt.restored, rt.encode_s, rt.restore_s
    cr = stats.achieved_cr
    say(
        f"KVTC target {target_cr:g}x: frame {stats.frame_bytes / 1e6:.2f} MB for "
        f"{stats.fp16_bytes / 1e6:.1f} MB of "
        f"fp16 KV -> {cr:.1f}x on compressed tokens, {stats.achieved_cr_total:.1f}x overall "
        f"(sinks {cal.config.sink_tokens} + window {cal.config.window_tokens} kept fp16)"
    )
    say(
        f"encode {encode_s:.2f} s, restore {restore_s:.2f} s -> restore is "
        f"{prefill_s / restore_s:.1f}x faster than recomputing the prefill"
    )

    last = ids[:, -1:]
    c = compare_continuation(lm, kv, restored.to(torch.float32), last, answer_tokens)
    for line in describe(c, "restored cache"):
        say(line)
    return {
        "context_tokens": int(kv.n_tokens),
        "target_cr": target_cr,
        "achieved_cr": cr,
        "achieved_cr_total": stats.achieved_cr_total,
        "encode_s": encode_s,
        "restore_s": restore_s,
        "prefill_s": prefill_s,
        "restore_speedup": prefill_s / restore_s,
        "answer_token_match": c.answer_token_match,
        "top1_agreement": c.top1_agreement,
        "ppl_baseline": c.ppl_reference,
        "ppl_codec": c.ppl_restored,
    }
