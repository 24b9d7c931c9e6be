"""What an error in each KV feature costs the model: the distortion metric the PCA and the DP use.

Plain MSE on normalised features treats every key and value dimension alike, but the model does not
see keys and values, it sees attention logits and the attention block's output:

* A key error ``e`` (in the de-rotated space the codec works in) changes the logit of query ``q`` by
  ``q . R e / sqrt(d)``. RoPE rotates each frequency pair (i, i + d/2) by a position-dependent
  angle and preserves the pair's energy, so averaged over positions the expected squared logit error
  is ``sum_pairs E[q_i^2 + q_{i+d/2}^2] / 2 * (e_i^2 + e_{i+d/2}^2) / d``: each pair weighted by the
  query energy the model puts there, summed over the query heads sharing the KV head (GQA).
* A value error ``e`` reaches the residual stream as ``W_o^h e`` for each query head ``h`` reading
  the KV head: weight ``diag(sum_h W_o^h^T W_o^h)``.

``attention_shape`` uses these weights only inside each head (each head's weighted variance is
normalised, as the per-head normalisation does for MSE). ``attention`` also puts keys and values in
one unit: a logit error ``delta`` moves the attention output by about ``delta * W_o (v - o)``, so
key weights are multiplied by the value spread after ``o_proj`` (``tr(W_o^h C_v W_o^h^T)``), and
every layer's weights are divided by the energy of the residual stream entering it (an error the
size of a small residual matters more). The statistics are gathered by forward hooks in the same
prefills that feed the covariances (``gather_statistics``), plus the o_proj weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvbm_codec.codec.params import basis_name
from kvbm_codec.codec.pca import CovarianceAccumulator


@dataclass
class ModelStatistics:
    """Running sums (float64) over calibration tokens; additive across prefills and corpus domains."""

    query_sq_sum: torch.Tensor  # [L, Hq, d]: sum of q_i^2 per query dim (pre-RoPE)
    residual_sum: torch.Tensor  # [L]: sum of ||h||^2 / hidden of the residual entering each layer
    tokens: int
    o_proj_gram: torch.Tensor  # [L, Hq, dv, dv]: W_o^h^T W_o^h (weights, not a running sum)
    # [L, 2] (keys, values), or [L, H_kv, 2] per KV head: measured end-to-end factors
    # (calibration/sensitivity.py) that replace the residual-energy heuristic's layer and key/value
    # weighting; None keeps the analytic metric.
    layer_sensitivity: torch.Tensor | None = None

    @property
    def query_energy(self) -> torch.Tensor:
        return self.query_sq_sum / max(1, self.tokens)

    def key_weights(self, rotary_dim: int) -> torch.Tensor:
        """[L, Hq, d]: the expected squared logit change per unit de-rotated key error in each dim.
        RoPE rotates pair (i, i + r/2) of the first r = rotary_dim dims by a position-dependent angle
        and preserves the pair's energy, so averaged over positions both dims of a pair weigh half
        the pair's query energy; dims past r (partial rotary) pass through and weigh their own."""
        e = self.query_energy.clone()
        half = rotary_dim // 2
        pair = (e[..., :half] + e[..., half:rotary_dim]) / 2
        e[..., :half], e[..., half:rotary_dim] = pair, pair
        return e

    @property
    def residual_energy(self) -> torch.Tensor:
        return self.residual_sum / max(1, self.tokens)

    def merged(self, *others: ModelStatistics) -> ModelStatistics:
        return ModelStatistics(
            self.query_sq_sum + sum(o.query_sq_sum for o in others),
            self.residual_sum + sum(o.residual_sum for o in others),
            self.tokens + sum(o.tokens for o in others),
            self.o_proj_gram,
            self.layer_sensitivity,
        )

    def with_sensitivity(self, factors: torch.Tensor | None) -> ModelStatistics:
        return ModelStatistics(self.query_sq_sum, self.residual_sum, self.tokens, self.o_proj_gram, factors)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from kvbm_codec.models.fingerprint import decoder_layers

    return list(decoder_layers(model))


def o_proj_grams(model: torch.nn.Module, n_q_heads: int) -> torch.Tensor:
    out = []
    for layer in _attention_modules(model):
        w = layer.self_attn.o_proj.weight.detach().to(torch.float64)  # [hidden, Hq * dv]
        per_head = w.reshape(w.shape[0], n_q_heads, -1).permute(1, 0, 2)  # [Hq, hidden, dv]
        out.append(per_head.transpose(1, 2) @ per_head)
    return torch.stack(out)


