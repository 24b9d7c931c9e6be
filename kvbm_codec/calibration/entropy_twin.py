"""The entropy-coded twin of a min/max calibration (``kvbm-codec calibrate --quantizer ecsq
--twin-of``): an ``ecsq`` recipe fits the same bases and metric weights as its min/max twin, so an
operator with a min/max calibration gets the entropy-coded one for the price of a held-out prefill
and the tables' fit, not a whole calibration."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from kvbm_codec.calibration.calibrate import (
    BlockRatioProbe,
    PhaseClock,
    _text_digest,
    calibration_kv,
    compressible,
    mixed_held_out,
    token_sequences,
)
from kvbm_codec.calibration.entropy_fit import entropy_allocations
from kvbm_codec.codec.params import Calibration
from kvbm_codec.core.matmul import exact_fp32


@exact_fp32()  # the held-out prefill as calibrate runs it, so the twin sees the same KV
def entropy_calibration_from(
    lm: object, cal: Calibration, texts: Sequence[str] | Mapping[str, Sequence[str]], progress: bool = True
) -> Calibration:
    """The entropy-coded twin of a min/max calibration, in a held-out prefill instead of a whole
    calibration: an ``ecsq`` recipe fits the same bases and metric weights as its min/max twin (its
    sensitivity probe measures with min/max groups too), so only the code tables and steps are new.
    ``texts`` must be the corpus ``cal`` was fitted on (checked by digest); the tables and steps are
    fitted on the same held-out sequences ``calibrate`` would hold out. Each phase's time is printed
    as it ends (``progress``) and kept in the twin's provenance."""
    if cal.config.quantizer != "minmax":
        raise ValueError(
            f"an entropy-coded twin needs a min/max calibration (its probe's weights); "
            f"{cal.calibration_id} is {cal.config.quantizer!r}"
        )
    prov = cal.provenance
    if _text_digest(texts) != prov.get("text_sha256"):
        raise ValueError(f"the corpus given is not the one calibration {cal.calibration_id} was fitted on")
    seq_len = int(prov["seq_len"])
    cfg = cal.config.model_copy(update={"quantizer": "ecsq"})
    tok = lm.tokenizer  # type: ignore[attr-defined]
    clock = PhaseClock(progress)
    with torch.inference_mode(), clock.phase("held-out prefill"):
        if isinstance(texts, Mapping):
            counts = {d: int(n) for d, n in prov["domains"].items()}
            held = [token_sequences(tok, texts[d], seq_len, counts[d] + 1)[counts[d]] for d in texts]
            held_kvs = list(calibration_kv(lm, held, False))  # type: ignore[arg-type]
            held_out = mixed_held_out(held_kvs, cfg, seq_len)
            sources = [compressible(kv, cfg) for kv in held_kvs]
        else:
            fit = int(prov["fit_tokens"]) // seq_len
            seq = token_sequences(tok, texts, seq_len, fit + 1)[fit]
            held_out, sources = compressible(lm.prefill_kv(seq), cfg), []  # type: ignore[attr-defined]
    targets = sorted({float(a.meta["target_cr"]) for n, a in cal.allocations.items() if "@" not in n})
    pages = sorted({int(a.meta["page_tokens"]) for a in cal.allocations.values() if "page_tokens" in a.meta})
    twin = dataclasses.replace(
        cal,
        config=cfg,
        allocations={},
        code_tables=None,
        provenance={**prov, "entropy_twin_of": cal.calibration_id},
        calibration_id="0" * 16,
    )
    # the block sizes the min/max calibration sized allocations for (calibrate's block_tokens)
    probes = {
        page: BlockRatioProbe(twin, held_out, page).measure for page in pages if held_out.n_tokens >= page
    }
    with clock.phase("code tables and steps"):
        entropy_allocations(twin, held_out, sources, targets, probes)
    twin.provenance["twin_phase_seconds"] = clock.rounded()
    return twin
