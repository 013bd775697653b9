"""FFN channel groups: the activation-aware channel score, the selection rule, the slice.

Channel j of a gated FFN is the group {gate row j, up row j, down column j}; removing it
shrinks the width f by one. Shared by Olica (He & Lin, ICML 2025) and LoRAP (Li, Tang &
Zhang, ICML 2024), whose scores are identical (``/work/shared/spec/ALGORITHMS.md``, "FFN
channel pruning"; LoRAP code ``utils/prune.py::prune_mlp``), and by ``magnitude`` (the slice).

Pure functions: tensors in, tensors out; no hooks, devices or files.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_BLOCK = 4096  # weight rows/columns cast to fp32 at a time (bounds the fp32 copy of a 70B FFN)


def _scaled_row_norms(w: Tensor, scale: Tensor) -> Tensor:
    """(rows,) ``‖w[j,:] ⊙ scale‖₂`` in fp32, ``_BLOCK`` rows at a time."""
    s = scale.float().to(w.device)  # (in,)
    return torch.cat([(w[i:i + _BLOCK].float() * s).norm(dim=1) for i in range(0, w.shape[0], _BLOCK)])


def _col_norms(w: Tensor) -> Tensor:
    """(cols,) ``‖w[:, j]‖₂`` in fp32, ``_BLOCK`` columns at a time."""
    return torch.cat([w[:, i:i + _BLOCK].float().norm(dim=0) for i in range(0, w.shape[1], _BLOCK)])


def ffn_channel_scores(gate: Tensor, up: Tensor, down: Tensor, ex: Tensor, eh: Tensor) -> Tensor:
    """(f,) fp32 importance of each FFN channel.

    ``I_j = ‖|Wup[j,:]| ⊙ sqrt(ex)‖₂ + ‖|Wgate[j,:]| ⊙ sqrt(ex)‖₂ + sqrt(eh[j])·‖Wdown[:,j]‖₂``

    gate, up: (f, d); down: (d, f); ex: (d,) energy Σx² of the MLP input (gate/up input);
    eh: (f,) energy of the down_proj input. (``|W| ⊙ s`` and ``W ⊙ s`` have the same norm
    for s ≥ 0, so no absolute value is formed.)
    """
    f, d = gate.shape
    if up.shape != (f, d) or down.shape != (d, f) or ex.shape != (d,) or eh.shape != (f,):
        raise ValueError(
            f"ffn_channel_scores: expected gate/up (f, d), down (d, f), ex (d,), eh (f,); got gate "
            f"{tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}, "
            f"ex {tuple(ex.shape)}, eh {tuple(eh.shape)}"
        )
    sx = ex.float().clamp_min(0).sqrt()  # (d,)
    sh = eh.float().clamp_min(0).sqrt().to(down.device)  # (f,)
    return _scaled_row_norms(up, sx) + _scaled_row_norms(gate, sx) + sh * _col_norms(down)


def select_channels(scores: Tensor, n_prune: int, keep_least_frac: float = 0.01) -> Tensor:
    """Indices of the kept channels, ascending (int64).

    Sort ascending (stable: ties keep index order), keep the lowest ``floor(keep_least_frac·f)``
    (both papers keep the least important 1 %), prune the next ``n_prune``, keep the rest.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (f,), got shape {tuple(scores.shape)}")
    f = scores.shape[0]
    if not 0 <= keep_least_frac < 1:
        raise ValueError(f"keep_least_frac must be in [0, 1), got {keep_least_frac}")
    n_least = math.floor(keep_least_frac * f)
    if not 0 <= n_prune <= f - n_least:
        raise ValueError(
            f"n_prune must be in [0, f - floor(keep_least_frac·f)] = [0, {f - n_least}], got {n_prune}"
        )
    order = torch.argsort(scores, stable=True)
    kept = torch.cat([order[:n_least], order[n_least + n_prune:]])
    return torch.sort(kept).values


def slice_ffn(weights: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """A copy of ``weights`` with the FFN cut to channels ``keep`` (gate/up rows, down columns)."""
    out = dict(weights)
    out["mlp.gate_proj.weight"] = weights["mlp.gate_proj.weight"][keep].contiguous()
    out["mlp.up_proj.weight"] = weights["mlp.up_proj.weight"][keep].contiguous()
    out["mlp.down_proj.weight"] = weights["mlp.down_proj.weight"][:, keep].contiguous()
    return out
