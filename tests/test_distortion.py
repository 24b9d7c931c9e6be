"""The distortion metric: statistics gathered in prefills match the model's own tensors, the weighted
PCA is exact where it should be, merged covariance sums equal one pass, and a metric calibration
round-trips and says which distortion it minimised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvbm_codec.calibration import artifact
from kvbm_codec.calibration.artifact import load_calibration, save_calibration
from kvbm_codec.calibration.calibrate import calibrate, token_sequences
from kvbm_codec.calibration.statistics import feature_weights, gather_statistics
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.pca import CovarianceAccumulator
from kvbm_codec.models.fingerprint import decoder_layers
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts


def test_merged_accumulators_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 24, generator=g) * torch.linspace(0.1, 5, 24) + 40.0
    one = CovarianceAccumulator(24)
    one.add(x)
    parts = [CovarianceAccumulator(24) for _ in range(3)]
    for i, acc in enumerate(parts):
        acc.add(x[i * 1000 : (i + 1) * 1000])
    merged = parts[0].merged(*parts[1:])
    m1, c1 = one.covariance()
    m2, c2 = merged.covariance()
    assert merged.count == one.count
    assert torch.allclose(m1, m2, atol=1e-6)
    assert torch.allclose(c1, c2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        one.merged(CovarianceAccumulator(8))


def test_weighted_pca_minimises_weighted_error() -> None:
    """With a metric, the basis is the PCA of sqrt(w)-whitened features: at reduced rank its weighted
    reconstruction error is the discarded weighted variance, below that of the unweighted basis."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    w = torch.linspace(0.01, 10, 16)
    acc = CovarianceAccumulator(16)
    acc.add(x)
    weighted, plain = acc.finalize(6, weight=w), acc.finalize(6)

    def werr(b) -> float:
        rec = b.reconstruct(b.project(x))
        return float((((rec - x) ** 2) * w).sum(1).mean())

    assert werr(weighted) < 0.9 * werr(plain)
    assert werr(weighted) == pytest.approx(weighted.residual_variance, rel=0.02)
    full = acc.finalize(16, weight=w)
    assert torch.allclose(full.reconstruct(full.project(x)), x, atol=1e-3)
    per_head = acc.finalize(16, norm_block=8, weight=w)  # each head's weighted variance = 8
    z = per_head.normalise(x)
    assert torch.allclose(z.pow(2).mean(0).reshape(2, 8).sum(1), torch.full((2,), 8.0), rtol=0.02)


