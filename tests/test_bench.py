"""End to end: the quick bench suite on the real model (no mocks), then sanity of what it reports.

One run of the quick suite (~2-4 min on 2 cores) feeds every assertion; the result cache lives in a
temporary directory so the run is never satisfied from an earlier one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvbm_codec.bench import stats
from kvbm_codec.bench.attention import attention_stats
from kvbm_codec.bench.methods import build_method
from kvbm_codec.bench.report import matched_kvtc, summarize, write_report
from kvbm_codec.bench.runner import SUITES, Item, interleave, run_bench
from kvbm_codec.kv import KVCache


def _kv(tokens: int = 300) -> KVCache:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, tokens, 64, generator=g).half().float()
    v = torch.randn(2, 3, tokens, 64, generator=g).half().float()
    return KVCache(k, v, torch.arange(tokens))


@pytest.mark.parametrize("spec", ["fp16", "deflate", "zstd"])
def test_lossless_methods_round_trip_exactly(spec: str) -> None:
    kv = _kv()
    m = build_method(spec)
    c = m.compress(kv, None)  # type: ignore[arg-type]  (these methods use no context)
    back = m.restore(c)
    assert torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)


@pytest.mark.parametrize(("spec", "max_rel"), [("fp8", 0.1), ("kivi4", 0.2), ("kivi2", 0.6)])
def test_quantizers_are_close_and_smaller(spec: str, max_rel: float) -> None:
    kv = _kv(1024)  # KIVI keeps its last 128 tokens fp16: a short cache would be mostly residual
    m = build_method(spec)
    c = m.compress(kv, None)  # type: ignore[arg-type]
    back = m.restore(c)
    err = (back.keys - kv.keys).norm() / kv.keys.norm()
    assert float(err) < max_rel
    assert c.stored_bytes < kv.nbytes(2) / 1.9


def test_bad_method_specs_are_rejected() -> None:
    for spec in ("nope", "kvtc@1", "kvtc@16+kivi4", "tova@x"):
        with pytest.raises(ValueError):
            build_method(spec)


def test_chunked_attention_stats_match_the_dense_computation() -> None:
    """The chunked, causal-truncated statistics must equal the plain [H, T, T] softmax computation."""
    g = torch.Generator().manual_seed(1)
    t, window = 300, 64
    q = torch.randn(2, 6, t, 32, generator=g)
    kv = KVCache(
        torch.randn(2, 2, t, 32, generator=g), torch.randn(2, 2, t, 32, generator=g), torch.arange(t)
    )
    got = attention_stats(q, kv, window, chunk=64)
    idx = torch.arange(t)
    causal = idx[None, :] <= idx[:, None]
    band = causal & (idx[:, None] - idx[None, :] < window)
    acc, last, win = torch.zeros(t), torch.zeros(t), torch.zeros(t)
    for layer in range(2):
        s = q[layer] @ kv.keys[layer].repeat_interleave(3, dim=0).transpose(1, 2) / 32**0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        acc += a.sum(1).mean(0) / 2
        last += a[:, -1].mean(0) / 2
        win += (a * band).sum(1).mean(0) / 2
    assert torch.allclose(got.accumulated, acc, atol=1e-5)
    assert torch.allclose(got.last_query, last, atol=1e-6)
    assert torch.allclose(got.windowed, win, atol=1e-5)


def test_paired_statistics_separate_only_real_differences() -> None:
    # 40 prompts, a wins all 12 discordant ones: clearly separated; identical lists are not.
    a = [True] * 30 + [False] * 10
    b = [True] * 18 + [False] * 22
    d = stats.paired_prompts([float(x) for x in a], [float(x) for x in b], binary=True)
    assert d.mean == pytest.approx(0.3) and d.separated and d.p_value is not None and d.p_value < 0.001
    same = stats.paired_prompts([float(x) for x in a], [float(x) for x in a], binary=True)
    assert same.mean == 0 and not same.separated and same.p_value == 1.0
    assert stats.mcnemar_exact([True, False], [False, True]) == 1.0
    # Per-position: a constant 0.05 shift over 512 positions is separated, with an interval around it.
    x = [[float(i % 3 == 0) for i in range(256)] for _ in range(2)]
    y = [[v - 0.05 for v in w] for w in x]
    p = stats.paired_positions(x, y)
    assert p.n == 512 and p.lo <= 0.05 + 1e-9 and p.hi >= 0.05 - 1e-9 and p.separated
    with pytest.raises(ValueError):
        stats.paired_positions(x, [y[0]])


def test_baselines_are_matched_to_kvtc_by_ratio_only() -> None:
    summary = [
        {"method": "kvtc@8", "family": "kvtc", "ratio": 5.7},
        {"method": "kvtc@16", "family": "kvtc", "ratio": 8.6},
        {"method": "tova@4", "family": "eviction", "ratio": 3.9},
    ]
    assert matched_kvtc(summary, 3.9) == "kvtc@8"
    assert matched_kvtc(summary, 6.0) == "kvtc@16"
    assert matched_kvtc(summary, 20.0) == "kvtc@16"  # none compresses as much: the strongest one


def test_items_are_interleaved_across_measures() -> None:
    ids = torch.zeros(1, 1, dtype=torch.long)
    items = [Item(k, f"{k}{i}", ids, ids) for k in ("lm", "multikey", "vartrack") for i in range(2)]
    assert [i.kind for i in interleave(items)] == ["lm", "multikey", "vartrack"] * 2


def test_a_tasks_only_suite_needs_no_lm_text() -> None:
    """bench/accuracy_harness.py runs the default suite with lm_windows=0: no window is cut (and
    the text is not even tokenized); a suite that asks for windows still refuses a too-short text."""
    from dataclasses import replace

    from kvbm_codec.bench.runner import lm_items

    def tokenizer(text: str, **_: object) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, len(text.split()), dtype=torch.long)}

    assert lm_items(tokenizer, "", replace(SUITES["default"], lm_windows=0)) == []
    with pytest.raises(ValueError, match="one window needs"):
        lm_items(tokenizer, "too short", SUITES["default"])


def _bench_script(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass in the script resolves its annotations through it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def test_the_sweep_refuses_another_models_state_and_kv(smollm, tmp_path: Path) -> None:
    """bench/accuracy_sweep.py --model: a phase-1 state built with one model never calibrates
    another (it would fit another model's covariances), and cached validation KV is keyed by the
    model, so the same tokens under two models are two files."""
    sweep = _bench_script("accuracy_sweep")
    fp = smollm.info.fingerprint
    state = sweep.texts_only_state(smollm, 1, 1)
    assert state["fingerprint"] == fp
    sweep.check_state_model(state, fp, "smollm2-135m", tmp_path / "s.pt")
    sweep.check_state_model(state, fp, "/some/path/to/smollm2", tmp_path / "s.pt")  # a path to the same
    with pytest.raises(SystemExit, match="built with the model of fingerprint"):
        sweep.check_state_model(state, "0" * len(fp), "qwen2.5-coder-0.5b", tmp_path / "s.pt")
    del state["fingerprint"]  # a state from before --model: built with the default model
    sweep.check_state_model(state, fp, "smollm2-135m", tmp_path / "s.pt")
    with pytest.raises(SystemExit, match="records no model"):
        sweep.check_state_model(state, "0" * len(fp), "qwen2.5-coder-0.5b", tmp_path / "s.pt")
    ids = next(iter(sweep.texts_only_state(smollm, 1, 1)["domains"].values()))["val_ids"]
    one = sweep.val_cache_path(tmp_path, "code", ids, fp)
    assert one == sweep.val_cache_path(tmp_path, "code", ids.clone(), fp)
    assert one != sweep.val_cache_path(tmp_path, "code", ids, "f" * len(fp))
    assert one != sweep.val_cache_path(tmp_path, "code", ids[:, :-1], fp)


@pytest.fixture(scope="module")
def quick_run(smollm, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, Path], Path]:
    tmp = tmp_path_factory.mktemp("bench")
    result = run_bench(smollm, SUITES["quick"], cache_dir=tmp / "cache", progress=False)
    bench = result.as_dict()
    return bench, write_report(bench, tmp / "out"), tmp / "cache"


@pytest.mark.slow
def test_reused_rows_are_keyed_as_the_run_keys_them(quick_run, smollm, tmp_path: Path) -> None:
    """bench/accuracy_harness.py --reuse-rows: an earlier run's calibration-free rows land under the
    very keys the runner looks them up by (so a later run finds them), and no calibrated row is reused
    (its result depends on the calibration)."""
    harness = _bench_script("accuracy_harness")
    bench, paths, cache = quick_run
    free = [r for r in bench["results"] if not build_method(r["method"]).needs_calibration]
    assert harness.reuse_rows(smollm, SUITES["quick"], paths["json"], tmp_path) == len(free) > 0
    reused = {p.name for p in (tmp_path / "results").iterdir()}
    assert len(reused) == len(free) and reused <= {p.name for p in (cache / "results").iterdir()}
    assert harness.reuse_rows(smollm, SUITES["quick"], paths["json"], tmp_path) == 0  # cached rows stay


@pytest.mark.slow
def test_quick_suite_end_to_end(quick_run) -> None:
    bench, paths, _ = quick_run
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert set(data["methods"]) >= {"fp16", "kivi4", "kvtc@16", "tova@4", "kvtc@16+tova@4"}
    assert data["summary"] and all(r["method"] in data["methods"] for r in data["summary"])
    assert "| kvtc@16 |" in paths["markdown"].read_text()
    s = {row["method"]: row for row in summarize(bench)}
    fams = {row["family"] for row in s.values()}
    assert {
        "reference",
        "lossless",
        "quantization",
        "pca-incumbent",
        "eviction",
        "kvtc",
        "kvtc+eviction",
    } <= fams

    ref = s["fp16"]
    assert ref["ratio"] == pytest.approx(1.0)
    assert ref["top1"] == 1.0 and abs(ref["ppl_increase_pct"]) < 1e-9 and ref["kl"] < 1e-12
    # Solvable uncompressed (6 prompts only, so one miss is allowed beyond the 80 % design target), and
    # the one-pass scorer agrees with real greedy generation on the reference prompts.
    assert ref["task_acc"] >= 0.66
    fp16_rows = [r for r in bench["results"] if r["method"] == "fp16" and "correct" in r]
    assert fp16_rows and all(r["correct"] == r["generated_correct"] for r in fp16_rows)
    assert all(len(r["top1_hits"]) == len(r["nll"]) == 47 for r in bench["results"] if r["kind"] == "lm")
    comps = {(c["a"], c["b"]): c for c in data["comparisons"]}
    assert ("kvtc@16+tova@4", "tova@4") in comps and ("kvtc@16+tova@4", "kvtc@16") in comps
    assert any(b.startswith("kvtc@") for _, b in comps)
    for c in comps.values():
        assert 0.0 <= c["task_acc"]["p_value"] <= 1.0
        # One 47-position window is 2 bootstrap blocks: no interval may be claimed from it.
        assert math.isnan(c["top1"]["lo"]) and not c["top1"]["separated"]
    assert s["zstd"]["top1"] == 1.0 and 1.0 < s["zstd"]["ratio"] < 2.0
    assert 1.9 < s["fp8"]["ratio"] < 2.0
    assert s["kvtc@16"]["ratio"] > s["kivi4"]["ratio"] > s["fp8"]["ratio"]
    assert s["kvtc@64"]["ratio"] > s["kvtc@16"]["ratio"]
    # Stacking KVTC on eviction adds to eviction's saving (little at these short contexts: the raw
    # sinks and the window, rounded up to whole 32-token blocks as the block codec the service serves
    # keeps them, are most of what survives a 4x eviction of ~500-800 tokens; measured 1.15x).
    assert s["kvtc@16+tova@4"]["ratio"] > s["tova@4"]["ratio"] * 1.1
    for row in s.values():
        assert 0.0 <= row["top1"] <= 1.0 and row["ppl_increase_pct"] > -50
        assert row["encode_mbps_core"] > 0 and row["decode_mbps_core"] > 0
    # Eviction keeps fewer tokens, with their true positions, ending at the last context token.
    for r in bench["results"]:
        if r["family"] == "eviction":
            assert r["kept_tokens"] < r["context_tokens"]
    rvr = bench["restore_vs_recompute"]
    assert rvr and rvr[0]["context_tokens"] == 1024 and rvr[0]["restore_speedup"] > 0
    assert bench["cpu_s"] > 0 and set(bench["phases"]) >= {"shared_setup", "contexts", "restore_vs_recompute"}


@pytest.mark.slow
def test_rerun_is_served_from_the_cache(smollm, quick_run) -> None:
    """Re-running a subset recomputes nothing: no prefill, identical numbers."""
    bench, _, cache = quick_run
    again = run_bench(
        smollm, SUITES["quick"], methods=["fp16", "kivi4"], cache_dir=cache, progress=False, throughput=False
    ).as_dict()
    assert all(r["cached"] for r in again["results"])
    assert all("prefill_s" not in t for t in again["item_timings"])
    before = {(r["method"], r["item"]): r["ratio"] for r in bench["results"]}
    assert all(before[(r["method"], r["item"])] == r["ratio"] for r in again["results"])


@pytest.mark.slow
def test_cli_takes_a_model_path_and_any_text(smollm, tmp_path: Path) -> None:
    """`--model` as a folder path and `--text` as an arbitrary file, through the real command line."""
    from typer.testing import CliRunner

    from kvbm_codec.cli import app
    from kvbm_codec.models.registry import cache_root, resolve_model
    from kvbm_codec.texts import calibration_texts

    model_dir = cache_root() / resolve_model("smollm2-135m").name  # the fixture's de-quantized copy
    assert (model_dir / "config.json").is_file()
    body = " ".join(calibration_texts())[:20000]  # not the bundled GPL the suite would use by default
    text = tmp_path / "any.txt"
    text.write_text(body, encoding="utf-8")
    out = tmp_path / "out"
    args = ["bench", "--model", str(model_dir), "--text", str(text), "--suite", "quick", "--methods", "kivi4"]
    args += ["--no-throughput", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    assert data["methods"] == ["fp16", "kivi4"] and not data["restore_vs_recompute"]
    lm_rows = [r for r in data["results"] if r["kind"] == "lm"]
    assert lm_rows and all(r["context_tokens"] == SUITES["quick"].lm_context_tokens for r in lm_rows)
    # The window really came from the given text: its fp16 row matches a direct computation's key.
    from kvbm_codec.bench.runner import lm_items

    assert {r["item"] for r in lm_rows} == {i.key for i in lm_items(smollm.tokenizer, body, SUITES["quick"])}
    assert (out / "pareto.png").stat().st_size > 0
