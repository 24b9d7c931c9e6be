"""A short identity for a model, stored with calibration artifacts so a basis never meets the wrong model.

A PCA basis fitted on one model's keys is silently wrong on another (even a re-quantization of the same
one), so the identity covers the weights that produce keys/values, not just the config. Hashing every
weight would cost seconds; three projection matrices are enough to tell checkpoints apart, and they
are the tensors the KV cache actually depends on most directly.
The bytes hashed are the in-memory float32 values, so the same checkpoint gives the same fingerprint
whether it was de-quantized from GGUF or loaded from a saved safetensors copy.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

FINGERPRINT_VERSION = 1


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (`model.model.layers` in every supported architecture)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers; not a decoder-only causal LM layout")
    return layers


def _jsonable(value: Any) -> Any:
    """Config values may hold tensors or tuples; JSON needs plain types, and floats must print stably."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float):
        return repr(value)
    return value


def architecture_facts(config: Any) -> dict[str, Any]:
    """The config fields that change the shape or the RoPE of the KV cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "rope_parameters": _jsonable(getattr(config, "rope_parameters", None) or {}),
        "vocab_size": config.vocab_size,
    }


def _param_bytes(module: nn.Module, name: str) -> bytes:
    """Weight, then bias when there is one (Qwen2 puts biases on k/v projections)."""
    linear = getattr(module, name)
    params = [linear.weight] + ([linear.bias] if getattr(linear, "bias", None) is not None else [])
    return b"".join(
        p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes() for p in params
    )


def model_fingerprint(model: nn.Module) -> str:
    """32 hex chars of sha256 over the architecture facts and the K/V projection weights."""
    config = model.config  # type: ignore[attr-defined]
    layers = decoder_layers(model)
    first, last = layers[0].self_attn, layers[-1].self_attn
    h = hashlib.sha256()
    facts = {"fingerprint_version": FINGERPRINT_VERSION, **architecture_facts(config)}
    h.update(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode())
    for module, name in ((first, "k_proj"), (first, "v_proj"), (last, "k_proj")):
        h.update(name.encode())
        h.update(_param_bytes(module, name))
    return h.hexdigest()[:32]
