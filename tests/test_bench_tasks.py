"""The retrieval prompts: every method must see the same, well-formed prompts.

Accuracy is paired by prompt, so prompts must be reproducible from (task, index, size, seed), and a
prompt must be answerable only from the compressed part of the context: the fact sits inside the
haystack (never in the sinks or the uncompressed tail), the question fits in the protected tail, and
the answer is not given away by the tail itself.
"""

from __future__ import annotations

import re

import pytest
import torch

from kvbm_codec.bench.tasks import TAIL_LIMIT, TASKS, make_instances
from kvbm_codec.models.hf import CausalLM

SINKS = 4


@pytest.mark.parametrize("task", TASKS)
def test_prompts_are_reproducible_and_answerable_only_from_the_context(smollm: CausalLM, task: str) -> None:
    tok = smollm.tokenizer
    a = make_instances(tok, task, 6, 600, n_items=4, seed=0)
    b = make_instances(tok, task, 6, 600, n_items=4, seed=0)
    other_seed = make_instances(tok, task, 6, 600, n_items=4, seed=1)
    assert [i.key for i in a] == [i.key for i in b]
    assert all(torch.equal(x.prompt_ids, y.prompt_ids) for x, y in zip(a, b, strict=True))
    assert {i.key for i in a}.isdisjoint({i.key for i in other_seed})
    # A larger run extends a smaller one: the first prompts are the same, so cached rows are reused.
    assert [i.key for i in make_instances(tok, task, 3, 600, n_items=4, seed=0)] == [i.key for i in a[:3]]

    for inst in a:
        ids = inst.prompt_ids[0].tolist()
        assert 0 < inst.tail_tokens <= TAIL_LIMIT
        context = tok.decode(ids[SINKS : len(ids) - inst.tail_tokens])
        tail = tok.decode(ids[len(ids) - inst.tail_tokens :])
        assert inst.answer in context, "the fact must be in the compressed part of the prompt"
        assert not re.search(rf"\b{re.escape(inst.answer)}\b", tail), "the tail must not give the answer"
        assert tok.decode(inst.answer_ids[0].tolist()).strip() == inst.answer


def test_each_task_has_distractors_of_the_answer_kind(smollm: CausalLM) -> None:
    """One needle alone is too easy to separate methods (a prototype kept a single passkey at 64x):
    every task must offer wrong answers of the same form as the right one."""
    tok = smollm.tokenizer
    for task in TASKS:
        for inst in make_instances(tok, task, 4, 600, n_items=4, seed=0):
            text = tok.decode(inst.prompt_ids[0].tolist())
            if task == "vartrack":
                assigned = set(re.findall(r"VAR (\w+) = \d{5}\.", text))
                assert inst.answer in assigned and len(assigned) >= 3
                assert len(re.findall(r"VAR \w+ = VAR \w+\.", text)) == 1
            else:
                numbers = set(re.findall(r"\b\d{5}\b", text))
                assert inst.answer in numbers and len(numbers) >= 4
