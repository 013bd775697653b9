"""Measured allocation: how many FFN channels each layer gives up, from its own error curve.

The paper methods cut every layer's FFN by the same count. Here the survey (dense model,
dense stream) measures, per layer ``l``, the error of cutting its ``k`` least important
channels for every ``k`` (the base method's channel order), as the next RMSNorm sees it:

    e_l(k) = Σ_t ‖Σ_{j∈S_k} h_tj w_j‖² / ms(y_t)
           = Σ_{i,j∈S_k} (WᵀW)_ij · G_ij,    G = Σ_t h_t h_tᵀ / ms(y_t)

with ``h_t`` the down_proj input of token t, ``w_j`` column j of down_proj, ``y_t`` the
layer's output (the residual stream) and ``ms`` its mean square — exactly the error of the
pruned FFN output on the calibration tokens, in units of the residual stream's own scale,
so layers are comparable. Then the channels are handed out greedily: each step removes the
channel, in any layer, whose removal adds the least error, until the total the plan removes
uniformly is reached — the same parameter count, so the same achieved ratio.

Pure functions on tensors; the observer that accumulates ``G`` is in :mod:`.observers`.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor


def prefix_errors(down: Tensor, gram: Tensor, order: Tensor) -> Tensor:
    """(f + 1,) float64 ``e(k)`` = error of removing channels ``order[:k]`` (module doc).

    down: (d, f); gram: (f, f) weighted Gram of the down_proj input; order: (f,) removal order."""
    w = down.double()[:, order]
    A = (w.T @ w) * gram.double()[order][:, order]  # (f, f): A_ij = (w_i·w_j) G_ij
    step = A.diagonal() + 2 * torch.triu(A, diagonal=1).sum(0)  # adding channel k: A_kk + 2 Σ_{i<k} A_ik
    return torch.cat([step.new_zeros(1), torch.cumsum(step, 0)])


def allocate(curves: list[Tensor], total: int, max_per_layer: int) -> list[int]:
    """Counts ``k_l`` with ``Σ k_l = total`` and ``0 <= k_l <= max_per_layer``, chosen greedily:
    each step takes the layer whose next channel adds the least error ``e_l(k+1) − e_l(k)``
    (ties: the lower layer index). Raises ValueError when ``total`` cannot fit."""
    L = len(curves)
    if not 0 <= total <= L * max_per_layer:
        raise ValueError(f"cannot remove {total} channels from {L} layers with at most {max_per_layer} each")
    counts = [0] * L
    heap = [(float(c[1] - c[0]), l) for l, c in enumerate(curves) if max_per_layer > 0]
    heapq.heapify(heap)
    for _ in range(total):
        _, l = heapq.heappop(heap)
        counts[l] += 1
        k = counts[l]
        if k < max_per_layer:
            heapq.heappush(heap, (float(curves[l][k + 1] - curves[l][k]), l))
    return counts
