"""The Hugging Face adapter: loads a causal LM, runs prefill, and converts its cache to/from `KVCache`.

The codec only ever sees `KVCache`; this module is where transformers' moving API surface is contained
(the `cache=` keyword of 5.x, DynamicCache's per-layer objects, GGUF de-quantization on load).
Everything is float32 on CPU: bf16 matmuls are ~5x slower on AVX2-only machines, and the codec's error
measurements must not be polluted by the model's own rounding. The one exception is ``CausalLM.in_dtype``:
calibration's covariance prefills, which only gather statistics, can run on a bf16 copy when asked
(``kvbm-codec calibrate --prefill-dtype``). Float32 matmuls themselves may run on oneDNN's bf16 path at
float32 accuracy (core/matmul.py), which every kvbm-codec command sets up, not this module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from kvbm_codec.api.types import DEFAULT_MODEL
from kvbm_codec.codec.rope import RotaryParams
from kvbm_codec.kv import KVCache
from kvbm_codec.models.attention import GROUPED_SDPA
from kvbm_codec.models.fingerprint import decoder_layers, model_fingerprint
from kvbm_codec.models.registry import ModelSource, cache_root, resolve_model

# Architectures whose attention is plain MHA/GQA/MQA with HF rotate_half RoPE applied to k_proj's output
# (after a per-head key norm where the model has one: Qwen3, StableLM's qk_layernorm), and whose decoder
# layers sit at model.model.layers[i].self_attn.{k,v}_proj. Others may work but are unchecked.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "stablelm"})
# Models whose partial rotary rotates the first 2 * len(inv_freq) dims of each head and passes the rest
# through (GPT-NeoX convention), which is what codec.rope does with a short inv_freq.
PARTIAL_ROPE_MODEL_TYPES = frozenset({"phi", "stablelm"})
# RoPE variants whose inv_freq is fixed at load; "dynamic"/"longrope" change it with sequence length,
# so a RotaryParams captured once would be wrong for long inputs.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
DEFAULT_CHUNK = 1024
_SOURCE_MARKER = "kvbm_codec_source.json"


class UnsupportedModelError(ValueError):
    """The model's attention differs from what the codec's KV layout and RoPE handling assume."""


@dataclass(frozen=True)
class ModelInfo:
    """What the codec needs to know about a model, with no reference to the model object itself."""

    name: str
    n_layers: int
    n_kv_heads: int
    key_head_dim: int
    value_head_dim: int
    rope: RotaryParams
    fingerprint: str
    vocab_size: int


def _layer_list(layers: Sequence[int], n_layers: int) -> str:
    """'all 24 layers' or 'layers 0, 6, 12' (the first 8, then a count), for error messages."""
    if len(layers) == n_layers:
        return f"all {n_layers} layers"
    shown = ", ".join(str(i) for i in layers[:8])
    more = f", ... ({len(layers)} of {n_layers})" if len(layers) > 8 else ""
    return f"layer{'s' if len(layers) > 1 else ''} {shown}{more}"


def _layer_type_problems(config: Any, n_layers: int) -> list[str]:
    """Layers whose attention differs from full causal attention, named by layer.

    The codec's KV layout is one [layers, heads, tokens, dim] tensor: a sliding-window layer's cache
    holds only its window (fewer tokens than the full layers), a chunked layer's only its chunk, so
    such a model cannot be stored without per-layer token sets; refused rather than coded wrong.
    """
    layer_types = list(getattr(config, "layer_types", None) or [])
    problems: list[str] = []
    for kind in sorted({t for t in layer_types if t != "full_attention"}):
        idx = [i for i, t in enumerate(layer_types) if t == kind]
        where = _layer_list(idx, n_layers)
        if kind == "sliding_attention":
            window = getattr(config, "sliding_window", None)
            problems.append(
                f"sliding-window attention (layer type 'sliding_attention', window {window}) in {where}: "
                "their cache holds only the window"
            )
        elif kind == "chunked_attention":
            problems.append(f"chunked attention (layer type 'chunked_attention') in {where}")
        else:
            problems.append(f"layer type {kind!r} in {where} (only 'full_attention' is supported)")
    # With layer_types present, they alone say which layers slide (Qwen2 keeps sliding_window set even
    # when max_window_layers leaves every layer full); without them, a set window applies everywhere.
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and not layer_types:
        problems.append(
            f"sliding-window attention (sliding_window={window}) in "
            f"{_layer_list(range(n_layers), n_layers)}: their cache holds only the window"
        )
    return problems


def _rope_problems(config: Any, n_layers: int) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        return [f"rope_parameters of type {type(rope).__name__}"]
    problems: list[str] = []
    per_type = {k: v for k, v in rope.items() if isinstance(v, dict)}
    if per_type:
        # {layer type: rope params}: each kind of layer rotates keys with its own base (Gemma 3).
        layer_types = list(getattr(config, "layer_types", None) or [])
        parts = []
        for kind, params in sorted(per_type.items()):
            idx = [i for i, t in enumerate(layer_types) if t == kind]
            parts.append(f"rope_theta {params.get('rope_theta')} for {kind} ({_layer_list(idx, n_layers)})")
        problems.append("per-layer RoPE base: " + "; ".join(parts))
        return problems
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        problems.append(f"rope_type {rope_type!r} (supported: {', '.join(sorted(STATIC_ROPE_TYPES))})")
    partial = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0 and getattr(config, "model_type", None) not in PARTIAL_ROPE_MODEL_TYPES:
        problems.append(
            f"partial rotary dims (partial_rotary_factor={partial}) in "
            f"{_layer_list(range(n_layers), n_layers)} "
            f"(supported for {', '.join(sorted(PARTIAL_ROPE_MODEL_TYPES))})"
        )
    return problems


def unsupported_features(config: Any) -> list[str]:
    """Every reason the config is outside what the codec handles, so one error can name them all."""
    problems: list[str] = []
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {model_type!r} (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    problems += _layer_type_problems(config, n_layers)
    problems += _rope_problems(config, n_layers)
    if getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder architecture")
    return problems


def check_supported(config: Any) -> None:
    problems = unsupported_features(config)
    if problems:
        raise UnsupportedModelError(
            f"unsupported model ({getattr(config, 'model_type', '?')}): " + "; ".join(problems)
        )


def rotary_params(model: torch.nn.Module) -> RotaryParams:
    """RoPE as the model itself computes it: read from its rotary module, after any rope scaling."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise UnsupportedModelError("no shared model.model.rotary_emb.inv_freq (non-standard RoPE placement)")
    return RotaryParams(
        inv_freq=inv_freq.detach().to(device="cpu", dtype=torch.float32).clone(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


def _attention_problems(layers: torch.nn.ModuleList, n_kv_heads: int) -> list[str]:
    """Checks on the modules themselves: per-layer widths and per-layer rotary modules, which a config
    may not announce, must agree with the one shape and one RotaryParams a calibration stores."""
    problems: list[str] = []
    attn0 = layers[0].self_attn
    widths0 = (attn0.k_proj.out_features, attn0.v_proj.out_features)
    odd = [
        i
        for i, layer in enumerate(layers)
        if (layer.self_attn.k_proj.out_features, layer.self_attn.v_proj.out_features) != widths0
    ]
    if odd:
        problems.append(
            f"per-layer head dims: {_layer_list(odd, len(layers))} differ from layer 0's k/v widths "
            f"{widths0} ({n_kv_heads} KV heads)"
        )
    own_rope = [
        i for i, layer in enumerate(layers) if getattr(layer.self_attn, "rotary_emb", None) is not None
    ]
    if own_rope:
        problems.append(f"per-layer RoPE modules in {_layer_list(own_rope, len(layers))}")
    return problems


def model_info(model: torch.nn.Module, name: str) -> ModelInfo:
    """Shapes are read off the projection weights, not the config, so GQA and k/v dims can't be misread."""
    config = model.config  # type: ignore[attr-defined]
    check_supported(config)
    layers = decoder_layers(model)
    attn = layers[0].self_attn
    n_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    problems = _attention_problems(layers, n_kv_heads)
    if problems:
        raise UnsupportedModelError(f"unsupported model ({config.model_type}): " + "; ".join(problems))
    key_head_dim = attn.k_proj.out_features // n_kv_heads
    value_head_dim = attn.v_proj.out_features // n_kv_heads
    rope = rotary_params(model)
    partial_ok = config.model_type in PARTIAL_ROPE_MODEL_TYPES and 0 < rope.head_dim < key_head_dim
    if rope.head_dim != key_head_dim and not partial_ok:
        raise UnsupportedModelError(
            f"partial rotary dims: RoPE covers {rope.head_dim} of {key_head_dim} key dims in "
            f"{_layer_list(range(len(layers)), len(layers))} (supported for "
            f"{', '.join(sorted(PARTIAL_ROPE_MODEL_TYPES))})"
        )
    return ModelInfo(
        name=name,
        n_layers=len(layers),
        n_kv_heads=n_kv_heads,
        key_head_dim=key_head_dim,
        value_head_dim=value_head_dim,
        rope=rope,
        fingerprint=model_fingerprint(model),
        vocab_size=int(config.vocab_size),
    )


PREFILL_DTYPES = ("float32", "bfloat16")  # torch attribute names: calibrate takes getattr(torch, name)


def fast_prefill_dtype() -> str:
    """The dtype whose matmuls are fastest on this CPU: bfloat16 where it has native bf16 dot
    products (AVX512-BF16 or AMX: on the session-21 AVX-512 machine 2.4x a float32 prefill on torch's
    default matmul path, ~1.2x one on oneDNN's, core/matmul.py), float32 elsewhere (bf16 is ~5x slower
    on AVX2-only machines, which emulate it)."""
    from kvbm_codec.core.matmul import native_bf16

    return "bfloat16" if native_bf16() else "float32"


def resolve_prefill_dtype(name: str) -> str:
    """'auto' -> fast_prefill_dtype(); a dtype name is checked, so a typo fails before any prefill."""
    if name == "auto":
        return fast_prefill_dtype()
    if name not in PREFILL_DTYPES:
        raise ValueError(f"prefill dtype must be auto, {' or '.join(PREFILL_DTYPES)}; got {name!r}")
    return name


def kv_from_dynamic_cache(cache: DynamicCache, positions: torch.Tensor, layer_start: int = 0) -> KVCache:
    """transformers' per-layer [1, H, T, D] tensors -> one stacked float32 KVCache (batch 1 only)."""
    layers = [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel() > 0]
    if not layers:
        raise ValueError("the DynamicCache holds no keys")
    if layers[0].keys.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported, got {layers[0].keys.shape[0]}")
    keys = torch.stack([layer.keys[0] for layer in layers]).to(torch.float32)
    values = torch.stack([layer.values[0] for layer in layers]).to(torch.float32)
    positions = positions.to(device="cpu", dtype=torch.int64)
    return KVCache(keys=keys, values=values, positions=positions, layer_start=layer_start)


def kv_to_dynamic_cache(kv: KVCache, dtype: torch.dtype = torch.float32) -> DynamicCache:
    """KVCache -> a DynamicCache the model can continue from. Copies, so the model never mutates `kv`."""
    if kv.layer_start != 0:
        raise ValueError(f"a model cache must start at layer 0, this one starts at {kv.layer_start}")
    cache = DynamicCache()
    for i in range(kv.n_layers):
        cache.update(kv.keys[i][None].to(dtype), kv.values[i][None].to(dtype), i)
    return cache


def _source_marker(source: ModelSource) -> dict[str, Any]:
    """Content identity of the GGUF a cached copy was made from, so replacing the GGUF invalidates
    the copy. Not its path or mtime: every virtualenv installs its own copy of the same file, and a
    path-keyed marker made each venv rebuild (and rewrite 0.5 GB of) the shared cache."""
    assert source.gguf_file is not None
    path = source.directory / source.gguf_file
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {
        "source": source.gguf_file,
        "size": size,
        "head_tail_sha256": h.hexdigest(),
        "transformers": transformers.__version__,
    }


def _cache_is_valid(cache_dir: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((cache_dir / _SOURCE_MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within one GGUF load, each file is parsed once and gguf's tensor-name map built once per
    (architecture, layer count).

    transformers parses the GGUF three times (config, weights, tokenizer; ~300k metadata fields each,
    mostly the vocabulary, read through numpy memmap indexing) and rebuilds the name map for each of
    the model's ~400 modules: ~70% of the conversion's CPU time, profiled. The reader is read-only
    and the map a pure function of its arguments, so sharing them changes no weight (the fingerprint
    and every tensor are the same; tests/test_models.py)."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map  # type: ignore[misc]


def _load_pretrained(directory: Path, gguf_file: str | None) -> tuple[Any, Any]:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with _gguf_parsed_once() if gguf_file else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model.eval()
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, cache_dir: Path, marker: dict[str, Any]) -> None:
    """Save next to the destination and rename into place, so a crash never leaves a half-written copy."""
    # GGUF loads attach a quantizer and quantization_config that save_pretrained refuses to serialize; the
    # weights are already de-quantized float32, so the copy is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_MARKER).write_text(json.dumps(marker, indent=2))
        stale = None
        if cache_dir.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.stale-", dir=cache_dir.parent))
            os.rename(cache_dir, stale / "old")
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            # Another process won the race and its copy is as good as ours.
            if not _cache_is_valid(cache_dir, marker):
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _KVComplete(Exception):
    """Raised out of the forward pass once the last layer has stored this chunk's keys and values."""


class _KVOnlyCache(DynamicCache):
    """A DynamicCache that ends the forward pass right after the last layer's update: what would follow
    (that layer's attention scores, o_proj and MLP, the final norm, the LM head) feeds no cache entry.
    Every earlier operation runs unchanged, so the stored KV, and any hook that fires before it
    (queries, residual inputs), see bit-identical tensors."""

    def __init__(self, last_layer: int) -> None:
        super().__init__()
        self._last_layer = last_layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self._last_layer:
            raise _KVComplete
        return out


def _from_layer(model: torch.nn.Module, start: int) -> torch.nn.Module:
    """A view of ``model`` whose decoder runs only layers ``start:``: shallow copies of the model and
    its decoder with their own module tables, every parameter and buffer shared. Swapping the
    decoder's layer list on the model itself instead would race with any other forward."""
    base = model.model
    cut = copy.copy(base)
    cut._modules = {**base._modules, "layers": torch.nn.ModuleList(list(decoder_layers(model))[start:])}
    view = copy.copy(model)
    view._modules = {**model._modules, "model": cut}
    return view


class CausalLM:
    """A loaded model plus the facts the codec needs; forward passes are batch 1, float32, no grad."""

    def __init__(self, model: Any, tokenizer: Any, name: str, loaded_from: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = model_info(model, name)
        # Where the weights actually came from (GGUF file or folder): tells a test whether it saw the cache.
        self.loaded_from = loaded_from

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_MODEL, *, use_cache: bool = True) -> CausalLM:
        """Load by registered name or local path; GGUF models go through a save_pretrained copy.

        The GGUF de-quantization takes ~30 s on 2 cores against ~3 s for safetensors, hence the copy.
        use_cache=False forces the GGUF path (and writes nothing), e.g. to check the copy is faithful.
        """
        source = resolve_model(name_or_path)
        if source.gguf_file is None:
            check_supported(AutoConfig.from_pretrained(source.directory, local_files_only=True))
            model, tokenizer = _load_pretrained(source.directory, None)
            return cls(model, tokenizer, source.name, source.directory)

        cache_dir = cache_root() / source.name
        marker = _source_marker(source)
        if use_cache and _cache_is_valid(cache_dir, marker):
            model, tokenizer = _load_pretrained(cache_dir, None)
            return cls(model, tokenizer, source.name, cache_dir)

        model, tokenizer = _load_pretrained(source.directory, source.gguf_file)
        check_supported(model.config)
        if use_cache:
            _write_cache(model, tokenizer, cache_dir, marker)
        return cls(model, tokenizer, source.name, source.directory / source.gguf_file)

    def in_dtype(self, dtype: torch.dtype) -> CausalLM:
        """A copy whose weights are cast to ``dtype``, sharing the tokenizer and ``info`` (so its
        fingerprint is the source model's). This one keeps its float32 weights (a round trip through
        bf16 would change them), and buffers stay float32: ``model.to(bf16)`` would also round the
        rotary ``inv_freq``, rotating keys by angles off by ~0.4% x position, which de-rotation with
        the true frequencies would not undo. Its KV still comes out float32 (kv_from_dynamic_cache)."""
        if dtype == next(self.model.parameters()).dtype:
            return self
        memo = {
            id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in self.model.parameters()
        }
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model, memo)
        return twin

    def encode(self, text: str) -> torch.Tensor:
        """Text -> input_ids [1, T], as the model's tokenizer does it (no chat template)."""
        return torch.tensor([self.tokenizer(text)["input_ids"]], dtype=torch.long)

    def _run(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache,
        first_position: int,
        chunk_size: int,
        return_logits: bool,
    ) -> torch.Tensor:
        """Feed input_ids in chunks after `cache`, so attention scores stay [chunk, context] in size.

        Explicit position_ids decouple RoPE positions from the cache length: an evicted cache is shorter
        than its last position, and transformers' causal mask is index-based on the cache, which is
        exactly right for it (every cached token is in the past of every new one).
        """
        chunks: list[torch.Tensor] = []
        for ids, positions, last in self._chunks(input_ids, first_position, chunk_size):
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if return_logits else 1,
            )
            if return_logits or last:
                chunks.append(out.logits[0].to(torch.float32))
        return torch.cat(chunks) if return_logits else chunks[-1]

    def _chunks(
        self, input_ids: torch.Tensor, first_position: int, chunk_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(ids [1, c], position_ids [1, c], is the last chunk) on the model's device."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        n = int(input_ids.shape[1])
        if n == 0:
            raise ValueError("input_ids is empty")
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            positions = torch.arange(first_position + start, first_position + end, device=device)[None]
            yield input_ids[:, start:end], positions, end == n

    def prefill(
        self, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, return_logits: bool = True
    ) -> tuple[KVCache, torch.Tensor]:
        """Run the prompt, return its KV cache and logits [T, vocab].

        Chunked so an 8k-token prompt never materializes an 8k x 8k attention matrix per head.
        return_logits=False returns only the last position's logits [1, vocab] (enough to start
        decoding) and skips the lm_head over every position, which is most of the memory at 8k.
        """
        cache = DynamicCache()
        with torch.inference_mode():
            logits = self._run(input_ids, cache, 0, chunk_size, return_logits)
        positions = torch.arange(int(input_ids.shape[1]), dtype=torch.int64)
        return kv_from_dynamic_cache(cache, positions), logits

    def prefill_kv(self, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> KVCache:
        """The prompt's KV cache and nothing else, bit-identical to prefill's: calibration's prefill.

        Each chunk's forward pass stops once the last layer has stored its keys and values (see
        _KVOnlyCache), which skips that layer's attention, o_proj and MLP, the final norm and the LM
        head. Forward hooks on anything before the last layer's cache update still fire.
        """
        cache = _KVOnlyCache(self.info.n_layers - 1)
        with torch.inference_mode():
            for ids, positions, _ in self._chunks(input_ids, 0, chunk_size):
                with contextlib.suppress(_KVComplete):
                    self.model(
                        input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
                    )
        kv = kv_from_dynamic_cache(cache, torch.arange(int(input_ids.shape[1]), dtype=torch.int64))
        if kv.n_layers != self.info.n_layers or kv.n_tokens != input_ids.shape[1]:
            raise RuntimeError(
                f"KV-only prefill stored {kv.n_layers} layers x {kv.n_tokens} tokens, "
                f"expected {self.info.n_layers} x {int(input_ids.shape[1])}"
            )
        return kv

    def _check_cache(self, kv: KVCache) -> None:
        info = self.info
        expected = (info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
        got = (kv.n_layers, kv.n_heads, kv.key_head_dim, kv.value_head_dim)
        if kv.layer_start != 0 or got != expected:
            raise ValueError(
                f"cache (layers, kv heads, key dim, value dim) = {got} from layer {kv.layer_start} does not "
                f"fit {info.name} {expected}"
            )

    def _next_position(self, kv: KVCache) -> int:
        return int(kv.positions.max()) + 1 if kv.n_tokens else 0

    def logits_with_cache(
        self, cache: KVCache, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK
    ) -> torch.Tensor:
        """Teacher-forced logits [N, vocab] of input_ids continuing after `cache` (which is not modified).

        This is how codec quality is measured: a decoded (or evicted) cache is judged by what the model
        predicts from it, with the new tokens placed right after the cache's last true position.
        """
        self._check_cache(cache)
        dynamic = kv_to_dynamic_cache(cache, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            return self._run(input_ids, dynamic, self._next_position(cache), chunk_size, True)

    def continuation_states(
        self, cache: KVCache, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits_with_cache`` in one pass (no chunking), plus the hidden state entering every decoder
        layer [L, N, hidden]: what ``logits_from_layer`` restarts from when only later layers' caches
        change (the sensitivity probe). The logits are bit-identical to ``logits_with_cache``'s for
        N <= DEFAULT_CHUNK (the hooks only read)."""
        self._check_cache(cache)
        n = int(input_ids.shape[1])
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or not 0 < n <= DEFAULT_CHUNK:
            raise ValueError(
                f"input_ids must be [1, N] with 0 < N <= {DEFAULT_CHUNK}, got {tuple(input_ids.shape)}"
            )
        layers = decoder_layers(self.model)
        hidden: list[torch.Tensor] = []

        def grab(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            hidden.append(h.detach()[0].clone())

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
        try:
            logits = self.logits_with_cache(cache, input_ids)
        finally:
            for h in handles:
                h.remove()
        if len(hidden) != len(layers):
            raise RuntimeError(f"captured {len(hidden)} layer inputs, expected {len(layers)}")
        return logits, torch.stack(hidden)

    def logits_from_layer(
        self,
        start: int,
        hidden: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        first_position: int,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, N, vocab] of a batch of continuations run from decoder layer
        ``start`` on: ``states_from_layer``, then the LM head."""
        return self.head_logits(self.states_from_layer(start, hidden, keys, values, first_position))

    def states_from_layer(
        self,
        start: int,
        hidden: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        first_position: int,
    ) -> torch.Tensor:
        """The final hidden states [B, N, hidden] (after the final norm: what the LM head reads) of a
        batch of continuations run from decoder layer ``start`` on: ``hidden`` [B, N, hidden] is the
        hidden state entering that layer (from ``continuation_states``), ``keys[i]`` / ``values[i]``
        [B, kv heads, T, dim] the context cache of layer ``start + i`` for each row, the new tokens at
        positions ``first_position`` onwards.

        Layers before ``start`` do not run: when only caches from ``start`` on differ from a reference
        pass, their outputs are the reference's, so the sensitivity probe skips them (about half its
        forward work) and batches its variants. It runs the model's own decoder (mask, RoPE, layers,
        final norm) on a view of it whose layer list holds only layers ``start:`` (``_from_layer``):
        the model itself is never changed, so a failed call leaves nothing to restore."""
        info = self.info
        n_rows, n_new = int(hidden.shape[0]), int(hidden.shape[1])
        if not 0 <= start < info.n_layers or len(keys) != info.n_layers - start or len(values) != len(keys):
            raise ValueError(f"need caches for layers {start}..{info.n_layers - 1}, got {len(keys)}")
        if hidden.dim() != 3 or not 0 < n_new <= DEFAULT_CHUNK:
            raise ValueError(
                f"hidden must be [B, N, hidden] with 0 < N <= {DEFAULT_CHUNK}, got {tuple(hidden.shape)}"
            )
        ctx = int(keys[0].shape[2])
        for k, v in zip(keys, values, strict=True):
            if k.shape[0] != n_rows or v.shape[0] != n_rows or k.shape[2] != ctx or v.shape[2] != ctx:
                raise ValueError(f"every cache must be [{n_rows}, heads, {ctx}, dim]")
        dtype = next(self.model.parameters()).dtype
        cache = DynamicCache()
        for i in range(info.n_layers):
            # layers before `start` never run; layer 0's length still sets the mask and query offset
            k, v = (keys[0], values[0]) if i < start else (keys[i - start], values[i - start])
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.to(dtype), v.to(dtype)
            cache.layers.append(layer)
        device = next(self.model.parameters()).device
        positions = torch.arange(first_position, first_position + n_new, device=device)[None]
        with torch.inference_mode():
            out = _from_layer(self.model, start).model(
                inputs_embeds=hidden.to(device=device, dtype=dtype),
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
        return out.last_hidden_state

    def head_logits(self, states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [..., vocab] of final hidden states: the model's LM head, which is all every
        supported architecture's causal-LM forward applies after the decoder. ``out``: a float32
        buffer of the result's shape to write into. The probe reuses one across its layer restarts:
        a batch's logits are 151 MB for SmolLM2, above what glibc keeps in its heap, so a fresh tensor
        per restart was mapped and faulted in anew (0.8M page faults, ~8 s of kernel time)."""
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        rows = states.reshape(-1, states.shape[-1])
        with torch.inference_mode():
            if out is None or weight.dtype != torch.float32:
                logits = head(states).to(torch.float32)
                return logits if out is None else out.copy_(logits)
            flat = out.view(-1, weight.shape[0])
            if bias is None:
                torch.mm(rows, weight.t(), out=flat)
            else:
                torch.addmm(bias, rows, weight.t(), out=flat)
            return out

    def generate(
        self, cache: KVCache, input_ids: torch.Tensor, max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> list[int]:
        """Greedy continuation after `cache`; input_ids (>= 1 token) are fed first, e.g. the prompt's tail.

        At least one fed token is needed because a cache holds keys/values, not the next-token logits.
        """
        self._check_cache(cache)
        dynamic = kv_to_dynamic_cache(cache, dtype=next(self.model.parameters()).dtype)
        position = self._next_position(cache)
        eos = self._eos_ids() if stop_at_eos else set()
        out: list[int] = []
        with torch.inference_mode():
            logits = self._run(input_ids, dynamic, position, DEFAULT_CHUNK, False)
            position += int(input_ids.shape[1])
            for _ in range(max_new_tokens):
                token = int(logits[-1].argmax())
                out.append(token)
                if token in eos:
                    break
                logits = self._run(torch.tensor([[token]]), dynamic, position, 1, False)
                position += 1
        return out

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids: Iterable[Any] = eos if isinstance(eos, list | tuple) else [eos]
        return {int(i) for i in ids if i is not None}
