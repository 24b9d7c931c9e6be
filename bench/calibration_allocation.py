"""The bit-allocation phase of calibration alone, before vs after, side by side: a stored
calibration's own error tables and held-out mix (the held-out sequence of every corpus domain,
prefilled here, KV cached on disk), every context and block allocation re-derived by ``--base``'s
``allocate_for_ratio`` run serially (the phase before) and by this tree's ``all_allocations`` (the
phase now), rounds alternated so load drift hits both alike. Each run must give the stored
calibration's allocation ids exactly; printed per run: seconds, real encodes, ids equal.
``--workers N`` runs "after" on N bisection workers instead of ``ALLOCATION_WORKERS``; with
``--base HEAD`` that compares this tree's serial phase against its threaded one.

    python bench/calibration_allocation.py --calibration CAL.safetensors --base main --rounds 2 \\
        --out bench/results/calibration_allocation.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from kvbm_codec.calibration import calibrate as C
from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.calibration.cache import corpus_texts, fit_plan, given_or_default
from kvbm_codec.codec import allocation as A
from kvbm_codec.codec.params import Calibration
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM


def load_base(rev: str, into: Path) -> ModuleType:
    """``codec/allocation.py`` of ``rev`` as its own module, building this tree's Allocation objects
    (so the codec accepts them)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:kvbm_codec/codec/allocation.py"], check=True, capture_output=True, text=True
    ).stdout
    path = into / "base_allocation.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("base_allocation", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["base_allocation"] = mod
    spec.loader.exec_module(mod)
    mod.Allocation = A.Allocation  # type: ignore[attr-defined]
    return mod


def held_out_mix(lm: CausalLM, cal_path: Path | None, cache: Path) -> tuple[Calibration, KVCache]:
    cal = load_calibration(cal_path) if cal_path is not None else given_or_default(lm, None)
    if cal.model_fingerprint != lm.info.fingerprint:
        raise SystemExit("the calibration is another model's")
    texts, _ = corpus_texts(lm.tokenizer, "broad")
    assert isinstance(texts, dict)
    seq_len = int(cal.provenance["seq_len"])
    plan = fit_plan("broad", cal.provenance["fit_tokens"] // seq_len)
    assert isinstance(plan, dict)
    seqs = [C.token_sequences(lm.tokenizer, t, seq_len, plan[d] + 1)[plan[d]] for d, t in texts.items()]
    tag = hash(tuple(tuple(s[0].tolist()) for s in seqs)) & 0xFFFFFFFF
    key = cache / f"{lm.info.fingerprint}-{tag:08x}.pt"
    if key.exists():
        kvs = [KVCache(**d) for d in torch.load(key)]
    else:
        kvs = list(C.calibration_kv(lm, seqs, progress=False))
        cache.mkdir(parents=True, exist_ok=True)
        torch.save([{"keys": k.keys, "values": k.values, "positions": k.positions} for k in kvs], key)
    return cal, C.mixed_held_out(kvs, cal.config, seq_len)


def derive(
    cal: Calibration,
    held: KVCache,
    targets: list[float],
    pages: tuple[int, ...],
    base: ModuleType | None,
    workers: int = C.ALLOCATION_WORKERS,
) -> dict:
    saved, encodes = cal.allocations, [0]
    cal.allocations = {}
    measures = (C.RatioProbe.measure, C.BlockRatioProbe.measure)
    search = C.allocate_for_ratio

    def counted(fn):  # type: ignore[no-untyped-def]
        def measure(self, alloc):  # type: ignore[no-untyped-def]
            encodes[0] += 1
            return fn(self, alloc)

        return measure

    C.RatioProbe.measure, C.BlockRatioProbe.measure = (counted(f) for f in measures)  # type: ignore[method-assign]
    if base is not None:
        C.allocate_for_ratio = base.allocate_for_ratio
    try:
        t0 = time.perf_counter()
        C.all_allocations(cal, held, targets, pages, workers=1 if base is not None else workers)
        seconds = time.perf_counter() - t0
    finally:
        C.RatioProbe.measure, C.BlockRatioProbe.measure = measures  # type: ignore[method-assign]
        C.allocate_for_ratio = search
    ids = {n: a.allocation_id for n, a in cal.allocations.items()}
    cal.allocations = saved
    stored = {n: a.allocation_id for n, a in saved.items()}
    return {
        "seconds": round(seconds, 2),
        "encodes": encodes[0],
        "ids_equal_stored": ids == stored,
        "differ": sorted(n for n in stored if ids.get(n) != stored[n]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, default=None, help="default: the default recipe's")
    ap.add_argument("--base", default="main", help="git revision whose allocation.py is 'before'")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kvbm-codec-bench-allocation")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=C.ALLOCATION_WORKERS, help="bisection workers of 'after'")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lm = CausalLM.load()
    cal, held = held_out_mix(lm, a.calibration, a.cache)
    targets = sorted({float(al.meta["target_cr"]) for n, al in cal.allocations.items() if "@" not in n})
    pages = tuple(
        sorted({int(al.meta["page_tokens"]) for al in cal.allocations.values() if "page_tokens" in al.meta})
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(a.base, Path(tmp))
        for r in range(a.rounds):
            for variant in ("before", "after") if r % 2 == 0 else ("after", "before"):
                row = {
                    "round": r,
                    "variant": variant,
                    **derive(cal, held, targets, pages, base if variant == "before" else None, a.workers),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out is not None:
        report = {
            "calibration": cal.calibration_id,
            "base": a.base,
            "workers": a.workers,
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
