"""One run: load the model once, build each context's KV once, run every method on that same KV.

Per (method, context) results are cached as JSON under the cache dir, keyed by the method's name and
parameters, the context's token hash, the model fingerprint and (for calibrated methods) the calibration
id, so adding or re-running one method recomputes only that method.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbm_codec.bench.attention import QueryCapture, attention_stats
from kvbm_codec.bench.base import BenchContext, KVMethod, timed
from kvbm_codec.bench.methods import build_method
from kvbm_codec.bench.methods.pca_int import fit_post_rope_bases, load_bases, save_bases
from kvbm_codec.bench.tasks import TASKS, make_instances, score
from kvbm_codec.calibration.artifact import load_calibration, save_calibration
from kvbm_codec.codec.params import Calibration
from kvbm_codec.eval.metrics import kl_divergence_mean, top1_agreement
from kvbm_codec.kv import KVCache
from kvbm_codec.texts import demo_document

CACHE_VERSION = "bench-v2"
DMS_WINDOW = 64  # queries a token is judged by before leaving the delayed-eviction window

QUICK_METHODS = "fp16,zstd,fp8,kivi4,pca-int8@16,streaming@4,tova@4,kvtc@16,kvtc@64,kvtc@16+tova@4"
DEFAULT_METHODS = (
    "fp16,deflate,zstd,fp8,kivi4,kivi2,pca-int8@8,pca-int8@16,pca-int4@16,"
    "streaming@4,streaming@8,h2o@4,h2o@8,tova@4,tova@8,dms@4,dms@8,"
    "kvtc@4,kvtc@8,kvtc@16,kvtc@20,kvtc@32,kvtc@64,kvtc@16+tova@4,kvtc@16+dms@4"
)


@dataclass(frozen=True)
class Suite:
    """Sizes of one run. `quick` must finish in < 5 min on 2 cores, `default` in < 30 min; `large` is
    on demand."""

    name: str
    methods: str
    lm_windows: int  # (context, continuation) windows cut from the text for ppl / top-1
    lm_context_tokens: int
    lm_continuation_tokens: int
    tasks: tuple[str, ...]
    task_instances: int  # per task
    task_context_tokens: int
    task_items: int  # needles / pairs scale (see tasks.py)
    max_new_tokens: int
    throughput_contexts: tuple[int, ...]
    # KVTC calibration: "default" = the same cached calibration `kvbm-codec eval` uses (16 x 1024 tokens,
    # ~5-13 min to compute once); "small" = 4 x 512 tokens, only the suite's targets (fast, for CI).
    calibration: str
    pca_fit_sequences: int
    pca_seq_len: int
    task_seed: int = 0  # reported prompts; bench/tune_tasks.py sizes the tasks on seed 1 (fp16 only)


SUITES = {
    "quick": Suite(
        name="quick",
        methods=QUICK_METHODS,
        lm_windows=1,
        lm_context_tokens=768,
        lm_continuation_tokens=48,
        tasks=TASKS,
        task_instances=2,
        task_context_tokens=500,
        task_items=4,
        max_new_tokens=6,
        throughput_contexts=(1024,),
        calibration="small",
        pca_fit_sequences=4,
        pca_seq_len=512,
    ),
    "default": Suite(
        name="default",
        methods=DEFAULT_METHODS,
        lm_windows=4,
        lm_context_tokens=2048,
        lm_continuation_tokens=256,
        tasks=TASKS,
        task_instances=12,
        task_context_tokens=1400,
        task_items=4,
        max_new_tokens=8,
        throughput_contexts=(2048, 8192),
        calibration="default",
        pca_fit_sequences=16,
        pca_seq_len=1024,
    ),
}


# On demand, hours on 2 cores (measured per-context costs in docs/bench-harness.md): the resolution the
# default suite cannot reach. 24 windows need a longer --text than the bundled GPL (which holds 3).
SUITES["large"] = replace(SUITES["default"], name="large", lm_windows=24, task_instances=64)


@dataclass
class Item:
    """One context every method is run on: an LM window (ppl/top-1) or a retrieval prompt."""

    kind: str  # "lm" or a task name
    key: str
    context_ids: torch.Tensor  # [1, T]: the KV that gets compressed
    next_ids: torch.Tensor  # lm: teacher-forced continuation; task: the prompt's last token, fed live
    answer: str | None = None
    answer_ids: torch.Tensor | None = None  # [1, n] the answer's tokens right after the prompt


def _ids_key(*parts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes())
    return h.hexdigest()[:16]


def lm_items(tokenizer: Any, text: str, suite: Suite) -> list[Item]:
    if suite.lm_windows == 0:  # a tasks-only suite (bench/accuracy_harness.py)
        return []
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    span = suite.lm_context_tokens + suite.lm_continuation_tokens
    n = min(suite.lm_windows, int(ids.shape[1]) // span)
    if n == 0:
        raise ValueError(f"text has {ids.shape[1]} tokens, one window needs {span}")
    out = []
    for i in range(n):
        ctx = ids[:, i * span : i * span + suite.lm_context_tokens]
        cont = ids[:, i * span + suite.lm_context_tokens : (i + 1) * span]
        out.append(Item("lm", _ids_key(ctx, cont), ctx, cont))
    return out


def task_items(tokenizer: Any, suite: Suite) -> list[Item]:
    out = []
    for task in suite.tasks:
        for inst in make_instances(
            tokenizer,
            task,
            suite.task_instances,
            suite.task_context_tokens,
            n_items=suite.task_items,
            seed=suite.task_seed,
        ):
            ids = inst.prompt_ids
            out.append(Item(task, inst.key, ids[:, :-1], ids[:, -1:], inst.answer, inst.answer_ids))
    return out


def interleave(*groups: list[Item]) -> list[Item]:
    """Round-robin over LM windows and each task's prompts, so a run stopped early (or watched while it
    runs) has covered every accuracy measure about evenly; results are cached per item either way."""
    by_kind: dict[str, list[Item]] = {}
    for it in (i for g in groups for i in g):
        by_kind.setdefault(it.kind, []).append(it)
    out: list[Item] = []
    queues = list(by_kind.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


class Resources:
    """Per-run shared state, built only if a method that needs it actually runs."""

    def __init__(
        self,
        lm: Any,
        suite: Suite,
        methods: list[KVMethod],
        cache_dir: Path,
        calibration: Calibration | None,
        progress: bool,
    ) -> None:
        self.lm, self.suite, self.methods = lm, suite, methods
        self.cache_dir, self.progress = cache_dir, progress
        self._cal = calibration
        self._bases: Any = None

    def calibration(self) -> Calibration:
        if self._cal is None:
            self._cal = self._load_calibration()
        return self._cal

    def _load_calibration(self) -> Calibration:
        from kvbm_codec.calibration.cache import cache_dir as default_cache_dir
        from kvbm_codec.calibration.cache import load_or_calibrate

        if self.suite.calibration == "default":
            return load_or_calibrate(self.lm, progress=self.progress)[0]
        from kvbm_codec.calibration.calibrate import calibrate
        from kvbm_codec.codec.config import CodecConfig
        from kvbm_codec.texts import calibration_texts

        targets = sorted(
            {float(getattr(m, "target_cr", 16.0)) for m in self.methods if m.family.startswith("kvtc")}
        ) or [16.0]
        fp = self.lm.info.fingerprint
        key = hashlib.sha256(json.dumps({"targets": targets, "fit": 4, "seq": 512}).encode()).hexdigest()[:12]
        # Next to the default calibration, not in the result cache: it depends only on model and text.
        path = default_cache_dir() / "bench" / "calibrations" / f"{fp}-small-{key}.kvtc"
        if path.exists():
            return load_calibration(path, expected_fingerprint=fp)
        cal = calibrate(
            self.lm,
            calibration_texts(),
            CodecConfig(),
            targets=targets,
            fit_sequences=4,
            seq_len=512,
            text_source="pydoc_data.topics",
            progress=self.progress,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        save_calibration(cal, path)
        return cal

    def incumbent_bases(self) -> Any:
        """Post-RoPE PCA bases of the incumbent, fitted once per (model, layout, fit size) and kept on disk:
        the fit (16 prefills + six eigendecompositions) costs minutes on 2 cores and depends on no result."""
        if self._bases is None:
            cfg = self.calibration().config
            fit = (self.suite.pca_fit_sequences, self.suite.pca_seq_len)
            blob = json.dumps(
                [
                    CACHE_VERSION,
                    self.lm.info.fingerprint,
                    cfg.layer_groups(self.lm.info.n_layers),
                    cfg.sink_tokens,
                    cfg.window_tokens,
                    fit,
                ],
                default=str,
            )
            path = (
                self.cache_dir / "incumbent" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"
            )
            self._bases = load_bases(path) if path.exists() else None
            if self._bases is None:
                self._bases = fit_post_rope_bases(self.lm, cfg, *fit)
                save_bases(self._bases, path)
        return self._bases


class ResultCache:
    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / "results" / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self._path(key)
        if p is None or not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        p = self._path(key)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(p)


def result_key(m: KVMethod, item: Item, fingerprint: str, resources: Resources, suite: Suite) -> str:
    extra: dict[str, Any] = {}
    if m.needs_calibration:
        extra["calibration"] = resources.calibration().calibration_id
    if m.family == "pca-incumbent":
        extra["pca_fit"] = [suite.pca_fit_sequences, suite.pca_seq_len]
    if m.needs_attention:
        extra["dms_window"] = DMS_WINDOW
    if item.kind != "lm":
        extra["max_new_tokens"] = suite.max_new_tokens
    blob = json.dumps(
        [CACHE_VERSION, m.name, m.params(), item.key, fingerprint, extra], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _prefill(lm: Any, ids: torch.Tensor, capture: bool) -> tuple[KVCache, Callable[[], Any] | None]:
    """fp16-rounded KV (what an engine stores, so fp16 is exactly lossless) and a lazy attention pass."""
    qc = QueryCapture(lm.model) if capture else None
    if qc is not None:
        with qc.active():
            kv, _ = lm.prefill(ids, return_logits=False)
    else:
        kv, _ = lm.prefill(ids, return_logits=False)
    kv = KVCache(kv.keys.half().float(), kv.values.half().float(), kv.positions)
    if qc is None:
        return kv, None
    info = lm.info
    n_q = int(lm.model.config.num_attention_heads)

    def stats() -> Any:
        q = qc.queries(n_q, info.key_head_dim, kv.positions, info.rope)
        return attention_stats(q, kv, DMS_WINDOW)

    return kv, stats


def _same_kv(a: KVCache, b: KVCache) -> bool:
    return (
        a.n_tokens == b.n_tokens
        and torch.equal(a.positions, b.positions)
        and torch.equal(a.keys, b.keys)
        and torch.equal(a.values, b.values)
    )


def _lm_scores(lm: Any, kv: KVCache, item: Item, ref_logits: torch.Tensor | None) -> dict[str, Any]:
    """Teacher-forced continuation: per-position NLL and top-1 hits are kept for the paired statistics."""
    logits = lm.logits_with_cache(kv, item.next_ids)[:-1].to(torch.float64)
    targets = item.next_ids[0, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets[:, None].long())[:, 0]
    ref = logits if ref_logits is None else ref_logits
    out: dict[str, Any] = {"_logits": logits, "nll": [round(float(x), 5) for x in nll]}
    out["ppl"] = float(torch.exp(nll.mean()))
    hits = ref.argmax(-1) == logits.argmax(-1)
    out["top1_hits"] = "".join("1" if h else "0" for h in hits.tolist())
    out["top1"] = top1_agreement(ref, logits)
    out["kl"] = kl_divergence_mean(ref, logits)
    return out


def _task_scores(lm: Any, kv: KVCache, item: Item) -> dict[str, Any]:
    """Greedy answer check in ONE teacher-forced pass: the prompt's last token, then the answer tokens.

    Greedy decoding emits the expected answer first iff every answer token is the argmax given the ones
    before it, so `correct` equals "greedy generation starts with the answer" at the cost of one forward
    instead of one per generated token; the answer's mean NLL is a continuous, paired by-product.
    """
    assert item.answer_ids is not None
    fed = torch.cat([item.next_ids, item.answer_ids[:, :-1]], dim=1)
    logits = lm.logits_with_cache(kv, fed).to(torch.float64)
    target = item.answer_ids[0]
    nll = -torch.log_softmax(logits, dim=-1).gather(1, target[:, None].long())[:, 0]
    pred = logits.argmax(-1)
    return {
        "output": lm.tokenizer.decode(pred.tolist(), skip_special_tokens=True),
        "answer": item.answer,
        "correct": bool(torch.equal(pred, target)),
        "answer_nll": float(nll.mean()),
    }


def run_item(
    lm: Any,
    item: Item,
    methods: list[KVMethod],
    resources: Resources,
    cache: ResultCache,
    suite: Suite,
    cached_only: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
    """Rows of every method on this item; with cached_only, None unless all of them are cached."""
    fp = lm.info.fingerprint
    keys = {m.name: result_key(m, item, fp, resources, suite) for m in methods}
    done = {m.name: cache.get(keys[m.name]) for m in methods}
    pending = [m for m in methods if done[m.name] is None]
    if pending and cached_only:
        return None
    timings: dict[str, float] = {}
    if pending:
        t0 = time.perf_counter()
        kv, attn_fn = _prefill(lm, item.context_ids, any(m.needs_attention for m in pending))
        timings["prefill_s"] = time.perf_counter() - t0
        ctx = BenchContext(lm, item.context_ids, resources, attn_fn)
        if attn_fn is not None:
            t0 = time.perf_counter()
            ctx.attention()
            timings["attention_stats_s"] = time.perf_counter() - t0
        # The reference scores, computed once per context and shared: every method whose restored KV is
        # bit-identical to the fp16 KV (fp16 and the lossless codecs) gets them without another forward.
        t0 = time.perf_counter()
        if item.kind == "lm":
            ref = _lm_scores(lm, kv, item, None)
            ref_logits = ref.pop("_logits")
        else:
            ref, ref_logits = _task_scores(lm, kv, item), None
        timings["reference_s"] = time.perf_counter() - t0
        for m in pending:
            m.prepare(ctx)
            c, enc_s = timed(lambda m=m: m.compress(kv, ctx))
            restored, dec_s = timed(lambda m=m, c=c: m.restore(c))
            r: dict[str, Any] = {
                "method": m.name,
                "family": m.family,
                "item": item.key,
                "kind": item.kind,
                "context_tokens": kv.n_tokens,
                "kept_tokens": restored.n_tokens,
                "fp16_bytes": kv.nbytes(2),
                "stored_bytes": c.stored_bytes,
                "ratio": kv.nbytes(2) / c.stored_bytes,
                "encode_s": enc_s,
                "decode_s": dec_s,
                "info": c.info,
            }
            t_score = time.perf_counter()
            if _same_kv(restored, kv):
                scores, r["shared_reference"] = dict(ref), True
            elif item.kind == "lm":
                scores = _lm_scores(lm, restored, item, ref_logits)
                scores.pop("_logits")
            else:
                scores = _task_scores(lm, restored, item)
            r.update(scores)
            if item.kind == "lm":
                r["ppl_ref"] = ref["ppl"]
                r["ppl_increase_pct"] = 100.0 * (r["ppl"] / ref["ppl"] - 1.0)
            elif m.family == "reference":
                # Cross-check of the one-pass scorer against real greedy generation (fp16 only: cheap).
                gen = lm.generate(restored, item.next_ids, suite.max_new_tokens)
                r["generated"] = lm.tokenizer.decode(gen, skip_special_tokens=True)
                r["generated_correct"] = score(lm.tokenizer, gen, item.answer or "")
            r["score_s"] = time.perf_counter() - t_score
            cache.put(keys[m.name], r)
            done[m.name] = r
    return [{**done[m.name], "cached": m not in pending} for m in methods], timings


def restore_vs_recompute(
    lm: Any,
    text: str,
    contexts: tuple[int, ...],
    resources: Resources,
    target_cr: float,
    cache: ResultCache,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Prefill time / KVTC decode time of the same context, both with every core (as an engine runs)."""
    from kvbm_codec.eval.run import context_codec

    cal = resources.calibration()
    ids_all = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    for n in contexts:
        reps = -(-n // int(ids_all.shape[1]))
        ids = ids_all.repeat(1, reps)[:, :n]
        key = hashlib.sha256(
            json.dumps(
                [CACHE_VERSION, "rvr", lm.info.fingerprint, cal.calibration_id, target_cr, _ids_key(ids)]
            ).encode()
        ).hexdigest()[:24]
        hit = cache.get(key)
        if hit is None and deadline is not None and time.perf_counter() > deadline:
            continue  # out of time budget: only cached contexts are reported
        if hit is None:
            t0 = time.perf_counter()
            kv, _ = lm.prefill(ids, return_logits=False)
            prefill_s = time.perf_counter() - t0
            codec = context_codec(cal, target_cr, kv)
            t0 = time.perf_counter()
            frame = codec.encode(kv)
            encode_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            codec.decode(frame)
            decode_s = time.perf_counter() - t0
            hit = {
                "context_tokens": n,
                "target_cr": target_cr,
                "threads": torch.get_num_threads(),
                "prefill_s": prefill_s,
                "kvtc_encode_s": encode_s,
                "kvtc_decode_s": decode_s,
                "restore_speedup": prefill_s / decode_s,
                "ratio": kv.nbytes(2) / len(frame),
            }
            cache.put(key, hit)
            hit = {**hit, "cached": False}
        else:
            hit = {**hit, "cached": True}
        out.append(hit)
    return out


@dataclass
class BenchResult:
    model: str
    suite: dict[str, Any]
    calibration_id: str | None
    methods: list[str]
    results: list[dict[str, Any]]
    item_timings: list[dict[str, Any]] = field(default_factory=list)
    restore_vs_recompute: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system CPU seconds of this process (all threads): load-independent cost
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # wall/cpu per phase
    load_average: list[float] = field(default_factory=list)  # 1-min load at start and end
    skipped_items: list[str] = field(default_factory=list)  # not computed within stop_after_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_bench(
    lm: Any,
    suite: Suite,
    *,
    text: str | None = None,
    methods: list[str] | None = None,
    cache_dir: Path | None = None,
    calibration: Calibration | None = None,
    progress: bool = True,
    throughput: bool = True,
    stop_after_s: float | None = None,
) -> BenchResult:
    """Every method on every item; fp16 is always included, as the reference accuracy is paired against.

    stop_after_s: a wall-time budget; past it no new context is computed, and only contexts whose rows
    are all cached are reported (listed in `skipped_items` otherwise), so a run on a machine busier than
    planned ends with a smaller but complete-per-context result instead of running on.
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    deadline = None if stop_after_s is None else t_start + stop_after_s
    load_start = os.getloadavg()[0]
    phases: dict[str, dict[str, float]] = {}

    def mark(name: str, t0: float, c0: float) -> None:
        phases[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    specs = methods or [s for s in suite.methods.split(",") if s]
    if "fp16" not in specs:
        specs = ["fp16", *specs]
    built = [build_method(s) for s in specs]
    names = [m.name for m in built]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate methods in {specs}")
    body = text if text is not None else demo_document()
    items = interleave(lm_items(lm.tokenizer, body, suite), task_items(lm.tokenizer, suite))
    from kvbm_codec.calibration.cache import cache_dir as default_cache_dir

    resources = Resources(lm, suite, built, cache_dir or default_cache_dir() / "bench", calibration, progress)
    cache = ResultCache(cache_dir)
    results: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    if any(m.needs_calibration for m in built):
        resources.calibration()
    if any(m.family == "pca-incumbent" for m in built):
        resources.incumbent_bases()
    mark("shared_setup", t0, c0)
    # Before the contexts, so a context budget (stop_after_s) cannot squeeze it out of the run.
    rvr: list[dict[str, Any]] = []
    kvtc = [m for m in built if m.family == "kvtc"]
    if throughput and kvtc and suite.throughput_contexts:
        t0, c0 = time.perf_counter(), time.process_time()
        target = 20.0 if any(m.target_cr == 20.0 for m in kvtc) else kvtc[0].target_cr  # type: ignore[attr-defined]
        rvr = restore_vs_recompute(lm, body, suite.throughput_contexts, resources, target, cache, deadline)
        mark("restore_vs_recompute", t0, c0)
    skipped: list[str] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for item in tqdm(items, desc="bench: contexts", disable=not progress):
        c_item = time.process_time()
        late = deadline is not None and time.perf_counter() > deadline
        got = run_item(lm, item, built, resources, cache, suite, cached_only=late)
        if got is None:
            skipped.append(item.key)
            continue
        rows, t = got
        results += rows
        timings.append({"item": item.key, "kind": item.kind, **t, "cpu_s": time.process_time() - c_item})
    mark("contexts", t0, c0)
    needs_cal = any(m.needs_calibration for m in built)
    return BenchResult(
        model=lm.info.name,
        suite=asdict(suite),
        calibration_id=resources.calibration().calibration_id if needs_cal else None,
        methods=names,
        results=results,
        item_timings=timings,
        restore_vs_recompute=rvr,
        wall_s=time.perf_counter() - t_start,
        cpu_s=time.process_time() - c_start,
        phases=phases,
        load_average=[load_start, os.getloadavg()[0]],
        skipped_items=skipped,
    )
