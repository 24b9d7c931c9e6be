"""Per-layer sensitivity measured end to end: what a layer's real codec error costs the model's output.

The attention-aware metric (calibration/statistics.py) prices an error in one layer from first-order local
arguments: the logit error a key error makes, the o_proj image of a value error, and the residual
energy entering the layer. It cannot see what happens downstream (a layer whose attention output
the later layers amplify or wash out), and its key/value exchange rate rests on an approximation
(a logit error moves the output by about ``delta * W_o (v - o)``). This probe measures both instead:
for each layer and for keys and values separately it restores a calibration context with only that
layer's keys (or values) replaced by their decoded version at a given allocation, runs a
continuation on it and takes the KL divergence of the next-token distributions against the exact
cache. Divided by the metric's own prediction of that error's cost, it gives one factor per
(layer, kind) that puts the metric in units of output KL; ``ModelStatistics.layer_sensitivity``
carries it into ``feature_weights``. ``per_head`` probes each KV head of a layer on its own instead
(one factor per (layer, head, kind)): heads of one layer do different jobs (a retrieval head, a
positional one), which one factor per layer averages away, at 3x the probe's cost for SmolLM2's
three KV heads.

Small errors add up nearly independently across layers (KL is locally quadratic and the cross terms
between layers average out), so single-layer probes at the codec's real error level are a fair
estimate of each layer's share. The probe runs on calibration sequences only (the held-out sequence
of each corpus domain), so it is a calibration step (``CodecConfig.layer_sensitivity="measured"``,
run by ``calibrate.measured_sensitivity``) and knows nothing of the evaluation code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import basis_name
from kvbm_codec.codec.pca import to_features
from kvbm_codec.kv import KVCache


class ProbeModel(Protocol):
    """What the probe needs of a model: calibration's KV-only prefill, and teacher-forced logits."""

    def prefill_kv(self, input_ids: torch.Tensor) -> KVCache: ...

    def logits_with_cache(self, cache: KVCache, input_ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LayerwiseProbeModel(ProbeModel, Protocol):
    """A model that can restart a continuation at any decoder layer (models/hf.py ``CausalLM``): the
    probe then skips the layers a variant leaves unchanged and batches its variants."""

    def continuation_states(
        self, cache: KVCache, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def states_from_layer(
        self,
        start: int,
        hidden: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        first_position: int,
    ) -> torch.Tensor: ...

    def head_logits(self, states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


PROBE_BATCH_ROWS = 12
"""Variants per layer-restarted forward (6 probe sequences x keys/values in the default recipe):
bigger matmuls than one 64-token row, bounded memory (each row holds its own context cache)."""


class Reference(NamedTuple):
    """What output_kl needs of a reference's logits, in float64: a probe scores 2 x layers variants
    against each reference, so this is computed once per reference."""

    probs: torch.Tensor  # [N, vocab] P_ref
    neg_entropy: float  # sum over positions of sum_v P_ref log P_ref


def reference_distribution(ref: torch.Tensor) -> Reference:
    log_p = F.log_softmax(ref.to(torch.float64), dim=-1)
    probs = log_p.exp()
    return Reference(probs, float(torch.dot(probs.flatten(), log_p.flatten())))


def output_kl(ref: torch.Tensor, out: torch.Tensor, reference: Reference | None = None) -> float:
    """Mean KL(P_ref || P_out) in nats over positions, in float64: a single layer's codec error moves a
    49k-way softmax by far less than float32 resolves. With log P_out = z - logsumexp(z) and
    sum_v P_ref = 1 per position, KL = sum P_ref log P_ref - sum P_ref z + logsumexp(z): one exp pass
    over the variant's logits instead of a log-softmax and a KL's own exp (half the time; equal to
    ~1e-12 relative). reference: reference_distribution(ref), when the caller keeps it."""
    r = reference_distribution(ref) if reference is None else reference
    z = out.to(torch.float64)
    expected = float(torch.dot(r.probs.flatten(), z.flatten()))
    return (r.neg_entropy - expected + float(torch.logsumexp(z, -1).sum())) / ref.shape[0]


def _replaced(kv: KVCache, rec: KVCache, layer: int, kind: str, head: int | None = None) -> KVCache:
    """`kv` with one layer's keys or values (only head `head`'s, if given) taken from `rec`."""
    keys, values = kv.keys, kv.values
    heads = slice(None) if head is None else slice(head, head + 1)
    if kind == "k":
        keys = keys.clone()
        keys[layer, heads] = rec.keys[layer, heads]
    else:
        values = values.clone()
        values[layer, heads] = rec.values[layer, heads]
    return KVCache(keys, values, kv.positions, kv.layer_start)


def predicted_cost(
    metric: dict[str, tuple[torch.Tensor, float]],
    layer_groups: Sequence[tuple[int, int]],
    error: KVCache,
    per_head: bool = False,
) -> torch.Tensor:
    """[L, 2] (keys, values), or [L, H, 2] with `per_head`: the metric's cost of `error` per token, in
    its absolute unit.

    Keys may be compared with RoPE applied: the key metric weighs both dims of a rotary pair alike,
    so a pair rotation leaves the weighted energy unchanged."""
    n_heads = error.keys.shape[1]
    out = torch.zeros(error.n_layers, n_heads, 2, dtype=torch.float64)
    for gi, (a, b) in enumerate(layer_groups):
        for ki, (kind, x) in enumerate((("k", error.keys[a:b]), ("v", error.values[a:b]))):
            w, factor = metric[basis_name(gi, kind)]
            sq = to_features(x.to(torch.float64)) ** 2  # [tokens, layers*heads*dim]
            out[a:b, :, ki] = (sq.mean(0) * w * factor).reshape(b - a, n_heads, -1).sum(2)
    return out if per_head else out.sum(1)


def measure_layer_sensitivity(
    lm: ProbeModel,
    codec: KVTCCodec,
    metric: dict[str, tuple[torch.Tensor, float]],
    layer_groups: Sequence[tuple[int, int]],
    probes: Sequence[torch.Tensor],
    continuation: int = 256,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    *,
    prefilled: Sequence[KVCache] | None = None,
    layerwise: bool | None = None,
    max_rows: int = PROBE_BATCH_ROWS,
    per_head: bool = False,
) -> dict[str, torch.Tensor]:
    """KL per (layer, kind) of each layer's decoded error alone, summed over probe sequences, the
    metric's predicted cost of the same errors, and their ratio (the sensitivity factor, [L, 2]).
    ``per_head``: each KV head's decoded error alone, [L, H, 2].

    Each probe [1, T] is split into a context (compressed with `codec`) and the last `continuation`
    tokens (scored). The errors are measured on the compressible tokens only: sinks and the window
    are stored exactly, so a probe sees what a restored cache gives the model. `layers` limits the
    probe to some layers (the others' entries are NaN).

    How it runs, not what it measures: ``prefilled`` (each probe's whole-sequence KV, e.g. from the
    held-out prefill) gives the context KV as a prefix slice instead of a second prefill (a causal
    model's KV of the first T - continuation tokens); a model with ``states_from_layer`` (``layerwise``,
    the default when it has one) reruns only layers l.. for layer l's variants, from the reference
    pass' hidden state entering layer l, with up to ``max_rows`` variants (probe sequences x keys /
    values) per forward. ``layerwise=False`` is the straightforward path: every variant a whole
    continuation from its own restored cache."""
    if not probes:
        raise ValueError("no probe sequences")
    if prefilled is not None and len(prefilled) != len(probes):
        raise ValueError(f"{len(prefilled)} prefilled caches for {len(probes)} probes")
    fast = isinstance(lm, LayerwiseProbeModel) if layerwise is None else layerwise
    if fast and not isinstance(lm, LayerwiseProbeModel):
        raise ValueError(
            "layerwise probing needs a model with continuation_states, states_from_layer and head_logits"
        )
    contexts = [
        _context_kv(lm, ids, continuation, None if prefilled is None else prefilled[i])
        for i, ids in enumerate(probes)
    ]
    if fast:
        return combine_measurements(
            _probe_layerwise(lm, codec, metric, layer_groups, contexts, layers, progress, max_rows, per_head)  # type: ignore[arg-type]
        )
    return combine_measurements(
        [_probe_one(lm, codec, metric, layer_groups, c, layers, progress, per_head) for c in contexts]
    )


def _context_kv(
    lm: ProbeModel, ids: torch.Tensor, continuation: int, prefilled: KVCache | None
) -> tuple[KVCache, torch.Tensor]:
    """(the context's exact KV, the continuation's ids) of one probe sequence."""
    if ids.shape[1] <= continuation:
        raise ValueError(
            f"a {ids.shape[1]}-token probe leaves no context before {continuation} scored tokens"
        )
    ctx, cont = ids[:, :-continuation], ids[:, -continuation:]
    if prefilled is None:
        return lm.prefill_kv(ctx), cont
    if prefilled.n_tokens != ids.shape[1] or prefilled.layer_start != 0:
        raise ValueError(
            f"a prefilled probe cache of {prefilled.n_tokens} tokens does not match "
            f"its {ids.shape[1]}-token sequence"
        )
    return prefilled.select_tokens(torch.arange(ctx.shape[1])), cont


def _probe_one(
    lm: ProbeModel,
    codec: KVTCCodec,
    metric: dict[str, tuple[torch.Tensor, float]],
    layer_groups: Sequence[tuple[int, int]],
    context: tuple[KVCache, torch.Tensor],
    layers: Sequence[int] | None,
    progress: bool,
    per_head: bool = False,
) -> dict[str, torch.Tensor]:
    kv, cont = context
    ref = lm.logits_with_cache(kv, cont)
    reference = reference_distribution(ref)
    rec = codec.decode(codec.encode(kv)).to(torch.float32)
    heads: list[int | None] = list(range(kv.keys.shape[1])) if per_head else [None]
    kl = torch.full((kv.n_layers, len(heads), 2), float("nan"), dtype=torch.float64)
    chosen = range(kv.n_layers) if layers is None else layers
    for layer in tqdm(chosen, desc="calibration: sensitivity probe", disable=not progress):
        for hi, head in enumerate(heads):
            for ki, kind in enumerate(("k", "v")):
                variant = _replaced(kv, rec, layer, kind, head)
                kl[layer, hi, ki] = output_kl(ref, lm.logits_with_cache(variant, cont), reference)
    err = KVCache(rec.keys - kv.keys, rec.values - kv.values, kv.positions)
    return {
        "kl": kl if per_head else kl[:, 0],
        "predicted": predicted_cost(metric, layer_groups, err, per_head),
    }


def _probe_layerwise(
    lm: LayerwiseProbeModel,
    codec: KVTCCodec,
    metric: dict[str, tuple[torch.Tensor, float]],
    layer_groups: Sequence[tuple[int, int]],
    contexts: Sequence[tuple[KVCache, torch.Tensor]],
    layers: Sequence[int] | None,
    progress: bool,
    max_rows: int,
    per_head: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The same KLs as ``_probe_one``, by layer restarts: layer l's key (value) variant differs from
    the reference pass only in layer l's cache, so layers 0..l-1 see the reference's inputs and
    produce its outputs; the run starts at layer l from the reference's hidden state there. Rows
    (probe, kind[, head]) that share a context length and continuation go through one forward, up to
    ``max_rows`` at a time."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n_heads = contexts[0][0].keys.shape[1]
    heads: list[int | None] = list(range(n_heads)) if per_head else [None]
    refs, references, hiddens, recs, out = [], [], [], [], []
    for kv, cont in contexts:
        ref, hidden = lm.continuation_states(kv, cont)
        rec = codec.decode(codec.encode(kv)).to(torch.float32)
        refs.append(ref)
        references.append(reference_distribution(ref))
        hiddens.append(hidden)
        recs.append(rec)
        err = KVCache(rec.keys - kv.keys, rec.values - kv.values, kv.positions)
        kl = torch.full((kv.n_layers, len(heads), 2), float("nan"), dtype=torch.float64)
        out.append({"kl": kl, "predicted": predicted_cost(metric, layer_groups, err, per_head)})
    n_layers = contexts[0][0].n_layers
    # rows that can share a forward: same context length, continuation length and first position
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for i, (kv, cont) in enumerate(contexts):
        first = int(kv.positions.max()) + 1 if kv.n_tokens else 0
        shapes.setdefault((kv.n_tokens, int(cont.shape[1]), first), []).append(i)
    rows_by_shape = [
        (first, [(i, ki, hi) for i in members for hi in range(len(heads)) for ki in (0, 1)])
        for (_, _, first), members in shapes.items()
    ]
    chosen = range(n_layers) if layers is None else layers
    buffer: torch.Tensor | None = None
    for layer in tqdm(chosen, desc="calibration: sensitivity probe", disable=not progress):
        for first, rows in rows_by_shape:
            for c in range(0, len(rows), max_rows):
                batch = rows[c : c + max_rows]
                keys = [_rows_kv(contexts, recs, batch, j, layer, 0, heads) for j in range(layer, n_layers)]
                values = [_rows_kv(contexts, recs, batch, j, layer, 1, heads) for j in range(layer, n_layers)]
                hidden = torch.stack([hiddens[i][layer] for i, _, _ in batch])
                states = lm.states_from_layer(layer, hidden, keys, values, first)
                shape = (*states.shape[:-1], refs[batch[0][0]].shape[-1])
                if buffer is None or buffer.shape != shape:  # one logits buffer for every restart
                    buffer = torch.empty(shape, dtype=torch.float32)
                logits = lm.head_logits(states, out=buffer)
                for r, (i, ki, hi) in enumerate(batch):
                    out[i]["kl"][layer, hi, ki] = output_kl(refs[i], logits[r], references[i])
    if not per_head:
        for m in out:
            m["kl"] = m["kl"][:, 0]
    return out


def _rows_kv(
    contexts: Sequence[tuple[KVCache, torch.Tensor]],
    recs: Sequence[KVCache],
    rows: Sequence[tuple[int, int, int]],
    j: int,
    layer: int,
    kind: int,
    heads: Sequence[int | None],
) -> torch.Tensor:
    """[rows, heads, T, dim]: layer j's context keys (kind 0) or values (kind 1) for each row (probe,
    kind decoded, head index into `heads`); a row holds the decoded tensor only at its own layer and
    kind (and head, where `heads` names one), the exact one elsewhere."""
    parts = []
    for i, ki, hi in rows:
        exact = contexts[i][0].keys[j] if kind == 0 else contexts[i][0].values[j]
        if j != layer or ki != kind:
            parts.append(exact)
            continue
        decoded = recs[i].keys[j] if kind == 0 else recs[i].values[j]
        head = heads[hi]
        if head is None:
            parts.append(decoded)
        else:
            mixed = exact.clone()
            mixed[head] = decoded[head]
            parts.append(mixed)
    return torch.stack(parts)


def combine_measurements(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Probes of several sequences (measured together, or one at a time and cached) as one: KL and
    predicted cost are sums over sequences, the factor their ratio."""
    kl = torch.stack([p["kl"] for p in parts]).sum(0)
    pred = torch.stack([p["predicted"] for p in parts]).sum(0)
    return {"kl": kl, "predicted": pred, "factor": kl.clamp_min(0) / pred.clamp_min(1e-30)}


def sensitivity_factors(
    measured: dict[str, torch.Tensor],
    power: float = 1.0,
    floor: float = 0.05,
    key_power: float | None = None,
) -> torch.Tensor:
    """[L, 2] (per head: [L, H, 2]) factors for ``ModelStatistics.layer_sensitivity``: the measured
    ratio, normalised to a geometric mean of 1 (only ratios between layers and kinds matter to one
    lambda), clamped from below (a layer whose probe KL is lost in the noise must not become free) and
    damped by `power` (`key_power`, if given, damps the key factors instead: their probe KL is ~7x
    smaller, so noisier)."""
    if bool(measured["factor"].isnan().any()):
        raise ValueError("sensitivity factors need every layer probed")
    f = measured["factor"].clamp_min(1e-30)
    f = f / f.log().mean().exp()
    powers = torch.tensor([power if key_power is None else key_power, power], dtype=f.dtype)
    return f.clamp_min(floor) ** powers


def shrink_head_factors(
    per_layer: dict[str, torch.Tensor], per_head: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """Per-head factors pulled toward their layer's: the geometric blend ``layer^(1-w) * head^w``
    ([L, H, 2], each probe first normalised to a geometric mean of 1). The per-head probe is noisier
    (split-half correlation 0.72 against 0.91 per layer, docs/benchmarks.md), so w < 1 keeps the
    per-layer ranking and moves bits between the heads of a layer only as far as the noise allows.
    The result is a measurement for ``sensitivity_factors`` (which damps and clamps it, and refuses
    an unprobed layer: a NaN in either probe stays NaN in the blend)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"shrink weight {weight} must lie in [0, 1]")
    layer, head = per_layer["factor"], per_head["factor"]
    if (
        layer.dim() != 2
        or head.dim() != 3
        or head.shape[0] != layer.shape[0]
        or head.shape[2] != layer.shape[1]
    ):
        raise ValueError(f"per-layer factors {tuple(layer.shape)} do not match per-head {tuple(head.shape)}")
    log_l = layer.clamp_min(1e-30).log()
    log_h = head.clamp_min(1e-30).log()
    blended = (1 - weight) * (log_l - log_l.mean())[:, None, :] + weight * (log_h - log_h.mean())
    return {"factor": blended.exp()}
