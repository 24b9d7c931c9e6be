"""The per-layer sensitivity probe: the metric's predicted cost is laid out per layer and kind and is
RoPE-invariant, a real probe finds every layer's decoded error costs the model something, the
single-layer costs add up to about the cost of all layers at once, and the measured factors change
the metric the calibration uses."""

from __future__ import annotations

import math

import pytest
import torch

from kvbm_codec.calibration.calibrate import token_sequences
from kvbm_codec.calibration.sensitivity import (
    measure_layer_sensitivity,
    output_kl,
    predicted_cost,
    reference_distribution,
    sensitivity_factors,
    shrink_head_factors,
)
from kvbm_codec.calibration.statistics import feature_weights, gather_statistics
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import ModelShape
from kvbm_codec.eval.metrics import kl_divergence_mean
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts


def test_predicted_cost_is_per_layer_and_kind_and_rotation_invariant() -> None:
    # one group of 2 layers, 1 head, dim 4: weights [layer, head, dim] flattened, factor 2
    wk = torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0, 5.0, 2.0, 5.0], dtype=torch.float64)
    wv = torch.ones(8, dtype=torch.float64)
    metric = {"g0.k": (wk, 2.0), "g0.v": (wv, 1.0)}
    keys = torch.zeros(2, 1, 3, 4)
    keys[1, 0, :, 1] = 1.0  # layer 1, dim 1 (weight 5) on every token
    values = torch.zeros(2, 1, 3, 4)
    values[0, 0, 0, :] = 3.0  # layer 0, one token of three, all dims
    cost = predicted_cost(metric, [(0, 2)], KVCache(keys, values, torch.arange(3)))
    assert cost[:, 0].tolist() == pytest.approx([0.0, 5.0 * 2.0])
    assert cost[:, 1].tolist() == pytest.approx([4 * 9.0 / 3, 0.0])
    # rotating a rotary pair (dims 1 and 3 here) leaves the weighted key energy unchanged
    a = 0.7
    rot = keys.clone()
    rot[1, 0, :, 1], rot[1, 0, :, 3] = math.cos(a), math.sin(a)
    assert predicted_cost(metric, [(0, 2)], KVCache(rot, values, torch.arange(3)))[1, 0] == pytest.approx(
        10.0
    )


def test_predicted_cost_per_head_splits_the_layer_cost() -> None:
    """Per KV head: each head's share of a layer's cost, summing to the per-layer cost."""
    # one group of 1 layer, 2 heads, dim 2: weights [layer, head, dim] flattened
    wk = torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64)
    metric = {"g0.k": (wk, 1.0), "g0.v": (torch.ones(4, dtype=torch.float64), 1.0)}
    keys = torch.ones(1, 2, 5, 2)
    values = torch.zeros(1, 2, 5, 2)
    values[0, 1] = 2.0
    err = KVCache(keys, values, torch.arange(5))
    heads = predicted_cost(metric, [(0, 1)], err, per_head=True)
    assert heads.shape == (1, 2, 2)
    assert heads[0, :, 0].tolist() == pytest.approx([2.0, 8.0])
    assert heads[0, :, 1].tolist() == pytest.approx([0.0, 8.0])
    torch.testing.assert_close(heads.sum(1), predicted_cost(metric, [(0, 1)], err))