@pytest.mark.slow
def test_statistics_match_the_models_tensors(smollm: CausalLM) -> None:
    ids = token_sequences(smollm.tokenizer, calibration_texts(), 200, 1)[0]
    model = smollm.model
    n_q, d = int(model.config.num_attention_heads), smollm.info.key_head_dim
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []
    h = layers[7].self_attn.q_proj.register_forward_hook(lambda _m, _i, out: captured.append(out[0].clone()))
    try:
        with gather_statistics(model, n_q, d) as stats:
            smollm.prefill(ids, return_logits=False)
    finally:
        h.remove()
    q = captured[0].double().reshape(-1, n_q, d)
    assert stats.tokens == ids.shape[1]
    assert torch.allclose(stats.query_energy[7], (q**2).mean(0), rtol=1e-6)
    pair = ((q[..., : d // 2] ** 2 + q[..., d // 2 :] ** 2) / 2).mean(0)
    assert torch.allclose(stats.key_weights(d)[7], torch.cat([pair, pair], -1), rtol=1e-6)
    partial = stats.key_weights(d // 2)[7]  # partial rotary: the second half passes through
    assert torch.allclose(partial[:, d // 2 :], (q[..., d // 2 :] ** 2).mean(0), rtol=1e-6)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert float(stats.residual_energy[12]) == pytest.approx(
        float(hidden[12].double().pow(2).mean()), rel=1e-4
    )
    w_o = layers[3].self_attn.o_proj.weight.double()[:, 2 * d : 3 * d]
    assert torch.allclose(stats.o_proj_gram[3, 2], w_o.T @ w_o)

    accs = {}
    for name, dim in (("g0.k", 2 * smollm.info.n_kv_heads * d), ("g0.v", 2 * smollm.info.n_kv_heads * d)):
        accs[name] = CovarianceAccumulator(dim)
        accs[name].add(torch.randn(50, dim))
    for mode in ("attention", "attention_shape"):
        metric = feature_weights(stats, accs, [(0, 2)], smollm.info.n_kv_heads, mode)
        k, _ = metric["g0.k"]
        # each rotary pair (i, i + d/2) carries one weight: RoPE mixes the two dims of a pair
        head0 = k[:d]
        assert torch.allclose(head0[: d // 2], head0[d // 2 :])
        assert bool((k > 0).all())
    with pytest.raises(ValueError, match="no feature metric"):
        feature_weights(stats, accs, [(0, 2)], smollm.info.n_kv_heads, "mse")


@pytest.mark.slow
def test_attention_calibration_round_trips_and_records_its_distortion(
    smollm: CausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cal = calibrate(
        smollm,
        calibration_texts(),
        CodecConfig(layer_group_size=6, distortion="attention", layer_sensitivity="analytic"),
        targets=(20.0,),
        fit_sequences=2,
        seq_len=512,
        progress=False,
    )
    assert cal.provenance["distortion"] == "attention"
    weights = {n: t.weight for n, t in cal.error_tables.items()}
    assert len(set(weights.values())) == len(weights)  # absolute units: every basis has its own factor
    path = tmp_path / "attn.kvtc"
    save_calibration(cal, path)
    loaded = load_calibration(path)
    assert loaded.config.distortion == "attention"
    assert {n: t.weight for n, t in loaded.error_tables.items()} == pytest.approx(weights)
    ids = token_sequences(smollm.tokenizer, calibration_texts(), 512, 30)[25]
    kv = smollm.prefill(ids, return_logits=False)[0]
    codec = KVTCCodec(loaded, 20.0)
    frame, stats = codec.encode_with_stats(kv)
    assert stats.achieved_cr > 10
    restored = codec.decode(frame)
    rel = float((restored.values - kv.values).pow(2).sum() / kv.values.pow(2).sum())
    assert rel < 0.5

    # A header written before the distortion field existed is read as a plain-MSE calibration.
    header = artifact._header

    def old_header(c):
        h = header(c)
        return {**h, "config": {k: v for k, v in h["config"].items() if k != "distortion"}}

    monkeypatch.setattr(artifact, "_header", old_header)
    save_calibration(loaded, tmp_path / "old.kvtc")
    monkeypatch.undo()
    assert load_calibration(tmp_path / "old.kvtc").config.distortion == "mse"
    # and one written before the layer_sensitivity field as an analytic one (not today's default)
    new_fields = {"layer_sensitivity", "sensitivity_power"}

    def older_header(c):
        h = header(c)
        return {**h, "config": {k: v for k, v in h["config"].items() if k not in new_fields}}

    monkeypatch.setattr(artifact, "_header", older_header)
    save_calibration(loaded, tmp_path / "older.kvtc")
    monkeypatch.undo()
    older = load_calibration(tmp_path / "older.kvtc").config
    assert (older.distortion, older.layer_sensitivity, older.sensitivity_power) == (
        "attention",
        "analytic",
        1.0,
    )
    with pytest.raises(ValueError):
        CodecConfig(distortion="logits")  # type: ignore[arg-type]


def test_mixed_held_out_takes_an_equal_compressible_slice_of_each_domain() -> None:
    from kvbm_codec.calibration.calibrate import mixed_held_out
    from kvbm_codec.kv import KVCache

    cfg = CodecConfig()
    kvs = []
    for i in range(3):
        k = torch.full((2, 1, 600, 8), float(i))
        kvs.append(KVCache(k, k.clone(), torch.arange(600)))
    mixed = mixed_held_out(kvs, cfg, 300)
    assert mixed.n_tokens == 300
    assert [float(mixed.keys[0, 0, j, 0]) for j in (0, 100, 200)] == [0.0, 1.0, 2.0]
    pos = mixed.positions
    assert bool((pos >= cfg.sink_tokens).all()) and bool((pos < 600 - cfg.window_tokens).all())


@pytest.mark.slow
def test_calibration_from_a_corpus_of_domains(
    smollm: CausalLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default path: per-domain fit counts, each domain's next sequence held out and mixed, and the
    sensitivity probe run on each domain's held-out sequence (a timed phase, shown), every layer getting
    a factor from a real, non-zero output KL; the artifact keeps the recipe and the factors."""
    from kvbm_codec.calibration.corpus import code_texts, docs_texts

    corpus = {"docs": docs_texts(30_000), "code": code_texts(30_000)}
    cal = calibrate(
        smollm,
        corpus,
        CodecConfig(layer_group_size=6),
        targets=(20.0,),
        fit_sequences={"docs": 2, "code": 1},
        seq_len=512,
        progress=True,
    )
    assert "calibration: sensitivity probe took" in capsys.readouterr().err
    assert cal.config.distortion == "attention"  # the default
    prov = cal.provenance["layer_sensitivity"]
    factors, kl = torch.tensor(prov["factors"]), torch.tensor(prov["probe_kl"])
    assert factors.shape == kl.shape == (smollm.info.n_layers, 2) and prov["probe_sequences"] == 2
    assert bool((kl > 0).all())  # every layer's decoded error moves the output
    assert float(factors.min()) >= 0.05**0.5 - 1e-4  # the floor, square-rooted by the default power
    assert float(factors.max() / factors.min()) > 2  # the local metric does not price layers alike
    save_calibration(cal, tmp_path / "default.kvtc")
    again = load_calibration(tmp_path / "default.kvtc")
    assert (again.config.layer_sensitivity, again.config.sensitivity_power) == ("measured", 0.5)
    assert again.provenance["layer_sensitivity"] == prov
    assert cal.provenance["domains"] == {"docs": 2, "code": 1}
    assert cal.provenance["fit_tokens"] == 3 * 512
    # an equal slice of each domain's held-out compressible tokens, 512 in all
    assert cal.provenance["held_out_tokens"] == 512
    assert "cr20" in cal.allocations
