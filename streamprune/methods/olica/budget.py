"""Olica's budget: the target ratio -> whole-model knobs (He & Lin, ICML 2025, arXiv 2506.08436).

``/work/shared/spec/ALGORITHMS.md`` ("Olica", budget split; "Ratio contract"). The official
``sr_allocation`` splits the ratio into s_qk and s_vo; the FFN share s_mlp is then solved from
the *exact* parameter counts of the planned layer specs, the LC bypass included, so the total
lands within ±1 pp (:mod:`streamprune.methods.olica`, notes 5, 6 and 10). Pure arithmetic on
:class:`ModelShapes`; no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ...errors import RatioError
from ...shapes import ModelShapes
from ...spec import LayerSpec

_MAX_S_MLP = 0.95



@dataclass(frozen=True)
class OlicaPlan:
    """Whole-model knobs (all layers share them; LC layers add the bypass)."""

    s_qk: float
    s_vo: float
    s_mlp: float
    q_rank: int | None  # None: the projection stays dense (a factor pair would not be smaller)
    k_rank: int | None
    v_head_dim: int
    n_keep_least: int  # FFN channels kept from the bottom of the ranking
    n_ffn_pruned: int
    lc_rank: int
    lc_layers: tuple[int, ...]
    lc_provisional: bool  # True until the survey picks the LC layers (totals are exact anyway)
    # Per-layer FFN counts (same total as L·n_ffn_pruned) set by an allocation on top of the
    # plan (streamprune's ``cascade``); None = Olica's uniform count.
    ffn_pruned_per_layer: tuple[int, ...] | None = None


def sr_allocation(ratio: float, k: float) -> tuple[float, float]:
    """Official ``sr_allocation``: ``(s_qk, s_vo)`` for target ``ratio``."""
    s_vo = 2 * ratio / (1 + k)
    s_qk = 2 * ratio if ratio <= 0.4 else k * s_vo
    return s_qk, s_vo


def awsvd_rank(m: int, n: int, s: float) -> int:
    """Rank keeping ``(1 − s)`` of an m×n matrix's parameters: ``floor((1−s)·m·n/(m+n))``."""
    return max(0, math.floor((1 - s) * m * n / (m + n)))


def factor_rank(m: int, n: int, s: float) -> int | None:
    """``awsvd_rank``, or None (keep the m×n matrix dense) when nothing is to be saved (``s`` <= 0)
    or factors of that rank would not be smaller than the matrix."""
    r = awsvd_rank(m, n, s)
    return None if s <= 0 or r * (m + n) >= m * n else r


def layer_spec(shapes: ModelShapes, q_rank: int | None, k_rank: int | None, v_head_dim: int, f: int, bypass: int) -> LayerSpec:
    return replace(shapes.dense_spec(), q_rank=q_rank, k_rank=k_rank, v_head_dim=v_head_dim,
                   intermediate_size=f, bypass_rank=bypass)


def attention_knobs(shapes: ModelShapes, s_qk: float, s_vo: float) -> tuple[int | None, int | None, int]:
    d, h = shapes.hidden_size, shapes.head_dim
    q_rank = factor_rank(shapes.num_heads * h, d, s_qk)
    k_rank = factor_rank(shapes.num_kv_heads * h, d, s_qk)
    return q_rank, k_rank, h - math.floor(s_vo * h)


def budget_split(shapes: ModelShapes, ratio: float, k: float, lc_params: int,
                 attn_scale: float = 1.0) -> tuple[float, float, float]:
    """``(s_qk, s_vo, s_mlp)``: s_mlp solved so the exact total, ``lc_params`` included, hits ``ratio``.

    ``attn_scale`` multiplies sr_allocation's attention cut (1 = the paper's split; 0 = attention
    untouched, the FFNs take the whole cut), for methods built on Olica's selection.

    Raises :class:`RatioError` (with the reachable range) when s_mlp falls outside [0, 0.95].
    """
    s_qk, s_vo, s_mlp = _split(shapes, ratio, k, lc_params, attn_scale)
    if not 0.0 <= s_mlp <= _MAX_S_MLP:
        ranges = reachable_ratios(shapes, k, lc_params, attn_scale=attn_scale)
        where = " ∪ ".join(f"[{a:.3f}, {b:.3f}]" for a, b in ranges) or "none"
        why = (f"Q/K would keep no rank (s_qk = {s_qk:.3f})" if math.isinf(s_mlp) else
               f"the FFN would have to lose {s_mlp:.1%} of its channels (allowed 0–{_MAX_S_MLP:.0%})")
        raise RatioError(
            f"--ratio {ratio} is unreachable with method olica on this model: {why}. Reachable ratios "
            f"(k={k}, LC bypass {lc_params} params): {where}. Change --ratio (or --k / mlp_num)."
        )
    return s_qk, s_vo, s_mlp


def _split(shapes: ModelShapes, ratio: float, k: float, lc_params: int, attn_scale: float = 1.0) -> tuple[float, float, float]:
    s_qk, s_vo = (attn_scale * s for s in sr_allocation(ratio, k))
    q_rank, k_rank, h_v = attention_knobs(shapes, s_qk, s_vo)
    if min(r for r in (q_rank, k_rank, h_v) if r is not None) < 1:
        return s_qk, s_vo, math.inf  # attention alone overshoots: nothing left to factorise
    d, f, L = shapes.hidden_size, shapes.intermediate_size, shapes.num_layers
    attn_removed = shapes.dense_spec().num_params() - layer_spec(shapes, q_rank, k_rank, h_v, f, 0).num_params()
    need = ratio * shapes.total_params() + lc_params - L * attn_removed  # params the FFNs must lose
    return s_qk, s_vo, need / (L * 3 * d * f)


def reachable_ratios(shapes: ModelShapes, k: float, lc_params: int, step: float = 0.001,
                     attn_scale: float = 1.0) -> list[tuple[float, float]]:
    """Intervals of ratios (on a ``step`` grid) whose s_mlp lies in [0, 0.95]."""
    out: list[tuple[float, float]] = []
    for i in range(1, round(1 / step)):
        s = i * step
        if 0.0 <= _split(shapes, s, k, lc_params, attn_scale)[2] <= _MAX_S_MLP:
            if out and abs(out[-1][1] - (s - step)) < step / 2:
                out[-1] = (out[-1][0], s)
            else:
                out.append((s, s))
    return out


def ffn_counts(f: int, s_mlp: float, keep_least_frac: float) -> tuple[int, int]:
    """``(n_keep_least, n_pruned)``: keep the lowest ``floor(frac·f)``, prune the next ``floor(s_mlp·f)``."""
    n_least = math.floor(keep_least_frac * f)
    return n_least, min(math.floor(s_mlp * f), f - n_least - 1)


def pick_lc_layers(scores: list[float], mlp_num: int) -> tuple[int, ...]:
    """The ``mlp_num`` lowest linearity scores among all layers but the last (ties: lower index)."""
    order = sorted(range(len(scores) - 1), key=lambda i: (scores[i], i))
    return tuple(sorted(order[:mlp_num]))
