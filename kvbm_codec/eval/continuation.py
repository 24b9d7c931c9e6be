"""Does a restored cache continue the conversation like the original? One comparison for every demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvbm_codec.eval.metrics import perplexity, top1_agreement
from kvbm_codec.kv import KVCache


@dataclass(frozen=True)
class ContinuationComparison:
    reference_answer: str
    restored_answer: str
    answer_token_match: float  # greedy answers, position by position
    top1_agreement: float  # teacher-forced on the reference answer
    ppl_reference: float
    ppl_restored: float


def compare_continuation(
    lm: Any, reference: KVCache, restored: KVCache, last: torch.Tensor, answer_tokens: int
) -> ContinuationComparison:
    """Greedy answers from both caches, then both teacher-forced on the reference answer: greedy
    agreement alone is brittle (one early divergence changes every later token)."""
    ref_answer = lm.generate(reference, last, answer_tokens)
    test_answer = lm.generate(restored, last, answer_tokens)
    match = sum(a == b for a, b in zip(ref_answer, test_answer, strict=False)) / max(1, len(ref_answer))
    forced = torch.tensor([[int(last[0, 0]), *ref_answer]])
    ref_logits = lm.logits_with_cache(reference, forced)
    test_logits = lm.logits_with_cache(restored, forced)
    targets = forced[0, 1:]
    return ContinuationComparison(
        reference_answer=lm.tokenizer.decode(ref_answer),
        restored_answer=lm.tokenizer.decode(test_answer),
        answer_token_match=match,
        top1_agreement=top1_agreement(ref_logits[:-1], test_logits[:-1]),
        ppl_reference=perplexity(ref_logits[:-1], targets),
        ppl_restored=perplexity(test_logits[:-1], targets),
    )


def describe(c: ContinuationComparison, restored_label: str) -> list[str]:
    return [
        "answer from the uncompressed cache: " + repr(c.reference_answer),
        f"answer from the {restored_label}:"
        + " " * max(1, 16 - len(restored_label))
        + repr(c.restored_answer),
        f"greedy answers agree on {c.answer_token_match:.0%} of tokens; teacher-forced on the reference "
        f"answer: top-1 agreement {c.top1_agreement:.1%}, perplexity {c.ppl_reference:.3f} -> "
        f"{c.ppl_restored:.3f}",
    ]
