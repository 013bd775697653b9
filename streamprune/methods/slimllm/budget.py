"""SlimLLM's budget: per-layer ratios and the knob solver (Guo et al., ICML 2025, arXiv 2505.22689).

``/work/shared/spec/ALGORITHMS.md`` ("SlimLLM", "Ratio contract"). ``r_l = r·N_p·softmax(α c)_l``
on the N_p layers with the largest survey cosine ``c_l`` (0 elsewhere), clamped to ``r_max``
with the excess re-split (water-filling); r solved by bisection on the exact parameter totals
so the achieved reduction is within ±1 pp, else the FFN share β is solved
(:mod:`streamprune.methods.slimllm`, notes 1–4). Arithmetic on :class:`ModelShapes` and
Python floats (the softmax in float64); no activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ...errors import RatioError
from ...shapes import ModelShapes
from ...spec import LayerSpec

_TOL = 0.01  # ratio contract: ±1 percentage point


def clamp_redistribute(shares: Sequence[float], total: float, cap: float) -> list[float]:
    """Split ``total`` in proportion to ``shares`` (>= 0) with no entry above ``cap``.

    Water-filling: entries over ``cap`` are set to it and what is left is re-split among the
    others in proportion to their shares, until none exceeds it.
    """
    out, free, left = [0.0] * len(shares), [i for i, s in enumerate(shares) if s > 0], total
    while free:
        w = sum(shares[i] for i in free)
        over = [i for i in free if left * shares[i] / w > cap]
        if not over:
            for i in free:
                out[i] = left * shares[i] / w
            break
        for i in over:
            out[i] = cap
        left -= cap * len(over)
        free = [i for i in free if i not in over]
    return out


def layer_ratios(cos: Sequence[float], r: float, n_p: int, alpha: float, r_max: float) -> list[float]:
    """``r_l``: ``r·N_p·softmax(α c_S)`` on the ``n_p`` largest ``cos`` (ties: lower index), clamped."""
    chosen = sorted(sorted(range(len(cos)), key=lambda i: (-cos[i], i))[:n_p])
    shares = torch.softmax(alpha * torch.tensor([float(cos[i]) for i in chosen], dtype=torch.float64), 0).tolist()
    out = [0.0] * len(cos)
    for i, v in zip(chosen, clamp_redistribute(shares, r * len(chosen), r_max)):
        out[i] = v
    return out


def heads_to_prune(r_l: float, num_heads: int, num_kv_heads: int) -> int:
    """Heads pruned per pool: ``round(r_l·H)`` (MHA) or ``round(r_l·H/G)`` per KV group."""
    pool = num_heads if num_heads == num_kv_heads else num_heads // num_kv_heads
    return round(r_l * pool)


def ffn_to_prune(r_l: float, f: int, keep_least_frac: float) -> int:
    """FFN channels pruned: ``round(r_l·f)``, leaving the keep-least set and one more (note 8)."""
    return min(round(r_l * f), f - math.floor(keep_least_frac * f) - 1)


def layer_spec(shapes: ModelShapes, r_heads: float, r_ffn: float, keep_least_frac: float) -> LayerSpec:
    """The spec of a layer losing a fraction ``r_heads`` of its heads and ``r_ffn`` of its channels."""
    dense = shapes.dense_spec()
    H, G = shapes.num_heads, shapes.num_kv_heads
    n = heads_to_prune(r_heads, H, G)
    kv, hpg = (H - n, 1) if H == G else (G, H // G - n)
    if kv == 0 or hpg == 0:
        kv = hpg = 0
    n_ffn = ffn_to_prune(r_ffn, shapes.intermediate_size, keep_least_frac)
    return replace(dense, num_kv_heads=kv, heads_per_group=hpg, o_bias=dense.o_bias or n > 0,
                   intermediate_size=shapes.intermediate_size - n_ffn, down_bias=n_ffn > 0)


@dataclass(frozen=True)
class SlimLLMPlan:
    alpha: float
    n_p: int
    r: float  # the solved knob: mean r_l over the N_p pruned layers
    ffn_scale: float  # β: FFN channels use min(β·r_l, r_max); 1 unless heads alone miss (note 2)
    ratios: tuple[float, ...]  # r_l per layer (heads)
    ffn_ratios: tuple[float, ...]  # min(β·r_l, r_max) per layer (FFN channels)
    specs: tuple[LayerSpec, ...]
    achieved: float
    provisional: bool  # True until the survey's c_l are known (shapes-only plan)


def _closest(fn, lo: float, hi: float, target: float) -> tuple[tuple, tuple]:
    """Bisection on a knob x in [lo, hi]; ``fn(x)`` is a tuple whose last item, the achieved ratio,
    is nondecreasing in x. Returns the results on either side of ``target``, the closer first."""
    (xa, a), (xb, b) = (lo, fn(lo)), (hi, fn(hi))
    if a[-1] < target < b[-1]:
        for _ in range(60):  # achieved(a) < target <= achieved(b)
            xm = (xa + xb) / 2
            m = fn(xm)
            (xa, a), (xb, b) = ((xm, m), (xb, b)) if m[-1] < target else ((xa, a), (xm, m))
    return (a, b) if abs(a[-1] - target) < abs(b[-1] - target) else (b, a)


def solve_plan(shapes: ModelShapes, cos: Sequence[float], target: float, alpha: float, n_p: int,
               r_max: float, keep_least_frac: float) -> tuple[float, float, list[float], list[float], list[LayerSpec], float]:
    """``(r, β, ratios, ffn_ratios, specs, achieved)`` with ``|achieved − target| <= 0.01``.

    First the paper's rule: one r_l per layer for heads and channels (β = 1), r by bisection.
    When whole heads make every r miss by more than 0.01, the heads keep the r on either side
    of the target and the FFN share β is solved instead (the side with β nearer 1 wins).
    """

    def build(r: float, beta: float) -> tuple:
        ratios = layer_ratios(cos, r, n_p, alpha, r_max)
        ffn = [min(beta * x, r_max) for x in ratios]
        specs = [layer_spec(shapes, x, y, keep_least_frac) for x, y in zip(ratios, ffn)]
        return r, beta, ratios, ffn, specs, shapes.achieved_ratio(specs)

    best, other = _closest(lambda r: build(r, 1.0), 0.0, r_max, target)
    if abs(best[-1] - target) <= _TOL:
        return best
    found = []
    for r, _, ratios, *_ in (best, other):
        beta_max = max(1.0, r_max / min((x for x in ratios if x > 0), default=r_max))
        got = _closest(lambda beta, r=r: build(r, beta), 0.0, beta_max, target)[0]
        if abs(got[-1] - target) <= _TOL:
            found.append(got)
    if not found:
        raise RatioError(
            f"--ratio {target} is unreachable with method slimllm on this model: with {n_p} of "
            f"{shapes.num_layers} layers pruned (r_max={r_max}) it removes at most "
            f"{build(r_max, 1.0)[-1]:.3f} of the parameters, and the nearest total to {target} is "
            f"{best[-1]:.4f}. Change --ratio, or --option n_p / r_max."
        )
    return min(found, key=lambda t: abs(math.log(max(t[1], 1e-9))))
