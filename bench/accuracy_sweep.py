"""Choose the distortion metric and the calibration corpus on VALIDATION text; then report held-out.

Phase 1 (cached with --state): one pass of prefills per corpus domain (calibration/corpus.py) keeps,
per domain, the covariance sums of every basis, the model statistics the metric needs and one
held-out KV, so any mix of domains (all, one, all but one) calibrates without another prefill.
Phase 2: each variant "corpus:distortion" is calibrated from those sums and scored on validation
texts: a slice of every domain far past its calibration tokens, plus the Apache licence and The
Tempest (the out-of-domain validation texts of docs/benchmarks.md). `--report` scores the held-out
evaluation texts instead (GPL v3, Hamlet): run it only for variants already chosen.

Corpora: docs16 = the old single-domain calibration (16 x 1024 pydoc tokens, held-out sequence 17);
broad = every domain; -X = every domain but X (leave one domain out).

    python bench/accuracy_sweep.py --state /tmp/acc_state.pt --variants docs16:mse,broad:attention \
        --out bench/results/accuracy_sweep.jsonl

--model runs it on another registered model (default smollm2-135m). A phase-1 state and the
--val-cache files hold one model's KV: a state records the fingerprint of the model it was built
with and is refused by any other, and cached validation KV is keyed by the fingerprint too, so two
models with the same tokenizer never read each other's KV.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvbm_codec.api.types import DEFAULT_MODEL
from kvbm_codec.calibration.artifact import load_calibration, save_calibration
from kvbm_codec.calibration.calibrate import (
    CONTEXT_ALLOCATION_VERSION,
    PROBE_CONTINUATION,
    PROBE_CR,
    accumulate_covariances,
    block_allocations,
    calibrate_from_kv,
    compressible,
    metric_weights,
    mixed_held_out,
    sized_context_allocations,
    token_sequences,
)
from kvbm_codec.calibration.corpus import CORPUS_NAME, broad_corpus
from kvbm_codec.calibration.sensitivity import (
    combine_measurements,
    measure_layer_sensitivity,
    sensitivity_factors,
    shrink_head_factors,
)
from kvbm_codec.calibration.statistics import gather_statistics
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import allocation_name, block_allocation_name
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.eval.run import context_codec
from kvbm_codec.models.hf import CausalLM

SEQ = 1024
CTX, CONT = 2048, 256
TEXTS = Path("/tmp/kvbm-codec-texts")  # bench/fetch_texts.sh
PROBE_SEQUENCES = 0  # --probe-sequences: held-out sequences a probe measures (first N domains; 0 = all)
QUANTIZER = "minmax"  # --quantizer: every variant's CodecConfig.quantizer


def build_state(
    lm: CausalLM, per_domain: int, docs_fit: int, only: list[str] | None = None, parts: Path | None = None
) -> dict:
    """Phase 1. With `only`, just those domains are prefilled (the others keep their validation
    ids, so their slices can still score calibrations saved earlier), and the state is partial.
    With `parts`, each domain is saved there as soon as it is done and reused by a later run whose
    token ids match, so a run stopped by its timeout loses at most one domain's prefills."""
    cfg = CodecConfig()  # accumulation depends only on sinks/window/rope/layer groups (not the metric)
    corpus = broad_corpus(lm.tokenizer)
    n_q = int(lm.model.config.num_attention_heads)
    state: dict = {"domains": {}, "corpus": CORPUS_NAME, "val_only": {}, "fingerprint": lm.info.fingerprint}
    for domain, texts in corpus.items():
        fit_n = docs_fit if domain == "docs" else per_domain
        # fit + 1 held-out + a gap of 2 sequences + 3 sequences of validation (2048 + 256 tokens)
        seqs = token_sequences(lm.tokenizer, texts, SEQ, fit_n + 6)
        val_ids = torch.cat(seqs[fit_n + 3 : fit_n + 6], 1)[:, : CTX + CONT]
        if only and domain not in only:
            state["val_only"][domain] = val_ids
            continue
        # token ids of the fit and held-out sequences: a sensitivity probe reruns the model on them
        fit_ids = torch.cat(seqs[: fit_n + 1], 0)
        part = None if parts is None else parts / f"{domain}.pt"
        if part is not None and part.exists():
            saved = torch.load(part, weights_only=False)
            same_model = saved.get("fingerprint", lm.info.fingerprint) == lm.info.fingerprint
            same_ids = torch.equal(saved["fit_ids"], fit_ids) and torch.equal(saved["val_ids"], val_ids)
            if same_model and same_ids:
                state["domains"][domain] = saved
                print(f"{domain}: reused {part}", flush=True)
                continue
        t0 = time.perf_counter()
        with gather_statistics(lm.model, n_q, lm.info.key_head_dim) as stats:
            accs = accumulate_covariances(
                tqdm((lm.prefill_kv(s) for s in seqs[:fit_n]), total=fit_n, desc=f"{domain}: prefill"),
                cfg,
                lm.info.rope,
                _shape(lm),
            )
        held = lm.prefill_kv(seqs[fit_n])
        state["domains"][domain] = {
            "accs": accs,
            "stats": stats,
            "held_out": held,
            "val_ids": val_ids,
            "fit_tokens": fit_n * SEQ,
            "fit_ids": fit_ids,
            "fingerprint": lm.info.fingerprint,
        }
        if part is not None:
            part.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state["domains"][domain], part.with_suffix(".tmp"))
            part.with_suffix(".tmp").replace(part)
        print(f"{domain}: {fit_n} x {SEQ} fit tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    return state


def texts_only_state(lm: CausalLM, per_domain: int, docs_fit: int) -> dict:
    """The token ids build_state would keep, without its prefills: enough to score calibrations
    already saved in --calibrations on the domain slices (the same ids, so the same rows)."""
    state: dict = {"domains": {}, "corpus": CORPUS_NAME, "fingerprint": lm.info.fingerprint}
    for domain, texts in broad_corpus(lm.tokenizer).items():
        fit_n = docs_fit if domain == "docs" else per_domain
        seqs = token_sequences(lm.tokenizer, texts, SEQ, fit_n + 6)
        state["domains"][domain] = {"val_ids": torch.cat(seqs[fit_n + 3 : fit_n + 6], 1)[:, : CTX + CONT]}
    return state


def check_state_model(state: dict, fingerprint: str, model: str, path: Path) -> None:
    """Refuse a phase-1 state built with another model: its covariance sums and held-out KV would
    calibrate this one with another model's statistics (or fail deep inside on a shape). States from
    before --model carry no fingerprint; they were all built with the default model."""
    built = state.get("fingerprint")
    if built is None and model != DEFAULT_MODEL:
        raise SystemExit(
            f"{path}: this state records no model, so it was built with {DEFAULT_MODEL}, not {model}"
        )
    if built is not None and built != fingerprint:
        raise SystemExit(
            f"{path}: built with the model of fingerprint {built}, not {model} ({fingerprint}); "
            "give this model its own --state"
        )


def val_cache_path(cache: Path, name: str, ids: torch.Tensor, fingerprint: str) -> Path:
    """One text's exact KV and logits, keyed by the tokens themselves (a slice cut with another
    --per-domain is another file) and by the model (same tokens, another model: another KV)."""
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    return cache / f"{name}-{CTX}-{CONT}-{digest}-{fingerprint[:12]}.pt"


def _shape(lm: CausalLM):
    from kvbm_codec.codec.params import ModelShape

    i = lm.info
    return ModelShape(i.n_layers, i.n_kv_heads, i.key_head_dim, i.value_head_dim)


def corpus_parts(state: dict, corpus: str) -> list[str]:
    names = list(state["domains"])
    if corpus in ("docs16", "docs"):
        return ["docs"]
    if corpus == "broad":
        return names
    if corpus.startswith("-") and corpus[1:] in names:
        return [n for n in names if n != corpus[1:]]
    if corpus in names:
        return [corpus]
    raise SystemExit(f"unknown corpus {corpus!r}: docs16, broad, a domain, or -DOMAIN ({', '.join(names)})")


def held_out_kv(state: dict, corpus: str):
    """The compressible held-out tokens a corpus' calibration measures its ratios on."""
    parts = [state["domains"][d] for d in corpus_parts(state, corpus)]
    if len(parts) == 1:
        return compressible(parts[0]["held_out"], CodecConfig())
    return mixed_held_out([p["held_out"] for p in parts], CodecConfig(), SEQ)


def ratio_sources(state: dict, corpus: str) -> list:
    """The corpus' whole held-out prefills, the context allocations' frames are cut from."""
    return [state["domains"][d]["held_out"] for d in corpus_parts(state, corpus)]


def add_targets(cal, state: dict, corpus: str, targets: list[float]) -> list[float]:
    """Give a saved calibration the allocations of `targets` it lacks, measured on the held-out tokens
    it was calibrated with; its bases, tables and other allocations stay bit-identical (a new id)."""
    missing = [t for t in targets if allocation_name(t) not in cal.allocations]
    if missing:
        sources = [compressible(kv, cal.config) for kv in ratio_sources(state, corpus)]
        sized_context_allocations(cal, sources, missing)
    return missing


def rederive_context(cal, state: dict, corpus: str, block_tokens: list[int]) -> list[float]:
    """Replace a saved calibration's context allocations by ones sized per context length
    (calibrate.CONTEXT_TOKENS), from the same held-out prefills; bases, error tables and block
    allocations stay bit-identical, so the difference in its rows is the sizing alone (a new id).
    block_tokens: page sizes that get block allocations it lacks (as `calibrate` gives the default:
    the harness stores 32-token blocks, at the context allocation when there is none)."""
    old = {n: a for n, a in cal.allocations.items() if "@" not in n}
    targets = sorted(a.meta["target_cr"] for a in old.values())
    for n in [n for n in cal.allocations if "@" not in n or "@c" in n]:
        del cal.allocations[n]
    sources = [compressible(kv, cal.config) for kv in ratio_sources(state, corpus)]
    sized_context_allocations(cal, sources, targets)
    pages = [p for p in block_tokens if block_allocation_name(targets[0], p) not in cal.allocations]
    block_allocations(cal, held_out_kv(state, corpus), targets, pages)
    return targets


@dataclass(frozen=True)
class Distortion:
    """A sweep variant's distortion: the metric, and for measured factors their damping and layout."""

    metric: str
    power: float | None = None  # None: analytic factors (no probe)
    key_weight: float = 1.0
    probe_cr: float = PROBE_CR
    key_power: float | None = None
    per_head: bool = False
    shrink: float = 1.0  # per head: weight of the head's own factor against its layer's (1: its own)


MEASURED = re.compile(r"measured(?:@(?P<p>[0-9.]+)(?:k(?P<kp>[0-9.]+))?)?(?P<h>h(?P<s>[0-9.]+)?)?")


def parse_distortion(distortion: str) -> Distortion:
    """'attention', 'mse', ... as CodecConfig has them; 'measured[@POWER[kKEY_POWER]][h[SHRINK]][/KW]':
    the attention metric with per-layer, per-kind factors measured end to end
    (calibration/sensitivity.py) at the analytic calibration's 20x allocation, damped by POWER (the key
    factors by KEY_POWER if given), per KV head with 'h' (pulled toward the layer's factor with
    SHRINK < 1, sensitivity.shrink_head_factors); 'attention/KW' or 'mse/KW': key_weight KW."""
    name, _, kw = distortion.partition("/")
    key_weight = float(kw) if kw else 1.0
    m = MEASURED.fullmatch(name)
    if m is None:
        if name.startswith("measured"):
            raise SystemExit(f"bad measured variant {distortion!r}")
        return Distortion(name, key_weight=key_weight)
    return Distortion(
        "attention",
        power=float(m["p"]) if m["p"] else 1.0,
        key_weight=key_weight,
        key_power=float(m["kp"]) if m["kp"] else None,
        per_head=m["h"] is not None,
        shrink=float(m["s"]) if m["s"] else 1.0,
    )


def calibrate_variant(
    lm: CausalLM,
    state: dict,
    corpus: str,
    distortion: str,
    targets: list[float],
    probe_cache: Path | None = None,
):
    if state.get("val_only") and corpus not in state["domains"] and corpus not in ("docs16", "docs"):
        raise SystemExit(f"corpus {corpus!r} needs domains this partial state did not prefill")
    parts = [state["domains"][d] for d in corpus_parts(state, corpus)]
    accs = {n: parts[0]["accs"][n].merged(*(p["accs"][n] for p in parts[1:])) for n in parts[0]["accs"]}
    stats = parts[0]["stats"].merged(*(p["stats"] for p in parts[1:]))
    held = held_out_kv(state, corpus)
    d = parse_distortion(distortion)
    power, per_head = d.power, d.per_head
    cfg = CodecConfig(
        distortion=d.metric,  # type: ignore[arg-type]
        key_weight=d.key_weight,
        layer_sensitivity="analytic",
        quantizer=QUANTIZER,  # type: ignore[arg-type]
    )
    if power is not None:  # the same recipe as calibrate() with this config (the artifact says so)
        cfg = cfg.model_copy(
            update={
                "layer_sensitivity": "measured",
                "sensitivity_power": power,
                "sensitivity_heads": per_head,
            }
        )
    provenance = {
        "text_source": f"{state['corpus']}:{corpus}",
        "domains": corpus_parts(state, corpus),
        "fit_tokens": sum(p["fit_tokens"] for p in parts),
        "distortion": distortion,
    }
    if power is not None:
        heads_cache = None if probe_cache is None else probe_cache.with_name(f"{probe_cache.stem}-heads.pt")
        if per_head:
            measured = _probe(lm, state, corpus, accs, held, stats, d.probe_cr, heads_cache, True)
            if d.shrink < 1.0:
                layers = _probe(lm, state, corpus, accs, held, stats, d.probe_cr, probe_cache, False)
                measured = shrink_head_factors(layers, measured, d.shrink)
        else:
            measured = _probe(lm, state, corpus, accs, held, stats, d.probe_cr, probe_cache, False)
        stats = stats.with_sensitivity(sensitivity_factors(measured, power, key_power=d.key_power))
        provenance["layer_sensitivity"] = {
            "power": power,
            "key_power": d.key_power,
            "probe_cr": d.probe_cr,
            "per_head": per_head,
            "shrink": d.shrink,
        }
    return calibrate_from_kv(
        lm.info,
        accs,
        held,
        cfg,
        targets=targets,
        statistics=stats,
        progress=False,
        provenance=provenance,
        held_out_compressible=True,
        ratio_sources=ratio_sources(state, corpus),
    )


def _probe(
    lm, state, corpus, accs, held, stats, probe_cr: float, cache: Path | None, per_head: bool = False
) -> dict:
    """Per-layer (per_head: per-KV-head) sensitivity of the corpus' analytic attention calibration at
    probe_cr, measured on the held-out calibration sequence of every domain in the corpus (never on
    validation text)."""
    if cache is not None and cache.exists():
        return torch.load(cache)
    cfg = CodecConfig(distortion="attention", layer_sensitivity="analytic")
    analytic = None if cache is None else cache.parent / f"{corpus}-attention.kvtc"
    if analytic is not None and analytic.exists():  # the same recipe, already calibrated by the sweep
        base = load_calibration(analytic, expected_fingerprint=lm.info.fingerprint)
    else:
        base = calibrate_from_kv(
            lm.info, accs, held, cfg, targets=[probe_cr], statistics=stats, progress=False,
            held_out_compressible=True, context_lengths=None,
        )  # fmt: skip
    shape = _shape(lm)
    metric = metric_weights(accs, cfg, shape, lm.info.rope, stats)
    assert metric is not None
    domains = corpus_parts(state, corpus)[: PROBE_SEQUENCES or None]
    probes = [state["domains"][d]["fit_ids"][-1:] for d in domains]
    # the held-out prefill is the probe sequence's whole KV: its context is a prefix slice of it
    prefilled = [state["domains"][d]["held_out"] for d in domains]
    codec = KVTCCodec(base, allocation_name(probe_cr))
    groups = cfg.layer_groups(shape.n_layers)
    t0 = time.perf_counter()
    parts = []
    for i, (ids, kv) in enumerate(zip(probes, prefilled, strict=True)):  # one cached file per sequence
        part = None if cache is None else cache.with_name(f"{cache.stem}-{i}.pt")
        if part is not None and part.exists():
            parts.append(torch.load(part))
            continue
        m = measure_layer_sensitivity(
            lm,
            codec,
            metric,
            groups,
            [ids],
            continuation=PROBE_CONTINUATION,
            per_head=per_head,
            prefilled=[kv],
        )
        parts.append(m)
        if part is not None:
            torch.save(m, part)
        print(f"sensitivity probe {i + 1}/{len(probes)}: {time.perf_counter() - t0:.0f} s", flush=True)
    measured = combine_measurements(parts)
    if cache is not None:
        torch.save(measured, cache)
    return measured


def val_sets(
    lm: CausalLM, state: dict, names: list[str], report: bool, cache: Path | None = None
) -> list[tuple[str, bool, tuple]]:
    """(name, is_report, (kv, continuation, reference logits)) per text: validation texts (a slice of
    every domain past its calibration tokens, the Apache licence, The Tempest; filtered by names) and,
    with report, the held-out evaluation texts (GPL v3, Hamlet)."""
    texts: dict[str, tuple[bool, torch.Tensor]] = {}

    def tok(text: str) -> torch.Tensor:
        return lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    for d, info in state["domains"].items():
        texts[d] = (False, info["val_ids"])
    for d, ids in state.get("val_only", {}).items():
        texts[d] = (False, ids)
    texts["apache"] = (False, tok(Path("/usr/share/common-licenses/Apache-2.0").read_text()))
    texts["tempest"] = (False, tok((TEXTS / "tempest.txt").read_text()))
    texts = {n: v for n, v in texts.items() if not names or n in names}
    if report:
        from importlib import resources

        texts["gpl"] = (
            True,
            tok(resources.files("kvbm_codec.data").joinpath("gpl-3.0.txt").read_text("utf-8")),
        )
        texts["hamlet"] = (True, tok((TEXTS / "hamlet.txt").read_text()))
    out = []
    for name, (is_report, ids) in texts.items():
        ids = ids[:, : CTX + CONT]
        ctx, cont = ids[:, :CTX], ids[:, CTX:]
        saved = None if cache is None else val_cache_path(cache, name, ids, lm.info.fingerprint)
        if saved is not None and saved.exists():
            kv, ref = torch.load(saved, weights_only=False)
        else:
            kv = lm.prefill(ctx, return_logits=False)[0]
            ref = lm.logits_with_cache(kv, cont)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save((kv, ref), saved)
        out.append((name, is_report, (kv, cont, ref)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=Path, required=True, help="phase-1 cache (built if missing)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name or a path")
    p.add_argument("--per-domain", type=int, default=11)
    p.add_argument("--docs-fit", type=int, default=16)
    p.add_argument("--domains", default="", help="phase 1: prefill only these domains (default: all)")
    p.add_argument(
        "--texts-only",
        action="store_true",
        help="no phase-1 prefills: only the validation slices (variants must be in --calibrations)",
    )
    p.add_argument("--variants", default="docs16:mse,broad:mse,docs16:attention,broad:attention")
    p.add_argument("--targets", default="8,16,20,32,64", help="allocations each calibration gets")
    p.add_argument("--score-targets", default="", help="subset of --targets to score (default: all)")
    p.add_argument("--val", default="", help="comma list of validation set names (default: all)")
    p.add_argument(
        "--report",
        action="store_true",
        help="also score the held-out eval texts (GPL, Hamlet) at every target",
    )
    p.add_argument(
        "--own-domain",
        action="store_true",
        help="a -X corpus is scored on X's validation only (never reported); others on the report only",
    )
    p.add_argument(
        "--calibrations",
        type=Path,
        default=None,
        help="save each variant's calibration here; reuse it if there",
    )
    p.add_argument(
        "--val-cache",
        type=Path,
        default=None,
        help="keep each text's exact KV and logits here (reruns skip the prefills)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="JSON lines, appended; rows already there are skipped"
    )
    p.add_argument(
        "--probe-sequences",
        type=int,
        default=0,
        help="measured variants: probe only the first N domains' held-out sequences (0 = all)",
    )
    p.add_argument(
        "--add-targets",
        action="store_true",
        help="a saved calibration lacking some --targets gets them added (and is saved again)",
    )
    p.add_argument(
        "--rederive-context",
        action="store_true",
        help="a saved calibration without per-length context allocations gets them (saved as TAG-ctx2)",
    )
    p.add_argument(
        "--block-tokens",
        default="",
        help="with --rederive-context: page sizes that also get block allocations (e.g. 32, as the default)",
    )
    p.add_argument(
        "--quantizer",
        choices=("minmax", "symmetric", "ecsq"),
        default="minmax",
        help="every variant's quantizer (ecsq: entropy-coded; the sensitivity probe stays min/max)",
    )
    a = p.parse_args()
    global PROBE_SEQUENCES, QUANTIZER
    PROBE_SEQUENCES = a.probe_sequences
    QUANTIZER = a.quantizer
    torch.manual_seed(0)
    lm = CausalLM.load(a.model)
    if a.state.exists():
        state = torch.load(a.state, weights_only=False)
        check_state_model(state, lm.info.fingerprint, a.model, a.state)
    elif a.texts_only:
        state = texts_only_state(lm, a.per_domain, a.docs_fit)
    else:
        only = [d for d in a.domains.split(",") if d]
        state = build_state(lm, a.per_domain, a.docs_fit, only, a.state.with_suffix(".parts"))
        torch.save(state, a.state)
    targets = [float(t) for t in a.targets.split(",")]
    vals = val_sets(lm, state, [v for v in a.val.split(",") if v], a.report, a.val_cache)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.calibrations is not None:  # the probe saves its parts there before any calibration is saved
        a.calibrations.mkdir(parents=True, exist_ok=True)
    done = set()
    if a.out.exists():  # a run stopped by its timeout resumes at the first row it did not write
        for line in a.out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["calibration_id"], r["target"], r["val"]))
    for variant in a.variants.split(","):
        corpus, distortion = variant.split(":")
        t0 = time.perf_counter()
        score = {float(t) for t in a.score_targets.split(",") if t} or set(targets)
        tag = f"{corpus}-{distortion.replace('/', '_kw')}"
        tag += "" if QUANTIZER == "minmax" else f"-{QUANTIZER}"
        saved = None if a.calibrations is None else a.calibrations / f"{tag}.kvtc"
        probe = None if a.calibrations is None else a.calibrations / f"{corpus}-probe.pt"
        if a.rederive_context and saved is not None:
            pages = [int(x) for x in a.block_tokens.split(",") if x]
            blocks = "".join(f"-p{p}" for p in pages)
            sized = saved.with_name(f"{tag}-ctx{CONTEXT_ALLOCATION_VERSION}{blocks}.kvtc")
            if not sized.exists():
                cal = load_calibration(saved, expected_fingerprint=lm.info.fingerprint)
                rederive_context(cal, state, corpus, pages)
                save_calibration(cal, sized)
            saved = sized
        if saved is not None and saved.exists():
            cal = load_calibration(saved, expected_fingerprint=lm.info.fingerprint)
            if a.add_targets and add_targets(cal, state, corpus, targets):
                save_calibration(cal, saved)  # the sweep's rows of the old id stay valid for it
        else:
            # leave-one-out variants are only scored on validation: calibrate only the scored targets
            lodo = corpus.startswith("-") and a.own_domain
            cal = calibrate_variant(lm, state, corpus, distortion, sorted(score) if lodo else targets, probe)
            if saved is not None:
                save_calibration(cal, saved)
        cal_s = time.perf_counter() - t0
        for name in cal.allocations:
            if "@" in name:  # block and per-length allocations: context_codec picks the length's own
                continue
            target = cal.allocations[name].meta["target_cr"]
            for vname, is_report, (kv, cont, ref) in vals:
                codec = context_codec(cal, target, kv)
                if not is_report and target not in score:
                    continue
                if a.own_domain and corpus.startswith("-") and (is_report or vname != corpus[1:]):
                    continue
                if a.own_domain and not corpus.startswith("-") and not is_report:
                    continue  # own-domain runs score the other variants on the report texts only
                if (cal.calibration_id, target, vname) in done:
                    continue
                frame, st = codec.encode_with_stats(kv)
                rec = codec.decode(frame).to(torch.float32)
                out = lm.logits_with_cache(rec, cont)
                tgt = cont[0, 1:]
                pr, pt = perplexity(ref[:-1], tgt), perplexity(out[:-1], tgt)
                row = {
                    "corpus": corpus,
                    "distortion": distortion,
                    "target": target,
                    "allocation_id": codec.alloc.allocation_id,
                    # 2: context allocations sized per context length (calibrate.CONTEXT_TOKENS)
                    "context_sizing": 2 if any("@c" in n for n in cal.allocations) else 1,
                    "val": vname,
                    "report": is_report,
                    "achieved_cr": st.achieved_cr,
                    "achieved_cr_total": st.achieved_cr_total,
                    "ppl_ref": pr,
                    "ppl_increase_pct": 100 * (pt / pr - 1),
                    "top1": top1_agreement(ref[:-1], out[:-1]),
                    "kl": kl_divergence_mean(ref[:-1], out[:-1]),
                    "calibrate_s": cal_s,
                    "calibration_id": cal.calibration_id,
                }
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
