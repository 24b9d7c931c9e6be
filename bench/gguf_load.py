"""The GGUF -> float32 conversion of a registered model, before vs after, side by side: transformers'
own load (the file parsed for config, weights and tokenizer, the tensor-name map rebuilt per module)
against ``models/hf.py``'s, which parses once and builds the map once. Rounds alternate the two; every
weight and the vocabulary must be equal. Nothing is written (the converted-model cache is not used).

    python bench/gguf_load.py --rounds 2 --out bench/results/gguf_load.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from kvbm_codec.models import hf
from kvbm_codec.models.registry import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    src = resolve_model(a.model)
    assert src.gguf_file is not None, "not a GGUF model"
    parse_once = hf._gguf_parsed_once
    rows, first = [], {}
    for r in range(a.rounds):
        for variant in ("before", "after") if r % 2 == 0 else ("after", "before"):
            if variant == "before":
                hf._gguf_parsed_once = contextlib.nullcontext  # type: ignore[assignment]
            t0 = time.perf_counter()
            try:
                model, tok = hf._load_pretrained(src.directory, src.gguf_file)
            finally:
                hf._gguf_parsed_once = parse_once
            seconds = time.perf_counter() - t0
            state = model.state_dict()
            if not first:
                first = {"state": state, "vocab": tok.get_vocab()}
            same = state.keys() == first["state"].keys() and all(
                torch.equal(state[k], first["state"][k]) for k in state
            )
            row = {
                "round": r,
                "variant": variant,
                "seconds": round(seconds, 2),
                "weights_and_vocab_equal_first_load": same and tok.get_vocab() == first["vocab"],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out is not None:
        a.out.write_text(json.dumps({"model": a.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