def test_shrunk_head_factors_blend_the_layer_and_head_probes() -> None:
    layer = torch.tensor([[1.0, 4.0], [2.0, 8.0]])  # [L=2, kind]
    head = torch.tensor([[[1.0, 1.0], [9.0, 16.0]], [[4.0, 4.0], [4.0, 64.0]]])  # [L, H=2, kind]
    as_layer = shrink_head_factors({"factor": layer}, {"factor": head}, 0.0)["factor"]
    as_head = shrink_head_factors({"factor": layer}, {"factor": head}, 1.0)["factor"]
    norm = lambda f: f / f.log().mean().exp()  # noqa: E731 - only ratios matter to the allocator
    assert torch.allclose(as_layer, norm(layer)[:, None, :].expand(2, 2, 2))
    assert torch.allclose(as_head, norm(head))
    half = shrink_head_factors({"factor": layer}, {"factor": head}, 0.5)["factor"]
    assert torch.allclose(half, (as_layer * as_head).sqrt())  # the geometric midpoint
    with pytest.raises(ValueError, match="do not match"):
        shrink_head_factors({"factor": layer}, {"factor": head[:1]}, 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        shrink_head_factors({"factor": layer}, {"factor": head}, 1.5)


def test_sensitivity_factors_normalise_and_floor() -> None:
    measured = {"factor": torch.tensor([[4.0, 1.0], [1e-9, 1.0]], dtype=torch.float64)}
    f = sensitivity_factors(measured, floor=0.05)
    assert float(f.min()) == pytest.approx(0.05)  # a lost-in-the-noise layer does not become free
    assert float(f[0, 0] / f[0, 1]) == pytest.approx(4.0)
    half = sensitivity_factors(measured, power=0.5, floor=0.0)
    assert float(half[0, 0] / half[0, 1]) == pytest.approx(2.0)
    # key_power damps the key column only; the values keep `power`
    split = sensitivity_factors(measured, power=0.5, floor=0.0, key_power=1.0)
    assert torch.equal(split[:, 1], half[:, 1])
    assert float(split[0, 0]) == pytest.approx(float(half[0, 0]) ** 2)


@pytest.mark.slow
def test_probe_measures_each_layers_real_cost(smollm: CausalLM, small_calibration) -> None:
    """On the shared small calibration (its 20x allocation), with the attention metric from one
    probe prefill's statistics."""
    from kvbm_codec.calibration.calibrate import accumulate_covariances

    info = smollm.info
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
    cfg = small_calibration.config
    probe = token_sequences(smollm.tokenizer, calibration_texts(), 320, 6)[5]  # past its 4 fit sequences
    n_q = int(smollm.model.config.num_attention_heads)
    with gather_statistics(smollm.model, n_q, info.key_head_dim) as stats:
        accs = accumulate_covariances([smollm.prefill(probe, return_logits=False)[0]], cfg, info.rope, shape)
    groups = cfg.layer_groups(info.n_layers)
    metric = feature_weights(stats, accs, groups, info.n_kv_heads, "attention", info.rope.attention_scaling)
    codec = KVTCCodec(small_calibration, 20.0)
    some = [0, 7, 15, 29]  # four layers keep the test in seconds; production probes all of them
    measured = measure_layer_sensitivity(smollm, codec, metric, groups, [probe], continuation=48, layers=some)
    kl, pred = measured["kl"], measured["predicted"]
    assert kl.shape == pred.shape == (info.n_layers, 2)
    assert bool((pred > 0).all()) and bool((kl[some] > 0).all())
    assert bool(kl[1].isnan().all())
    with pytest.raises(ValueError, match="every layer"):
        sensitivity_factors(measured)
    # those layers' errors at once cost about the sum of their single-layer costs
    ctx, cont = probe[:, :-48], probe[:, -48:]
    kv = smollm.prefill(ctx, return_logits=False)[0]
    rec = codec.decode(codec.encode(kv)).to(torch.float32)
    keys, values = kv.keys.clone(), kv.values.clone()
    keys[some], values[some] = rec.keys[some], rec.values[some]
    together = kl_divergence_mean(
        smollm.logits_with_cache(kv, cont),
        smollm.logits_with_cache(KVCache(keys, values, kv.positions), cont),
    )
    assert 0.5 < float(kl[some].sum()) / together < 2.0
    # the factors reach the metric: scaling one layer's keys scales exactly that layer's key weights
    f = torch.ones(info.n_layers, 2, dtype=torch.float64)
    f[3, 0] = 10.0
    scaled = feature_weights(
        stats.with_sensitivity(f), accs, groups, info.n_kv_heads, "attention", info.rope.attention_scaling
    )
    (wp, fp), (ws, fs) = metric["g0.k"], scaled["g0.k"]
    ratio = (ws * fs) / (wp * fp)
    width = info.n_kv_heads * info.key_head_dim
    assert torch.allclose(ratio[3 * width : 4 * width], torch.full((width,), 10.0, dtype=torch.float64))
    assert torch.allclose(ratio[:width], torch.ones(width, dtype=torch.float64))
    assert torch.allclose(scaled["g0.v"][0] * scaled["g0.v"][1], metric["g0.v"][0] * metric["g0.v"][1])
    # per-head factors scale exactly that head's weights of that layer
    fh = torch.ones(info.n_layers, info.n_kv_heads, 2, dtype=torch.float64)
    fh[3, 1, 1] = 4.0
    by_head = feature_weights(
        stats.with_sensitivity(fh), accs, groups, info.n_kv_heads, "attention", info.rope.attention_scaling
    )
    (wv, fv), (hv, hf) = metric["g0.v"], by_head["g0.v"]
    ratio = (hv * hf) / (wv * fv)
    dv = info.value_head_dim
    at = (3 * info.n_kv_heads + 1) * dv
    expected = torch.ones_like(ratio)
    expected[at : at + dv] = 4.0
    assert torch.allclose(ratio, expected)
    with pytest.raises(ValueError, match="per-head factors"):
        feature_weights(
            stats.with_sensitivity(torch.ones(info.n_layers, info.n_kv_heads + 1, 2, dtype=torch.float64)),
            accs, groups, info.n_kv_heads, "attention", info.rope.attention_scaling,
        )  # fmt: skip


def test_measured_sensitivity_is_a_recipe_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (attention metric, measured sensitivity, power 0.5) and its variants never share a cache
    entry; an analytic calibration keeps the key it had before the fields existed; metrics without a layer
    scale stay analytic, and asking them for a measured one is refused."""
    import json

    from pydantic import BaseModel

    from kvbm_codec.calibration.cache import cache_key
    from kvbm_codec.codec.config import CodecConfig

    default = CodecConfig()
    assert (default.layer_sensitivity, default.sensitivity_power) == ("measured", 0.5)
    assert CodecConfig(distortion="mse").layer_sensitivity == "analytic"
    assert CodecConfig(distortion="attention_shape").layer_sensitivity == "analytic"
    with pytest.raises(ValueError, match="needs distortion 'attention'"):
        CodecConfig(distortion="mse", layer_sensitivity="measured")
    configs = (
        default,
        CodecConfig(sensitivity_power=1.0),
        CodecConfig(layer_sensitivity="analytic"),
        CodecConfig(distortion="mse"),
    )
    keys = [cache_key(c, 66, 1024, "broad") for c in configs]
    assert len(set(keys)) == 4
    # per-head factors are a recipe of their own; per-layer ones serialise as before the field existed
    heads = CodecConfig(sensitivity_heads=True)
    assert cache_key(heads, 66, 1024, "broad") not in keys
    assert "sensitivity_heads" not in default.model_dump_json()
    assert CodecConfig.model_validate_json(heads.model_dump_json()) == heads
    with pytest.raises(ValueError, match="needs layer_sensitivity='measured'"):
        CodecConfig(layer_sensitivity="analytic", sensitivity_heads=True)
    new_fields = {"layer_sensitivity", "sensitivity_power"}

    def before_the_fields(self: CodecConfig, **kw: object) -> str:
        d = json.loads(BaseModel.model_dump_json(self))
        return json.dumps({k: v for k, v in d.items() if k not in new_fields})

    monkeypatch.setattr(CodecConfig, "model_dump_json", before_the_fields)
    for cfg, key in zip(configs[2:], keys[2:], strict=True):
        assert cache_key(cfg, 66, 1024, "broad") == key


@pytest.mark.slow
def test_layerwise_probe_matches_the_straightforward_one(smollm: CausalLM, small_calibration) -> None:
    """The probe's fast execution (context KV sliced from the whole sequence's prefill, layers restarted
    from the reference pass' hidden state, keys/values variants of two sequences batched) measures the
    same KLs and predicted costs as one full continuation per variant from a second prefill."""
    info = smollm.info
    cfg = small_calibration.config
    seqs = token_sequences(smollm.tokenizer, calibration_texts(), 256, 7)[5:]  # past its 4 fit sequences
    groups = cfg.layer_groups(info.n_layers)
    ones = {
        name: (torch.ones(b.dim, dtype=torch.float64), 1.0) for name, b in small_calibration.bases.items()
    }
    codec = KVTCCodec(small_calibration, 20.0)
    some = [0, 1, 14, 29]
    plain = measure_layer_sensitivity(
        smollm, codec, ones, groups, seqs, continuation=32, layers=some, layerwise=False
    )
    fast = measure_layer_sensitivity(
        smollm, codec, ones, groups, seqs, continuation=32, layers=some,
        prefilled=[smollm.prefill_kv(s) for s in seqs], max_rows=3,
    )  # fmt: skip
    assert bool((plain["kl"][some] > 0).all())
    assert bool(fast["kl"][2].isnan().all())
    torch.testing.assert_close(fast["kl"][some], plain["kl"][some], rtol=2e-3, atol=1e-9)
    torch.testing.assert_close(fast["predicted"], plain["predicted"], rtol=1e-6, atol=0.0)
    # per KV head: the fast path agrees with the straightforward one, and each head's predicted cost is
    # its share of the layer's
    two = [0, 29]
    plain_h = measure_layer_sensitivity(
        smollm, codec, ones, groups, seqs[:1], continuation=32, layers=two, layerwise=False, per_head=True
    )
    fast_h = measure_layer_sensitivity(
        smollm, codec, ones, groups, seqs[:1], continuation=32, layers=two, max_rows=4, per_head=True
    )
    assert fast_h["kl"].shape == (info.n_layers, info.n_kv_heads, 2)
    assert bool((plain_h["kl"][two] > 0).all())
    torch.testing.assert_close(fast_h["kl"][two], plain_h["kl"][two], rtol=2e-3, atol=1e-9)
    one = measure_layer_sensitivity(smollm, codec, ones, groups, seqs[:1], continuation=32, layers=two)
    torch.testing.assert_close(fast_h["predicted"].sum(1), one["predicted"], rtol=1e-9, atol=0.0)
    short = smollm.prefill_kv(seqs[1][:, :200])
    with pytest.raises(ValueError, match="does not match"):
        measure_layer_sensitivity(smollm, codec, ones, groups, seqs[:1], continuation=32, prefilled=[short])


def test_output_kl_is_the_float64_kl_of_the_two_softmaxes() -> None:
    """The probe's KL (one exp pass over the variant's logits) is the textbook float64 KL of the two
    softmaxes, down to the tiny KLs one layer's codec error gives; the kept reference changes nothing."""
    g = torch.Generator().manual_seed(3)
    ref = 4 * torch.randn(16, 5000, generator=g)
    for noise in (1e-4, 1e-2, 1.0):
        out = ref + noise * torch.randn(16, 5000, generator=g)
        log_p = torch.log_softmax(ref.double(), -1)
        log_q = torch.log_softmax(out.double(), -1)
        textbook = float((log_p.exp() * (log_p - log_q)).sum() / 16)
        got = output_kl(ref, out)
        assert got == pytest.approx(textbook, rel=1e-8)
        assert output_kl(ref, out, reference_distribution(ref)) == got
