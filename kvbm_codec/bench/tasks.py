"""Synthetic RULER-style retrieval tasks, sized for a 135M-parameter model and a 2-core CPU.

A single passkey is too easy: every method (even 64x) keeps it, so it separates nothing. These tasks put
several similar facts in the haystack and ask for one of them, so a method must keep the *right* tokens
precisely enough to tell near-identical needles apart:

- multikey: several "special magic number for <key>" needles spread through the text (RULER niah_multikey).
- kvlookup: one dense table of n_items "<key>: <number>" lines, one of them asked (RULER/"lost in the
  middle" key-value retrieval).
- vartrack: "VAR apple = 12345 ... VAR otter = VAR apple" among other numeric assignments; the variable
  otter copies is asked (RULER variable tracking: one chain, one hop, answered by name).

The haystack is the GNU GPL text shipped with the package (never used for calibration). The question and
the chat template's assistant header (plus a short answer prefix, as RULER uses) are the last tokens of
the prompt and stay inside the uncompressed tail every method keeps (asserted: <= TAIL_LIMIT tokens).
Instances are seeded, so every method sees the same prompts: accuracy is paired by prompt.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import torch

from kvbm_codec.texts import demo_document

TASKS = ("multikey", "kvlookup", "vartrack")
TAIL_LIMIT = 64  # must not exceed the eviction methods' protected tail (methods._eviction.TAIL)
KEYS = [
    "apple",
    "banana",
    "cherry",
    "falcon",
    "otter",
    "walrus",
    "tiger",
    "maple",
    "cedar",
    "willow",
    "copper",
    "silver",
    "cobalt",
    "amber",
    "violet",
    "harbor",
    "meadow",
    "canyon",
    "glacier",
    "desert",
    "lantern",
    "compass",
    "anchor",
    "rocket",
    "piano",
    "violin",
    "trumpet",
    "garnet",
]


@dataclass
class TaskInstance:
    task: str
    index: int
    prompt_ids: torch.Tensor  # [1, T] chat-templated prompt ending in the answer prefix
    answer: str
    tail_tokens: int  # tokens from the question's start to the end of the prompt
    answer_ids: torch.Tensor  # [1, n] the answer's tokens as they follow the prompt (" 12345")

    @property
    def key(self) -> str:
        return hashlib.sha256(self.prompt_ids.numpy().tobytes() + self.answer.encode()).hexdigest()[:16]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() + "." for s in text.split(". ") if len(s.strip()) > 20]


def _haystack(rng: random.Random, sentences: list[str], tokenizer: object, n_tokens: int) -> list[str]:
    start = rng.randrange(len(sentences))
    out: list[str] = []
    count = 0
    i = start
    while count < n_tokens:
        s = sentences[i % len(sentences)]
        out.append(s)
        count += len(tokenizer(s, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        i += 1
    return out


def _insert(rng: random.Random, hay: list[str], facts: list[str]) -> None:
    """Each fact at a random depth in [10%, 85%] of the haystack: never in the sinks or the recent tail."""
    for fact in facts:
        hay.insert(rng.randint(len(hay) // 10, (len(hay) * 85) // 100), fact)


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _build(task: str, rng: random.Random, hay: list[str], n_items: int) -> tuple[str, str, str]:
    """(question, answer prefix, answer); mutates hay to hold the facts."""
    if task == "multikey":
        keys = rng.sample(KEYS, n_items)
        nums = [_number(rng) for _ in keys]
        _insert(
            rng, hay, [f"The special magic number for {k} is {n}." for k, n in zip(keys, nums, strict=True)]
        )
        i = rng.randrange(len(keys))
        return (
            f"What is the special magic number for {keys[i]}?",
            f"The special magic number for {keys[i]} is",
            nums[i],
        )
    if task == "kvlookup":
        # One line per pair, answered after "<key>:": the 135M model copies from this table at 10/12 on
        # the sizing seed; the same pairs as prose ("the code for <key> is") scored 6/12, as ";"-joined
        # "<key>: <n>" with a prose answer prefix 3/12 (kvbm_codec.bench.tune_tasks, seed 1, fp16 only).
        keys = rng.sample(KEYS, n_items)
        nums = [_number(rng) for _ in keys]
        block = "Inventory codes:\n" + "\n".join(f"{k}: {n}" for k, n in zip(keys, nums, strict=True)) + "\n"
        _insert(rng, hay, [block])
        i = rng.randrange(len(keys))
        return f"In the inventory codes, what is the code for {keys[i]}?", f"{keys[i]}:", nums[i]
    if task == "vartrack":
        a, b, c, d = rng.sample(KEYS, 4)
        # Assignments precede the copy: two numeric assignments in the first half, the copy later, a
        # third assignment anywhere. Every "VAR <name> =" competes for the answer; only one is a copy.
        # Two copy chains (B = A, D = C) left the 135M model at 7/12, asking the value two hops away
        # near 0 (seed 1, fp16 only), so: one chain, one hop, answered by the variable's name (RULER
        # scores names too), with three distractor assignments.
        half = len(hay) // 2
        for f in (f"VAR {a} = {_number(rng)}.", f"VAR {c} = {_number(rng)}."):
            hay.insert(rng.randint(len(hay) // 10, half), f)
        hay.insert(rng.randint(half + 2, (len(hay) * 85) // 100), f"VAR {b} = VAR {a}.")
        hay.insert(rng.randint(len(hay) // 10, (len(hay) * 85) // 100), f"VAR {d} = {_number(rng)}.")
        return f"Which variable is VAR {b} set to?", f"VAR {b} = VAR", a
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_instances(
    tokenizer: object, task: str, count: int, context_tokens: int, n_items: int = 4, seed: int = 0
) -> list[TaskInstance]:
    sentences = _sentences(demo_document())
    out = []
    for index in range(count):
        rng = random.Random(f"{task}-{index}-{context_tokens}-{n_items}-{seed}")
        hay = _haystack(rng, sentences, tokenizer, context_tokens)
        question, prefix, answer = _build(task, rng, hay, n_items)
        user = (
            "Read the text and answer the question at the end.\n\n"
            + " ".join(hay)
            + f"\n\nQuestion: {question}"
        )
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
        ids = tokenizer(text + prefix, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        tail_text = f"Question: {question}"
        before = tokenizer(text[: text.rindex(tail_text)], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        tail = len(ids) - len(before)
        if tail > TAIL_LIMIT:
            raise ValueError(f"{task}: question + template tail is {tail} tokens, over {TAIL_LIMIT}")
        full = tokenizer(text + prefix + " " + answer, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if full[: len(ids)] != ids or len(full) == len(ids):
            raise ValueError(
                f"{task}: the answer {answer!r} does not tokenize as a continuation of the prompt"
            )
        answer_ids = torch.tensor([full[len(ids) :]])
        out.append(TaskInstance(task, index, torch.tensor([ids]), answer, tail, answer_ids))
    return out


def score(tokenizer: object, generated: list[int], answer: str) -> bool:
    text = tokenizer.decode(generated, skip_special_tokens=True)  # type: ignore[attr-defined]
    return answer in text
