"""Attention layouts beyond SmolLM2's: each is supported (its keys de-rotate to exactly what the model
rotated, and it calibrates and round-trips through the codec) or refused with an error naming the
feature and the layers. Random-weight tiny models built in-process from transformers configs: seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)

from kvbm_codec.calibration.calibrate import calibrate_from_kv
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.eval.run import relative_mse
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM, UnsupportedModelError

VOCAB = 256


def _config(cls: type, **kw: object) -> object:
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
    )
    return cls(**{**common, **kw})


def _lm(config: object) -> CausalLM:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return CausalLM(model, None, "tiny", Path("in-process"))


def _pre_rope_keys(lm: CausalLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's keys before RoPE, [H, T, D], as the model computed them: the per-head key norm's
    output where the model has one (it runs between k_proj and RoPE), else k_proj's."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(lm.model.model.layers):
        attn = layer.self_attn
        norm = getattr(attn, "k_norm", None) or getattr(attn, "k_layernorm", None)

        def hook(_m: object, _i: object, out: torch.Tensor, i: int = i) -> None:
            captured[i] = out.detach().clone()

        handles.append((norm if norm is not None else attn.k_proj).register_forward_hook(hook))
    try:
        kv, _ = lm.prefill(ids)
    finally:
        for h in handles:
            h.remove()
    h, d, t = lm.info.n_kv_heads, lm.info.key_head_dim, ids.shape[1]
    # k_proj gives [1, T, H*D]; Qwen3's k_norm [1, T, H, D]; StableLM's per-head norm [1, H, T, D].
    pre = [
        captured[i][0] if captured[i].shape[1:] == (h, t, d) else captured[i].reshape(t, h, d).transpose(0, 1)
        for i in range(lm.info.n_layers)
    ]
    return pre, kv.keys


SUPPORTED = {
    "single-kv-head": lambda: _config(LlamaConfig, num_key_value_heads=1),
    "head-dim-128": lambda: _config(LlamaConfig, head_dim=128, num_hidden_layers=2),
    "head-dim-256": lambda: _config(LlamaConfig, head_dim=256, num_key_value_heads=1, num_hidden_layers=2),
    "qk-norm-qwen3": lambda: _config(Qwen3Config, head_dim=32),
    "qk-norm-stablelm": lambda: _config(StableLmConfig, qk_layernorm=True),
    "partial-rotary-phi": lambda: _config(PhiConfig, partial_rotary_factor=0.5),
    "partial-rotary-stablelm": lambda: _config(StableLmConfig, partial_rotary_factor=0.25),
    "qwen2-biases-theta-1e6": lambda: _config(
        Qwen2Config, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
}


@pytest.mark.parametrize("feature", sorted(SUPPORTED))
def test_supported_layer_kind_derotates_and_round_trips(feature: str) -> None:
    lm = _lm(SUPPORTED[feature]())
    info = lm.info
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 200), generator=g)

    pre, keys = _pre_rope_keys(lm, ids)
    positions = torch.arange(ids.shape[1])
    for layer, k_pre in enumerate(pre):
        torch.testing.assert_close(
            undo_rope(keys[layer], positions, info.rope), k_pre, atol=1e-4, rtol=1e-4, msg=f"layer {layer}"
        )
    if feature.startswith("partial-rotary"):
        assert info.rope.head_dim < info.key_head_dim  # really partial, and the pass-through dims agree

    # Calibrate (one basis per layer) on random-token prefills, then encode/decode another context.
    fit = [
        lm.prefill(torch.randint(0, VOCAB, (1, 320), generator=g), return_logits=False)[0] for _ in range(2)
    ]
    held = lm.prefill(torch.randint(0, VOCAB, (1, 320), generator=g), return_logits=False)[0]
    cfg = CodecConfig(layer_group_size=1, distortion="mse")  # no model statistics gathered here
    cal = calibrate_from_kv(info, fit, held, cfg, targets=(2.0,), progress=False)
    kv, _ = lm.prefill(ids, return_logits=False)
    codec = KVTCCodec(cal, 2.0)
    frame, stats = codec.encode_with_stats(kv)
    back = codec.decode(frame)
    assert stats.achieved_cr > 1.6
    # Random weights give near-isotropic KV, PCA's worst case, hence the modest 2x target; keys
    # re-rotated with the wrong angles or dims would be off by O(1) (relative MSE ~ 1-2), not ~1%.
    assert relative_mse(kv.keys, back.keys) < 0.02 and relative_mse(kv.values, back.values) < 0.02
    cont = torch.randint(0, VOCAB, (1, 16), generator=g)
    ref, got = lm.logits_with_cache(kv, cont), lm.logits_with_cache(back.to(torch.float32), cont)
    assert (ref.softmax(-1) - got.softmax(-1)).abs().max() < 0.05


@pytest.mark.parametrize("feature", sorted(SUPPORTED))
def test_kv_only_prefill_matches_full_prefill(feature: str) -> None:
    """Calibration's KV-only prefill stops after the last layer's cache update; in every supported
    architecture that update comes after the keys are normed and rotated, so the KV is bit-identical
    (two chunks: the second sees the cache the first left) and the last layer's MLP never runs."""
    lm = _lm(SUPPORTED[feature]())
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(2))
    ran: list[int] = []
    h = lm.model.model.layers[-1].mlp.register_forward_hook(lambda *_: ran.append(1))
    try:
        fast = lm.prefill_kv(ids, chunk_size=64)
        assert not ran
        full, _ = lm.prefill(ids, chunk_size=64, return_logits=False)
    finally:
        h.remove()
    assert len(ran) == 2
    assert torch.equal(fast.keys, full.keys) and torch.equal(fast.values, full.values)


