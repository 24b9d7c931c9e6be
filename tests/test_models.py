"""The model adapter against the real SmolLM2-135M: these are the facts every codec measurement relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

from kvbm_codec.codec.rope import apply_rope, undo_rope
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.kv import KVCache
from kvbm_codec.models.attention import GROUPED_SDPA
from kvbm_codec.models.fingerprint import model_fingerprint
from kvbm_codec.models.hf import CausalLM, UnsupportedModelError, kv_from_dynamic_cache, kv_to_dynamic_cache
from kvbm_codec.models.registry import cache_root, registered_names, resolve_model

CONTEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
    "the great lens, and wrote the weather in a leather notebook that his grandfather had started. Ships "
    "passed far out on the grey water, and sometimes one would signal with a lamp, three short flashes and "
    "a long one, which meant that all was well on board. In winter the storms came from the north, and the "
    "waves climbed the rocks until the spray reached the gallery rail."
)
CONTINUATION = " One night, during the worst storm of the year, he saw a small boat drifting toward the reef."


@pytest.fixture(scope="module")
def ids(smollm: CausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    return smollm.encode(CONTEXT), smollm.encode(CONTINUATION)


@pytest.fixture(scope="module")
def prefilled(smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor]) -> tuple[KVCache, torch.Tensor]:
    """One prefill of CONTEXT shared by the tests that only read it (the model never mutates a KVCache)."""
    return smollm.prefill(ids[0])


def _full_forward_logits(
    smollm: CausalLM, input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.inference_mode():
        return smollm.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[0].float()


@pytest.mark.slow
def test_info_matches_smollm2(smollm: CausalLM) -> None:
    info = smollm.info
    assert (info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim) == (30, 3, 64, 64)
    assert info.vocab_size == 49152 and info.name == "smollm2-135m"
    assert info.rope.head_dim == 64 and info.rope.attention_scaling == 1.0
    assert len(info.fingerprint) == 32 and info.fingerprint == model_fingerprint(smollm.model)


@pytest.mark.slow
def test_fingerprint_same_from_gguf_and_cache(smollm: CausalLM) -> None:
    cache_dir = cache_root() / "smollm2-135m"
    assert (cache_dir / "config.json").is_file() and not list(cache_dir.parent.glob(".smollm2-135m.tmp-*"))
    # Whichever path the fixture took, load the other one, so exactly one slow GGUF load happens.
    if smollm.loaded_from.suffix == ".gguf":
        other = CausalLM.load(str(cache_dir))
    else:
        other = CausalLM.load("smollm2-135m", use_cache=False)
        assert other.loaded_from.suffix == ".gguf"
    assert other.info.fingerprint == smollm.info.fingerprint
    torch.testing.assert_close(other.info.rope.inv_freq, smollm.info.rope.inv_freq, rtol=0, atol=0)
    # every weight and the vocabulary, not just the fingerprinted projections (the GGUF path parses
    # the file once for config, weights and tokenizer: models/hf.py _gguf_parsed_once)
    a, b = other.model.state_dict(), smollm.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.tokenizer.get_vocab() == smollm.tokenizer.get_vocab()
    import gguf

    assert isinstance(gguf.GGUFReader, type)  # the load put gguf's own reader back


@pytest.mark.slow
def test_prefill_shapes_and_chunking(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], prefilled: tuple[KVCache, torch.Tensor]
) -> None:
    context, _ = ids
    t = context.shape[1]
    kv, logits = prefilled
    assert kv.keys.shape == (30, 3, t, 64) and kv.values.shape == (30, 3, t, 64)
    assert kv.keys.dtype == torch.float32 and logits.shape == (t, 49152)
    assert torch.equal(kv.positions, torch.arange(t))
    kv_chunked, logits_chunked = smollm.prefill(context, chunk_size=40)
    torch.testing.assert_close(kv_chunked.keys, kv.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv_chunked.values, kv.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_chunked, logits, atol=1e-4, rtol=1e-4)
    _, last = smollm.prefill(context, chunk_size=40, return_logits=False)
    torch.testing.assert_close(last, logits[-1:], atol=1e-4, rtol=1e-4)


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    calls = dict.fromkeys(modules, 0)
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, n=n: calls.__setitem__(n, calls[n] + 1))
        for n, m in modules.items()
    ]
    return calls, handles


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1024, 40])
def test_prefill_kv_is_bit_identical_and_skips_the_tail(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], chunk_size: int
) -> None:
    """Calibration's KV-only prefill: the same KV and the same attention statistics, bit for bit, as
    the full prefill, while the last layer's MLP and o_proj, the final norm and the LM head never run."""
    from kvbm_codec.calibration.statistics import gather_statistics

    context, _ = ids
    model = smollm.model
    last = model.model.layers[-1]
    tail = {
        "mlp": last.mlp,
        "o_proj": last.self_attn.o_proj,
        "norm": model.model.norm,
        "lm_head": model.lm_head,
    }
    runs = []
    for kv_only in (False, True):
        calls, handles = _count_calls(tail)
        try:
            with gather_statistics(model, int(model.config.num_attention_heads), 64) as stats:
                if kv_only:
                    kv = smollm.prefill_kv(context, chunk_size=chunk_size)
                else:
                    kv = smollm.prefill(context, chunk_size=chunk_size, return_logits=False)[0]
        finally:
            for h in handles:
                h.remove()
        runs.append((kv, stats, calls))
    (full, s_full, c_full), (fast, s_fast, c_fast) = runs
    chunks = -(-context.shape[1] // chunk_size)
    assert c_full == dict.fromkeys(tail, chunks) and c_fast == dict.fromkeys(tail, 0)
    assert torch.equal(fast.keys, full.keys) and torch.equal(fast.values, full.values)
    assert torch.equal(fast.positions, full.positions) and fast.layer_start == 0
    assert s_fast.tokens == s_full.tokens == context.shape[1]
    assert torch.equal(s_fast.query_sq_sum, s_full.query_sq_sum)
    assert torch.equal(s_fast.residual_sum, s_full.residual_sum)
    # The cache stays usable: a continuation from it is the full prefill's continuation.
    cont = ids[1]
    assert torch.equal(smollm.logits_with_cache(fast, cont), smollm.logits_with_cache(full, cont))


@pytest.mark.slow
def test_rope_matches_model(smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    """undo_rope(cache keys) must be exactly what layer 0's k_proj produced, else PCA sees rotated keys."""
    context, _ = ids
    captured: list[torch.Tensor] = []
    k_proj = smollm.model.model.layers[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        kv, _ = smollm.prefill(context)
    finally:
        handle.remove()
    t, h, d = context.shape[1], smollm.info.n_kv_heads, smollm.info.key_head_dim
    k_pre = captured[0][0].view(t, h, d).transpose(0, 1)  # [H, T, D]
    rope = smollm.info.rope
    torch.testing.assert_close(undo_rope(kv.keys[0], kv.positions, rope), k_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rope(k_pre, kv.positions, rope), kv.keys[0], atol=1e-4, rtol=1e-4)
    roundtrip = apply_rope(undo_rope(kv.keys, kv.positions, rope), kv.positions, rope)
    torch.testing.assert_close(roundtrip, kv.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_logits_with_cache_equals_full_forward(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], prefilled: tuple[KVCache, torch.Tensor]
) -> None:
    context, cont = ids
    kv, _ = prefilled
    keys_before = kv.keys.clone()
    got = smollm.logits_with_cache(kv, cont)
    full = _full_forward_logits(smollm, torch.cat([context, cont], dim=1))
    torch.testing.assert_close(got, full[context.shape[1] :], atol=1e-4, rtol=1e-4)
    assert torch.equal(kv.keys, keys_before), "logits_with_cache must not modify the cache"
    assert top1_agreement(full[context.shape[1] :], got) == 1.0
    assert kl_divergence_mean(full[context.shape[1] :], got) < 1e-6


def test_grouped_kv_heads_reach_the_attention_kernel_uncopied_with_the_same_numbers(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], prefilled: tuple[KVCache, torch.Tensor]
) -> None:
    """Models load on models/attention.py's SDPA, which hands a masked call's grouped KV heads to the
    kernel as they are (transformers' own SDPA repeats them first): a continuation after a cache, the
    masked case, and a whole prefill give bit-identical logits and KV either way."""
    context, cont = ids
    kv, _ = prefilled
    assert smollm.model.config._attn_implementation == GROUPED_SDPA
    grouped = smollm.logits_with_cache(kv, cont)
    grouped_kv = smollm.prefill_kv(context)
    smollm.model.set_attn_implementation("sdpa")
    try:
        stock = smollm.logits_with_cache(kv, cont)
        stock_kv = smollm.prefill_kv(context)
    finally:
        smollm.model.set_attn_implementation(GROUPED_SDPA)
    assert torch.equal(grouped, stock)
    assert torch.equal(grouped_kv.keys, stock_kv.keys) and torch.equal(grouped_kv.values, stock_kv.values)


@pytest.mark.slow
def test_sparsified_cache_matches_masked_forward(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], prefilled: tuple[KVCache, torch.Tensor]
) -> None:
    """Evicting tokens after prefill == the continuation not attending to them, at their true positions."""
    context, cont = ids
    t, n = context.shape[1], cont.shape[1]
    kv, _ = prefilled
    keep = torch.ones(t, dtype=torch.bool)
    keep[10 : t // 2] = False
    sparse = kv.select_tokens(keep.nonzero().squeeze(1))
    assert sparse.n_tokens < t and int(sparse.positions.max()) == t - 1
    got = smollm.logits_with_cache(sparse, cont)
    assert got.shape == (n, 49152) and torch.isfinite(got).all()

    allowed = torch.ones(t + n, t + n, dtype=torch.bool).tril()
    allowed[t:, :t] &= keep
    mask = torch.zeros(1, 1, t + n, t + n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = _full_forward_logits(smollm, torch.cat([context, cont], dim=1), mask)[t:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_generate_and_dynamic_cache_round_trip(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor], prefilled: tuple[KVCache, torch.Tensor]
) -> None:
    context, _ = ids
    t = context.shape[1]
    full_kv, logits = prefilled
    kv = full_kv.select_tokens(torch.arange(t - 1))  # a causal prefix of a cache is the prefix's cache
    back = kv_from_dynamic_cache(kv_to_dynamic_cache(kv), kv.positions)
    assert torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)
    tokens = smollm.generate(kv, context[:, -1:], max_new_tokens=5, stop_at_eos=False)
    assert len(tokens) == 5
    assert tokens[0] == int(logits[-1].argmax())
    assert 1.0 < perplexity(logits[:-1], context[0, 1:]) < 1000.0


def test_unknown_model_name_lists_registered() -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as err:
        resolve_model("no-such-model-xyz")
    assert "no-such-model-xyz" in str(err.value)
    assert "smollm2-135m" in registered_names()


def _tiny(cls: type, **kw: object) -> object:
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    return cls(**{**common, **kw})


@pytest.mark.parametrize(
    ("config", "feature"),
    [
        (
            lambda: _tiny(Qwen2Config, use_sliding_window=True, sliding_window=16, max_window_layers=0),
            "sliding_attention",
        ),
        (lambda: _tiny(MistralConfig, sliding_window=16), "sliding_window"),
        (
            lambda: _tiny(
                LlamaConfig, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
            ),
            "dynamic",
        ),
    ],
    ids=["qwen2-sliding-layers", "mistral-sliding-window", "llama-dynamic-rope"],
)
def test_unsupported_architecture_names_feature(tmp_path: Path, config, feature: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config()).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=feature):
        CausalLM.load(str(tmp_path))


def test_unsupported_model_type(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        CausalLM.load(str(tmp_path))


def test_gqa_and_unequal_head_dims_in_info() -> None:
    from kvbm_codec.models.hf import model_info

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny(LlamaConfig, head_dim=16))
    info = model_info(model, "tiny")
    assert (info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim) == (2, 2, 16, 16)
    for layer in model.model.layers:  # values may be wider than keys (e.g. MLA-decompressed caches)
        layer.self_attn.v_proj = torch.nn.Linear(32, 2 * 24, bias=False)
    assert model_info(model, "tiny").value_head_dim == 24
    before = info.fingerprint
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] += 1.0
    assert model_fingerprint(model) != before
    kv = KVCache(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 24), torch.arange(3))
    assert kv_from_dynamic_cache(kv_to_dynamic_cache(kv), kv.positions).value_head_dim == 24


