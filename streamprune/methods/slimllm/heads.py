"""SlimLLM's attention numerics: head scores and greedy swap from moments, regression folding.

Guo et al., ICML 2025 (arXiv 2505.22689), ``/work/shared/spec/ALGORITHMS.md`` ("SlimLLM"),
generalised to grouped-query attention (:mod:`streamprune.methods.slimllm`, notes 4–7). Pass A
(:class:`~streamprune.methods.slimllm.observers.HeadObserver`) reduces the per-head o_proj
contributions ``T_i = A_i Wo_iᵀ`` (tokens, d) to the moments ``M`` (d, H, H) and ``S`` (H, d);
everything here works from those: the leave-one-out Pearson scores, the official greedy swap
(each candidate O(d), a rank-2 update), and the per-output-dim linear regression
(``np.polyfit(x, y, 1)``) folded into o_proj. :func:`linear_fit` and :func:`fold_regression`
serve the FFN regression too. Pure functions on tensors; Pearson in float64 (note 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def head_pools(num_heads: int, num_kv_heads: int) -> list[list[int]]:
    """Heads that compete for the pruned slots: the whole layer (MHA) or each KV group (GQA)."""
    hpg = num_heads // num_kv_heads
    if hpg == 1:
        return [list(range(num_heads))]
    return [list(range(g * hpg, (g + 1) * hpg)) for g in range(num_kv_heads)]


def _abs_pearson_sum(n: float, sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor, sxy: Tensor, eps: float = 1e-12) -> Tensor:
    """``Σ_c |ρ_c|`` over the last dim, float64; a degenerate column contributes 0."""
    cov = n * sxy - sx * sy
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    ok = (vx > eps * (n * sxx).abs()) & (vy > eps * (n * syy).abs()) & (vx > 0) & (vy > 0)
    rho = torch.where(ok, cov / torch.where(ok, (vx * vy).sqrt(), torch.ones_like(vx)), torch.zeros_like(cov))
    return rho.abs().clamp(max=1.0).sum(-1)


@dataclass
class HeadMoments:
    """Cross moments of the per-head o_proj contributions ``T_i`` (tokens, d), float64."""

    n: int
    M: Tensor  # (d, H, H) Σ_t T_i[t,c]·T_j[t,c]
    S: Tensor  # (H, d) Σ_t T_i[t,c]

    def __post_init__(self) -> None:
        self.M, self.S = self.M.double(), self.S.double()
        self.M1 = self.M.sum(2).T.contiguous()  # (H, d) Σ_j M[c,i,j] = Σ_t T_i·Y
        self.Md = self.M.diagonal(dim1=1, dim2=2).T.contiguous()  # (H, d) Σ_t T_i²
        self.sy, self.syy = self.S.sum(0), self.M1.sum(0)  # (d,) Σ Y, Σ Y²

    def fit_terms(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Σx, Σx², Σxy)`` per column for ``x = Σ_i w_i T_i``; w (H,) float64."""
        return w @ self.S, torch.einsum("i,cij,j->c", w, self.M, w), w @ self.M1

    def corr(self, w: Tensor) -> float:
        sx, sxx, sxy = self.fit_terms(w)
        return float(_abs_pearson_sum(self.n, sx, self.sy, sxx, self.syy, sxy))


def head_scores(hm: HeadMoments) -> Tensor:
    """(H,) ``s_i = Σ_c |Pearson(Y − T_i, Y)|``: large = removing head i changes little."""
    sx, sxx, sxy = hm.sy - hm.S, hm.syy - 2 * hm.M1 + hm.Md, hm.syy - hm.M1
    return _abs_pearson_sum(hm.n, sx, hm.sy, sxx, hm.syy, sxy)