@pytest.mark.parametrize("feature", sorted(SUPPORTED))
def test_layer_restarted_continuation_matches_a_whole_one(feature: str) -> None:
    """The sensitivity probe's layer restart: from the hidden state a reference continuation had
    entering layer l, with layer l's context keys replaced (one row) or its values (another), the
    logits equal whole continuations from the same replaced caches, in every supported architecture
    (q/k norms, partial rotary, biases, 1 KV head, head_dim 128 / 256)."""
    lm = _lm(SUPPORTED[feature]())
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(3))
    kv = lm.prefill_kv(ids[:, :64])
    cont = ids[:, 64:]
    ref, hidden = lm.continuation_states(kv, cont)
    torch.testing.assert_close(ref, lm.logits_with_cache(kv, cont), rtol=0, atol=0)
    g = torch.Generator().manual_seed(4)
    for layer in range(kv.n_layers):
        k2, v2 = kv.keys.clone(), kv.values.clone()
        k2[layer] += 0.1 * torch.randn(k2[layer].shape, generator=g)
        v2[layer] += 0.1 * torch.randn(v2[layer].shape, generator=g)
        rows = [KVCache(k2, kv.values, kv.positions), KVCache(kv.keys, v2, kv.positions)]
        restarted = lm.logits_from_layer(
            layer,
            hidden[layer][None].expand(2, -1, -1),
            [torch.stack([r.keys[j] for r in rows]) for j in range(layer, kv.n_layers)],
            [torch.stack([r.values[j] for r in rows]) for j in range(layer, kv.n_layers)],
            64,
        )
        for i, r in enumerate(rows):
            whole = lm.logits_with_cache(r, cont)
            torch.testing.assert_close(restarted[i], whole, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(whole, ref, atol=1e-6)  # the replaced layer did change the output
    assert len(lm.model.model.layers) == kv.n_layers  # the decoder's layer list is restored


REFUSED = {
    "sliding-window-layers": (
        lambda: _config(Qwen2Config, use_sliding_window=True, sliding_window=16, max_window_layers=1),
        r"sliding-window attention \(layer type 'sliding_attention', window 16\) in layers 1, 2",
    ),
    "sliding-window-everywhere": (
        lambda: _config(__import__("transformers").MistralConfig, sliding_window=16),
        r"sliding-window attention \(sliding_window=16\) in all 3 layers",
    ),
    "per-layer-rope-base": (
        lambda: _config(
            Gemma3TextConfig,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
        r"per-layer RoPE base: rope_theta 1000000.0 for full_attention \(layer 2\); "
        r"rope_theta 10000.0 for sliding_attention \(layers 0, 1\)",
    ),
    "partial-rotary-unsupported-type": (
        lambda: _config(
            LlamaConfig,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        ),
        r"partial rotary dims \(partial_rotary_factor=0.5\) in all 3 layers",
    ),
}


@pytest.mark.parametrize("feature", sorted(REFUSED))
def test_unsupported_layer_kind_is_refused_by_name(feature: str, tmp_path: Path) -> None:
    make, message = REFUSED[feature]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make()).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=message):
        CausalLM.load(str(tmp_path))


def test_gemma3_sliding_layers_named_too(tmp_path: Path) -> None:
    """A model with several unsupported features names every one, each with its layers."""
    torch.manual_seed(0)
    cfg = _config(
        Gemma3TextConfig,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        CausalLM.load(str(tmp_path))
    text = str(err.value)
    assert "model_type 'gemma3_text'" in text
    assert "sliding-window attention (layer type 'sliding_attention', window 16) in layers 0, 1" in text


def test_layer_with_other_head_dims_is_refused_by_layer() -> None:
    """Per-layer widths are read off the modules: a config cannot hide a layer with other head dims."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(LlamaConfig, head_dim=16))
    model.model.layers[2].self_attn.k_proj = torch.nn.Linear(64, 2 * 32, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"per-layer head dims: layer 2 differ"):
        CausalLM(model, None, "tiny", Path("in-process"))


def test_layer_with_its_own_rotary_module_is_refused_by_layer() -> None:
    """A per-layer RoPE base need not be announced in the config: a layer carrying its own rotary
    module (older Llama/Mistral code, remote-code models) would rotate with a base the calibration's
    one RotaryParams does not hold, so it is refused by layer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(LlamaConfig, head_dim=16))
    model.model.layers[1].self_attn.rotary_emb = type(model.model.rotary_emb)(model.config)
    with pytest.raises(UnsupportedModelError, match=r"per-layer RoPE modules in layer 1\b"):
        CausalLM(model, None, "tiny", Path("in-process"))