@contextmanager
def gather_statistics(
    model: torch.nn.Module, n_q_heads: int, head_dim: int, weights_from: torch.nn.Module | None = None
) -> Iterator[ModelStatistics]:
    """Hooks on every layer's q_proj (queries before RoPE: pair energies are rotation invariant) and
    on every decoder layer's input (the residual stream), accumulating while the block runs. The
    o_proj grams are read from ``weights_from`` (default ``model``): a bf16 prefill copy hooks here
    while its float32 source gives exact weights."""
    layers = _attention_modules(model)
    n_layers = len(layers)
    stats = ModelStatistics(
        torch.zeros(n_layers, n_q_heads, head_dim, dtype=torch.float64),
        torch.zeros(n_layers, dtype=torch.float64),
        0,
        o_proj_grams(weights_from if weights_from is not None else model, n_q_heads),
    )
    handles = []
    lock = threading.Lock()  # calibration prefills several sequences at once (calibrate.calibration_kv)
    for i, layer in enumerate(layers):

        def on_query(_m: torch.nn.Module, _inp: object, out: torch.Tensor, i: int = i) -> None:
            q = out.detach().reshape(-1, n_q_heads, head_dim).to(torch.float64)
            with lock:
                stats.query_sq_sum[i] += (q**2).sum(0)
                if i == 0:
                    stats.tokens += q.shape[0]

        def on_layer(_m: torch.nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            h = h.detach().reshape(-1, h.shape[-1]).to(torch.float64)
            with lock:
                stats.residual_sum[i] += (h**2).mean(-1).sum()

        handles.append(layer.self_attn.q_proj.register_forward_hook(on_query))
        handles.append(layer.register_forward_pre_hook(on_layer, with_kwargs=True))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def feature_weights(
    stats: ModelStatistics,
    accumulators: dict[str, CovarianceAccumulator],
    layer_groups: list[tuple[int, int]],
    n_kv_heads: int,
    mode: str,
    attention_scaling: float = 1.0,
    rotary_dim: int | None = None,
) -> dict[str, tuple[torch.Tensor, float]]:
    """Per basis name ("g{i}.k" / "g{i}.v"): (diagonal metric [layers*heads*dim], scale factor).

    The metric is normalised so its weighted variance averages 1 per feature (keeps coefficients in
    fp16's comfortable range); the factor restores the absolute unit in the DP (ErrorTable.weight)
    for the ``attention`` mode, and is 1 for ``attention_shape``."""
    if mode not in ("attention", "attention_shape"):
        raise ValueError(f"no feature metric for distortion {mode!r}")
    dk = stats.query_sq_sum.shape[-1]
    qe = stats.key_weights(dk if rotary_dim is None else rotary_dim)  # [L, Hq, d]
    n_q = qe.shape[1]
    if n_q % n_kv_heads:
        raise ValueError(f"{n_q} query heads do not share {n_kv_heads} KV heads evenly")
    share = n_q // n_kv_heads
    gram = stats.o_proj_gram  # [L, Hq, dv, dv]
    out: dict[str, tuple[torch.Tensor, float]] = {}
    for gi, (a, b) in enumerate(layer_groups):
        v_name, k_name = basis_name(gi, "v"), basis_name(gi, "k")
        _, v_cov = accumulators[v_name].covariance()
        dv = gram.shape[-1]
        kw, vw = [], []
        for li, layer in enumerate(range(a, b)):
            sens = 1.0 / float(stats.residual_energy[layer]) if mode == "attention" else 1.0
            factors = stats.layer_sensitivity
            if factors is not None and factors.dim() == 3 and factors.shape[1] != n_kv_heads:
                raise ValueError(f"per-head factors for {factors.shape[1]} heads, the model has {n_kv_heads}")
            for k in range(n_kv_heads):
                sk = sv = 1.0
                if factors is not None:
                    sk, sv = (float(x) for x in (factors[layer, k] if factors.dim() == 3 else factors[layer]))
                heads = range(k * share, (k + 1) * share)
                vw.append(sum(gram[layer, h].diagonal() for h in heads) * sens * sv)
                off = (li * n_kv_heads + k) * dv
                c_v = v_cov[off : off + dv, off : off + dv]
                key = torch.zeros(dk, dtype=torch.float64)
                for h in heads:
                    spread = float((gram[layer, h] * c_v).sum()) if mode == "attention" else 1.0
                    key += qe[layer, h] * spread
                kw.append(key * (attention_scaling**2 / dk if mode == "attention" else 1.0) * sens * sk)
        for name, w in ((k_name, torch.cat(kw)), (v_name, torch.cat(vw))):
            _, cov = accumulators[name].covariance()
            factor = float((w * cov.diagonal().clamp_min(1e-12)).mean())
            out[name] = (w / factor, factor if mode == "attention" else 1.0)
    return out