def select_heads(hm: HeadMoments, pools: list[list[int]], n_prune: int) -> tuple[list[int], Tensor]:
    """Kept heads (ascending) and the scores: the ``n_prune`` top-scored heads of every pool are
    pruned, then the greedy swap (note 5) maximises ``corr(Σ_kept T, Y)``."""
    s = head_scores(hm).tolist()
    slots, pruned = [], []
    for pool in pools:
        order = sorted(pool, key=lambda i: (-s[i], i))
        pruned += order[:n_prune]
        slots.append(order[n_prune:])
    pool_of = {i: k for k, pool in enumerate(pools) for i in pool}
    w = torch.zeros(len(pool_of), dtype=torch.float64, device=hm.S.device)
    w[torch.tensor([i for sl in slots for i in sl], dtype=torch.long, device=w.device)] = 1.0
    best = hm.corr(w)
    for p in sorted(pruned, key=lambda i: (-s[i], i)):
        sl = slots[pool_of[p]]
        if not sl:
            continue
        J = torch.tensor(sl, device=w.device)
        u = torch.einsum("cij,j->ic", hm.M, w)  # (H, d) Σ_t T_i·x
        sx0, sxx0, sxy0 = hm.fit_terms(w)
        # x' = x − T_j + T_p for every kept slot j at once: rank-2 updates of the moments
        sx = sx0 - hm.S[J] + hm.S[p]
        sxx = sxx0 - 2 * u[J] + 2 * u[p] + hm.Md[J] + hm.Md[p] - 2 * hm.M[:, J, p].T
        sxy = sxy0 - hm.M1[J] + hm.M1[p]
        cand = _abs_pearson_sum(hm.n, sx, hm.sy, sxx, hm.syy, sxy)  # (|J|,)
        k = int(torch.argmax(cand))  # first maximum, as the official j-loop with a strict ">"
        if float(cand[k]) > best:
            best, w[sl[k]], w[p], sl[k] = float(cand[k]), 0.0, 1.0, p
    return sorted(i for sl in slots for i in sl), torch.tensor(s)


def linear_fit(n: float, sx: Tensor, sy: Tensor, sxx: Tensor, sxy: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Per-column least squares ``y ≈ a·x + b`` from moments (``np.polyfit(x, y, 1)``), float64."""
    sx, sy, sxx, sxy = (t.double() for t in (sx, sy, sxx, sxy))
    vx, cov = n * sxx - sx * sx, n * sxy - sx * sy
    ok = vx > eps * (n * sxx).abs()
    a = torch.where(ok, cov / torch.where(ok, vx, torch.ones_like(vx)), torch.zeros_like(vx))
    return a, (sy - a * sx) / n


def fold_regression(weight: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(diag(a)·W, b + bias)``: the linear layer then outputs ``a ⊙ (W z) + b (+ bias)``.
    Computed in fp32 (or the weight's dtype if wider), returned in the weight's dtype."""
    ct = torch.promote_types(weight.dtype, torch.float32)
    a, b = a.to(weight.device, ct), b.to(weight.device, ct)
    new_b = b if bias is None else b + bias.to(ct)
    return (weight.to(ct) * a[:, None]).to(weight.dtype), new_b.to(weight.dtype)


def slice_heads(weights: dict[str, Tensor], kept: list[int], num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, Tensor]:
    """Keep query heads ``kept`` (their q rows, o columns) and the KV groups they use.

    q/k norms: one over each head's dims (shared by every head) stays whole; one over the
    whole projection (its size H·h, resp. G·h) keeps the kept heads' (groups') entries."""
    hpg, h = num_heads // num_kv_heads, head_dim
    out = {k: v for k, v in weights.items() if not k.startswith("self_attn.")}
    if "self_attn.o_proj.bias" in weights:
        out["self_attn.o_proj.bias"] = weights["self_attn.o_proj.bias"]
    if not kept:
        return out
    dev = weights["self_attn.q_proj.weight"].device
    q_rows = torch.tensor([i * h + c for i in kept for c in range(h)], device=dev)
    kv_rows = torch.tensor([g * h + c for g in sorted({i // hpg for i in kept}) for c in range(h)], device=dev)
    for p, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        for kind in ("weight", "bias"):
            name = f"self_attn.{p}_proj.{kind}"
            if name in weights:
                out[name] = weights[name][rows].contiguous()
    for p, rows, n in (("q", q_rows, num_heads), ("k", kv_rows, num_kv_heads)):
        norm = weights.get(f"self_attn.{p}_norm.weight")
        if norm is not None:
            out[f"self_attn.{p}_norm.weight"] = norm[rows].contiguous() if norm.numel() == n * h and n > 1 else norm
    out["self_attn.o_proj.weight"] = weights["self_attn.o_proj.weight"][:, q_rows].contiguous()
    return out
