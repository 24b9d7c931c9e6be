"""The attention kernel every model here runs: transformers' SDPA, with grouped KV heads handed to
torch's kernel as they are when a mask is given.

transformers' SDPA path repeats each KV head for its query heads (``repeat_kv``) whenever the call
carries a mask, which is every forward that continues after a cache: the calibration's sensitivity
probe (12 variants x 64 tokens over a 960-token cache per layer restart), eval's scoring,
generation. That copies every cached key and value n_rep times per layer. torch's CPU kernel takes
the grouped heads directly (``enable_gqa``) and computes the same numbers: bit-identical outputs,
1.7x faster on the probe's shapes (docs/benchmarks.md, "Session 27"). Other devices keep
transformers' own choice (CUDA's fast kernels refuse a mask with grouped heads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "kvbm_sdpa"
"""The name models are switched to (``CausalLM``): SDPA's masks, this module's kernel call."""


def grouped_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    n_rep = int(getattr(module, "num_key_value_groups", 1))
    plain = (
        query.device.type == "cpu"
        and n_rep > 1
        and attention_mask is not None
        and query.shape[2] > 1  # one query token: transformers packs the group without copies already
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
