"""The second registered model, Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, RoPE theta 1e6,
14 query / 2 KV heads): its extracted KV is the model's own, and its split GGUF is verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kvbm_codec.codec.rope import apply_rope, undo_rope
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.models.registry import ModelIntegrityError, assemble_gguf, cache_root, resolve_model

TEXT = (
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "class Stack:\n    def __init__(self):\n"
    "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n"
)
CONTINUATION = "\n    def pop(self):\n        return self.items.pop()\n"


def _parts(tmp_path: Path) -> list[Path]:
    out = []
    for i, data in enumerate((b"GGUF" + bytes(range(60)), b"\x01" * 33, b"tail")):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(data)
        out.append(p)
    return out


def test_split_gguf_assembled_once_and_verified(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    whole = b"".join(p.read_bytes() for p in parts)
    dest = tmp_path / "out" / "model.gguf"
    assert assemble_gguf(parts, dest, hashlib.sha256(whole).hexdigest(), len(whole)) == dest
    assert dest.read_bytes() == whole
    mtime = dest.stat().st_mtime_ns
    assemble_gguf(parts, dest, hashlib.sha256(whole).hexdigest(), len(whole))
    assert dest.stat().st_mtime_ns == mtime  # stamp matched: not rewritten


def test_split_gguf_mismatch_refused_and_nothing_left(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    whole = b"".join(p.read_bytes() for p in parts)
    good = hashlib.sha256(whole).hexdigest()
    dest = tmp_path / "out" / "model.gguf"
    parts[1].write_bytes(b"\x02" * 33)  # same size, other bytes: only the hash can tell
    with pytest.raises(ModelIntegrityError, match="sha256"):
        assemble_gguf(parts, dest, good, len(whole))
    assert not dest.exists() and not list(dest.parent.glob(".model.gguf.tmp-*"))
    with pytest.raises(ModelIntegrityError, match="hold 97 bytes, expected 101"):
        assemble_gguf(parts[:2], dest, good, len(whole))
    # A part replaced after a good assembly invalidates it: re-assembled and refused.
    parts[1].write_bytes(b"\x01" * 33)
    assemble_gguf(parts, dest, good, len(whole))
    parts[2].write_bytes(b"TAIL")
    with pytest.raises(ModelIntegrityError):
        assemble_gguf(parts, dest, good, len(whole))


@pytest.mark.slow
def test_registered_qwen_verified_and_shaped(qwen: CausalLM) -> None:
    source = resolve_model("qwen2.5-coder-0.5b")
    assert source.gguf_file is not None
    h = hashlib.sha256()
    with open(source.directory / source.gguf_file, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    assert h.hexdigest() == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    info = qwen.info
    assert (info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim) == (24, 2, 64, 64)
    assert info.name == "qwen2.5-coder-0.5b" and info.vocab_size == 151936
    expected = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(info.rope.inv_freq, expected, rtol=1e-6, atol=0)
    attn = qwen.model.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert (cache_root() / "qwen2.5-coder-0.5b" / "config.json").is_file()


@pytest.mark.slow
def test_qwen_kv_is_the_models_own(qwen: CausalLM) -> None:
    """Every layer's cached keys de-rotate to k_proj's output (bias included) and values equal v_proj's;
    continuing from the extracted cache gives the full forward's logits."""
    ids, cont = qwen.encode(TEXT), qwen.encode(CONTINUATION)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(qwen.model.model.layers):
        for name in ("k_proj", "v_proj"):

            def hook(_m: object, _i: object, out: torch.Tensor, key: tuple[int, str] = (i, name)) -> None:
                captured[key] = out.detach().clone()

            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        kv, _ = qwen.prefill(ids, return_logits=False)
    finally:
        for h in handles:
            h.remove()
    t = ids.shape[1]
    rope = qwen.info.rope
    for i in range(qwen.info.n_layers):
        k_pre = captured[(i, "k_proj")][0].view(t, 2, 64).transpose(0, 1)
        v = captured[(i, "v_proj")][0].view(t, 2, 64).transpose(0, 1)
        torch.testing.assert_close(undo_rope(kv.keys[i], kv.positions, rope), k_pre, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(apply_rope(k_pre, kv.positions, rope), kv.keys[i], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(kv.values[i], v, atol=0, rtol=0)
    fast = qwen.prefill_kv(ids)  # calibration's prefill: the same KV, bit for bit
    assert torch.equal(fast.keys, kv.keys) and torch.equal(fast.values, kv.values)
    got = qwen.logits_with_cache(kv, cont)
    with torch.inference_mode():
        full = qwen.model(input_ids=torch.cat([ids, cont], 1), use_cache=False).logits[0].float()
    torch.testing.assert_close(got, full[t:], atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), full[t:].argmax(-1))
