"""How much a compressed KV cache changes what the model predicts.

All three are computed in float64: the differences being measured (a codec's effect on next-token
distributions) are often far below float32's resolution on a 49k-way softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"expected two [N, vocab] tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("no positions to compare")


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of targets [N] under logits [N, vocab]; the caller aligns logits[i] with targets[i]."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(
            f"expected logits [N, vocab] and targets [N], got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    nll = F.cross_entropy(logits.to(torch.float64), targets.to(device=logits.device, dtype=torch.long))
    return float(torch.exp(nll))


def top1_agreement(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> float:
    """Fraction of positions whose greedy token is unchanged: what a user of greedy decoding would notice."""
    _check_pair(logits_ref, logits_test)
    return float((logits_ref.argmax(-1) == logits_test.argmax(-1)).to(torch.float64).mean())


def kl_divergence_mean(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P_test) in nats; sensitive to shifts that keep the argmax."""
    _check_pair(logits_ref, logits_test)
    log_p = F.log_softmax(logits_ref.to(torch.float64), dim=-1)
    log_q = F.log_softmax(logits_test.to(torch.float64), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
