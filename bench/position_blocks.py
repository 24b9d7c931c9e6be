"""Real KVBM blocks at their true positions, from long prefills of several texts, for the position
search's checks (``position_search_ab.py``, ``position_search_select.py``).

A block's first position is only known on the gRPC path; here a span of each text is prefilled once
with RoPE positions starting at ``first`` (a context whose first token sits at that position: large
positions without prefilling everything before them, which on the shared 2 cores costs about an hour
at 8192 tokens), cut into 32-token blocks, and kept in fp16 as the engine holds them, with the true
first position of each. Cached under ``--cache``.

Texts by role (docs/benchmarks.md): the Apache licence and The Tempest are validation texts (the
search's knobs are chosen on them), the GPL v3 (the demo text) and Hamlet are evaluation texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_DIR = Path("/tmp/kvbm-codec-texts")  # bench/fetch_texts.sh
APACHE = Path("/usr/share/common-licenses/Apache-2.0")
# (text, first token, tokens, first position): small and large positions of every text
VALIDATION = (
    ("apache", 0, 2176, 0),
    ("tempest", 0, 1024, 0),
    ("tempest", 2048, 1024, 6144),
    ("apache", 0, 1024, 3072),
)
EVALUATION = (
    ("gpl", 0, 1024, 0),
    ("gpl", 1024, 1024, 7168),
    ("hamlet", 0, 1024, 0),
    ("hamlet", 4096, 1024, 4096),
)


def spans(which: str) -> tuple[tuple[str, int, int, int], ...]:
    """``validation``, ``evaluation`` or a comma list of name:skip:tokens:first."""
    if which in ("validation", "evaluation"):
        return VALIDATION if which == "validation" else EVALUATION
    out = []
    for item in which.split(","):
        nm, skip, tokens, first = item.split(":")
        out.append((nm, int(skip), int(tokens), int(first)))
    return tuple(out)


@dataclass
class TextBlocks:
    name: str
    blocks: torch.Tensor  # [n, L, 2, P, H*D] fp16, the service's block layout
    first: torch.Tensor  # [n] true first positions


def text(name: str) -> str:
    from kvbm_codec.texts import demo_document

    if name == "gpl":
        return demo_document()
    if name == "apache":
        return APACHE.read_text()
    return (TEXT_DIR / f"{name}.txt").read_text(encoding="utf-8", errors="replace")


def text_blocks(
    lm: Any,
    spec: Any,
    name: str,
    tokens: int = 1024,
    cache: Path | None = None,
    skip: int = 0,
    first: int = 0,
) -> TextBlocks:
    """``tokens`` tokens of text ``name`` from its token ``skip`` (fewer if it is shorter), prefilled at
    positions from ``first``, as blocks of ``spec``."""
    from transformers import DynamicCache

    from kvbm_codec.api.blocks import kv_to_block
    from kvbm_codec.models.hf import DEFAULT_CHUNK, kv_from_dynamic_cache

    path = None if cache is None else cache / f"{name}_{skip}_{tokens}_at{first}_{spec.page_size}.pt"
    if path is not None and path.is_file():
        d = torch.load(path)
        return TextBlocks(name, d["blocks"], d["first"])
    ids = lm.encode(text(name))[:, skip : skip + tokens]
    n = ids.shape[1] // spec.page_size
    ids = ids[:, : n * spec.page_size]
    dc = DynamicCache()
    with torch.inference_mode():
        lm._run(ids, dc, first, DEFAULT_CHUNK, False)  # the prefill, positions from `first`
    kv = kv_from_dynamic_cache(dc, torch.arange(first, first + ids.shape[1])).to(torch.float16)
    blocks = torch.stack(
        [kv_to_block(kv.select_tokens(torch.arange(b * spec.page_size, (b + 1) * spec.page_size)), spec)
         for b in range(n)]
    ).contiguous()  # fmt: skip
    firsts = first + torch.arange(n, dtype=torch.int64) * spec.page_size
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"blocks": blocks, "first": firsts}, path)
    return TextBlocks(name, blocks, firsts)


def keys_of(spec: Any, blocks: torch.Tensor, part: int = 0) -> torch.Tensor:
    """[n, L, 2, P, H*D] blocks -> float32 keys (part 0) or values (1) [n, L, P, H, D]."""
    n = blocks.shape[0]
    return blocks.reshape(n, spec.n_layers, 2, spec.page_size, spec.n_kv_heads, spec.head_dim)[
        :, :, part
    ].float()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="prefill and cache the texts' blocks")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kvbm-codec-position-blocks"))
    ap.add_argument("which", nargs="*", default=["validation", "evaluation"])
    a = ap.parse_args()
    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.models.hf import CausalLM

    lm = CausalLM.load()
    i = lm.info
    spec = BlockSpec(i.n_layers, 32, i.n_kv_heads, i.key_head_dim)
    for w in a.which:
        for nm, skip, tokens, first in spans(w):
            tb = text_blocks(lm, spec, nm, tokens, a.cache, skip, first)
            print(nm, skip, first, tuple(tb.blocks.shape), int(tb.first[-1]), flush=True)
