"""``allocation="search"``: every layer's cut priced by the model's output, not the layer's own error.

The ``obs`` allocation prices cutting ``k`` FFN channels of layer ``l`` by the greedy OBS cost
``e_l(k)``: the error of that layer's output in units of the residual stream's scale. It cannot
know how much of that error survives the layers after it to change the next-token
distribution. The survey's forks (:mod:`streamprune.forks`) measure exactly that for a few
candidates per layer: ``KL_l(k_j)``, the KL divergence of the model's next-token distribution
from the dense model's, per token, on held-apart windows, with only layer ``l`` cut (its
``k_j`` channels of least OBS cost gone, down_proj refitted) — and, in the servable structure,
with layer ``l``'s attention removed.

The curve the allocation then uses is the OBS curve rescaled to KL units, layer by layer:

    c_l(k) = α_l(k) · e_l(k),    α_l(k_j) = KL_l(k_j) / e_l(k_j),

``α_l`` linear in ``k`` between the candidates and constant beyond them. It keeps OBS's
shape (every channel priced) and takes the scale from the output: a layer whose error the
later layers wash out becomes cheap, one whose error grows by the head dear. The greedy
allocations (:func:`.allocation.allocate`, :func:`.servable.allocate`) then hand out the same
total on these curves; an attention removal is priced at its measured KL.

With ``search_blends = n > 1`` the allocation is not taken on trust: the allocations on the
blends ``c_l^β(k) = e_l(k) · α_l(k)^β`` for ``β = 0, 1/(n-1), …, 1`` (OBS's own curves to the
KL-scaled ones) are each scored whole — every layer cut as that allocation says, the KL of
the model's next-token distribution from the dense one's, in one more streamed pass
(:class:`streamprune.forks.Population`) — and the best is taken. Single-layer KLs add up
while the cuts are small; the whole-model score is what decides when they do not.

Pure functions on tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...shapes import ModelShapes


def fork_levels(cap: int, n: int, multiple: int = 1) -> list[int]:
    """The FFN channel counts the forks remove: ``cap · j / n`` for ``j = 1..n`` rounded to a
    multiple of ``multiple`` (at least one multiple, at most ``cap``), distinct, ascending."""
    if cap < multiple:
        return []
    levels = {min(cap, max(multiple, round(cap * j / n / multiple) * multiple)) for j in range(1, n + 1)}
    return sorted(levels)


def fork_count(num_layers: int, cap: int, levels: int, multiple: int, attention: bool) -> int:
    """The forks over the model: each layer's FFN levels, and (``attention``) one attention removal
    in every layer but the first."""
    return len(fork_levels(cap, levels, multiple)) * num_layers + (num_layers - 1 if attention else 0)


def fork_flop(shapes: ModelShapes, tokens: int, forks: int) -> float:
    """The search's arithmetic (:mod:`streamprune.forks`) over ``tokens`` search tokens: a fork of
    layer ``l`` runs layers ``l..L-1`` (a candidate, then dense ones: ~half the model on average)
    and the head; each FFN candidate's down_proj solve is one ``f × f`` Cholesky at most."""
    layer, L = shapes.dense_spec().num_params(), shapes.num_layers
    f, d = shapes.intermediate_size, shapes.hidden_size
    return float(forks * 2 * tokens * (layer * (L + 1) / 2 + shapes.vocab_size * d) + forks * (f ** 3 / 3 + 2 * d * f * f))


def kl_scaled(curve: Tensor, ks: list[int], kls: list[float]) -> Tensor:
    """``curve`` (k = 0..n) times ``α(k)``, the measured ``KL / curve`` at the candidate counts
    ``ks`` (ascending) interpolated linearly in ``k`` and held constant outside them (module doc).
    A candidate whose OBS cost is zero gives no ratio: it is skipped (all skipped: the curve as is)."""
    curve = curve.double()
    pts = [(k, kl / float(curve[k])) for k, kl in zip(ks, kls) if float(curve[k]) > 0]
    if not pts:
        return curve
    x = torch.arange(curve.numel(), dtype=torch.float64)
    xs = torch.tensor([k for k, _ in pts], dtype=torch.float64)
    ys = torch.tensor([a for _, a in pts], dtype=torch.float64)
    alpha = torch.empty_like(x)
    idx = torch.searchsorted(xs, x, right=True)  # xs[idx-1] <= x < xs[idx]
    lo, hi = (idx - 1).clamp(0, len(pts) - 1), idx.clamp(0, len(pts) - 1)
    span = (xs[hi] - xs[lo]).clamp_min(1e-12)
    t = ((x - xs[lo]) / span).clamp(0, 1)
    alpha = ys[lo] + t * (ys[hi] - ys[lo])
    return curve * alpha


def blend_betas(n: int) -> list[float]:
    """``n`` blend exponents from 1 (the KL-scaled curves) down to 0 (OBS's): ``[1.0]`` for ``n = 1``."""
    return [1.0] if n == 1 else [1 - j / (n - 1) for j in range(n)]


def blended(curve: Tensor, scaled: Tensor, beta: float) -> Tensor:
    """``curve · α^β`` with ``α = scaled / curve`` (1 where the curve is 0): β = 0 gives ``curve``,
    β = 1 gives ``scaled``, in float64."""
    curve, scaled = curve.double(), scaled.double()
    if beta == 1.0:
        return scaled
    alpha = torch.where(curve > 0, scaled / curve.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(curve))
    return curve * alpha ** beta


def scoring_flop(shapes: ModelShapes, tokens: int, calibration_tokens: int, members: int) -> float:
    """The scoring pass's arithmetic: the dense model over the calibration tokens (for each layer's
    Gram), each member's pruned model (at most dense) and head over ``tokens`` search tokens, and
    each member layer's down_proj solve (one ``f × f`` Cholesky at most)."""
    layer, L = shapes.dense_spec().num_params(), shapes.num_layers
    f, d = shapes.intermediate_size, shapes.hidden_size
    return float(2 * calibration_tokens * layer * L + members * 2 * tokens * (layer * L + shapes.vocab_size * d)
                 + members * L * (f ** 3 / 3 + 2 * d * f * f))
