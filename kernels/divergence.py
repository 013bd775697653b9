"""How far a model's next-token distribution moved: the KL divergence from a reference.

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v),   p = softmax(reference logits), q = softmax(logits)

summed over tokens (rows), from log-softmax in float32 (float64 inputs stay float64),
``block_rows`` rows at a time so no more than a block's probabilities exist at once. A caller
scoring many candidates against one reference takes the reference's log-probabilities once
(:func:`log_probs`) and passes them to :func:`kl_sum_from` for each. Pure torch; the caller's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kl_sum", "kl_sum_from", "log_probs"]


def _dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_probs(logits: Tensor) -> Tensor:
    """(tokens, vocab) log-softmax of (..., vocab) logits, in float32 (float64 stays float64)."""
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]).to(_dtype(logits)), -1)


def kl_sum_from(ref_log_probs: Tensor, logits: Tensor, block_rows: int = 1024) -> float:
    """Σ_t KL(p_t ‖ softmax(logits_t)) with ``p = exp(ref_log_probs)`` ((tokens, vocab), from :func:`log_probs`)."""
    q = logits.reshape(-1, logits.shape[-1])
    if q.shape != ref_log_probs.shape:
        raise ValueError(f"kl_sum: logits of shape {tuple(logits.shape)} against a reference of shape {tuple(ref_log_probs.shape)}")
    total = torch.zeros((), dtype=torch.float64, device=q.device)
    for i in range(0, q.shape[0], block_rows):
        lp = ref_log_probs[i : i + block_rows]
        lq = F.log_softmax(q[i : i + block_rows].to(lp.dtype), -1)
        total += (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).sum().double()  # each row's KL >= 0 (rounding)
    return float(total)


def kl_sum(ref_logits: Tensor, logits: Tensor, block_rows: int = 1024) -> float:
    """Σ_t KL(softmax(ref_logits_t) ‖ softmax(logits_t)) over the rows of two (..., vocab) tensors."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"kl_sum: logits of shape {tuple(logits.shape)} against a reference of shape {tuple(ref_logits.shape)}")
    return kl_sum_from(log_probs(ref_logits), logits.to(_dtype(ref_logits)), block_rows)