@pytest.mark.slow
def test_bf16_twin_keeps_the_source_and_rotary_frequencies_exact(
    smollm: CausalLM, ids: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Calibration's bf16 prefill copy (CausalLM.in_dtype): the float32 model is untouched, the rotary
    buffers stay float32 (``model.to(bf16)`` rounds inv_freq, rotating keys by angles off by ~0.4% x
    position, which the codec's exact de-rotation would not undo), and its KV is the source's up to
    bf16 rounding."""
    context, _ = ids
    before = smollm.model.model.layers[3].mlp.up_proj.weight.detach().clone()
    twin = smollm.in_dtype(torch.bfloat16)
    assert twin.info is smollm.info and twin.tokenizer is smollm.tokenizer
    assert smollm.in_dtype(torch.float32) is smollm
    assert {p.dtype for p in twin.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in smollm.model.parameters()} == {torch.float32}
    assert {b.dtype for b in twin.model.buffers()} == {torch.float32}
    assert torch.equal(smollm.model.model.layers[3].mlp.up_proj.weight, before)

    exact, cheap = smollm.prefill_kv(context), twin.prefill_kv(context)
    assert cheap.keys.dtype == torch.float32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean() / b.pow(2).mean())

    # bf16 rounding through 30 layers: ~1e-4 of the KV's power; a bf16 inv_freq gives ~1e-2 on keys
    assert rel(cheap.keys, exact.keys) < 2e-3
    assert rel(cheap.values, exact.values) < 2e-3
    # de-rotating with the model's true frequencies recovers the bf16 copy's own pre-RoPE keys
    captured: list[torch.Tensor] = []
    k_proj = twin.model.model.layers[5].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        twin.prefill_kv(context)
    finally:
        handle.remove()
    t, h, d = context.shape[1], smollm.info.n_kv_heads, smollm.info.key_head_dim
    k_pre = captured[0][0].view(t, h, d).transpose(0, 1)
    assert rel(undo_rope(cheap.keys[5], cheap.positions, smollm.info.rope), k_pre) < 1e-4


def test_prefill_dtype_names() -> None:
    from kvbm_codec.models.hf import fast_prefill_dtype, resolve_prefill_dtype

    assert resolve_prefill_dtype("auto") == fast_prefill_dtype() in ("float32", "bfloat16")
    assert resolve_prefill_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="prefill dtype must be auto, float32 or bfloat16; got 'fp8'"):
        resolve_prefill_dtype("fp8")
