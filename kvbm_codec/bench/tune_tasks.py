"""Size the retrieval tasks with the UNCOMPRESSED model only (never a compressed method's score).

Prompts are drawn with a different seed (1) from the ones the bench reports (seed 0), so the chosen
(length, items) is not fitted to the reported prompts either. Prints fp16 accuracy per setting, with the
one-pass scorer and with real greedy generation side by side.

    .venv/bin/python -m kvbm_codec.bench.tune_tasks --lengths 1400 --items 4 --prompts 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvbm_codec.bench.runner import Item, _prefill, _task_scores
from kvbm_codec.bench.tasks import TASKS, make_instances, score
from kvbm_codec.models.hf import CausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1400")
    ap.add_argument("--items", default="4")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lm = CausalLM.load()
    rows = []
    for task in a.tasks.split(","):
        for length in map(int, a.lengths.split(",")):
            for n_items in map(int, a.items.split(",")):
                t0 = time.perf_counter()
                insts = make_instances(lm.tokenizer, task, a.prompts, length, n_items=n_items, seed=a.seed)
                one_pass, gen_ok = [], []
                for inst in insts:
                    ids = inst.prompt_ids
                    item = Item(task, inst.key, ids[:, :-1], ids[:, -1:], inst.answer, inst.answer_ids)
                    kv, _ = _prefill(lm, item.context_ids, False)
                    one_pass.append(_task_scores(lm, kv, item)["correct"])
                    gen = lm.generate(kv, item.next_ids, 8)
                    gen_ok.append(score(lm.tokenizer, gen, inst.answer))
                row = {
                    "task": task,
                    "context_tokens": length,
                    "n_items": n_items,
                    "prompts": a.prompts,
                    "seed": a.seed,
                    "fp16_acc_one_pass": sum(one_pass) / len(one_pass),
                    "fp16_acc_generate": sum(gen_ok) / len(gen_ok),
                    "prompt_tokens": int(torch.tensor([i.prompt_ids.shape[1] for i in insts]).float().mean()),
                    "s": round(time.perf_counter() - t0, 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
