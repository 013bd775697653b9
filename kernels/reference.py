"""Plain float64 references for every kernel (tests only; obviously correct, not fast).

Each takes explicit data (not moments, where the kernel works from moments) so a test can
check the kernel end to end against the definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).to(F64)


def energy_ref(x: Tensor) -> Tensor:
    """Σ_rows x² → (d,) float64."""
    return _rows(x).square().sum(0)


def colsum_ref(x: Tensor) -> Tensor:
    """Σ_rows x → (d,) float64."""
    return _rows(x).sum(0)


def gram_ref(x: Tensor) -> Tensor:
    """xᵀx → (d, d) float64."""
    x = _rows(x)
    return x.T @ x


def cross_ref(x: Tensor, y: Tensor) -> Tensor:
    """xᵀy → (dx, dy) float64."""
    return _rows(x).T @ _rows(y)


def pearson_ref(u: Tensor, v: Tensor) -> Tensor:
    """Per-column Pearson of u, v (tokens, c) by explicit centring → (c,) float64."""
    u = _rows(u)
    v = _rows(v)
    uc = u - u.mean(0)
    vc = v - v.mean(0)
    return (uc * vc).sum(0) / torch.sqrt(uc.square().sum(0) * vc.square().sum(0))


def linear_fit_pearson_ref(x: Tensor, y: Tensor, W: Tensor) -> Tensor:
    """Per-column Pearson of x @ W and y → (c,) float64."""
    return pearson_ref(_rows(x) @ W.to(F64), y)


def ridge_ref(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """(xᵀx + λI)⁻¹ xᵀy by a float64 dense solve → (dx, dy)."""
    x = _rows(x)
    A = x.T @ x + lam * torch.eye(x.shape[1], dtype=F64)
    return torch.linalg.solve(A, x.T @ _rows(y))


def svd_ref(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """float64 full SVD truncated to rank, same sign convention as the kernel."""
    U, S, Vh = torch.linalg.svd(a.to(F64), full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


def weighted_svd_ref(w: Tensor, act_scale: Tensor, rank: int, floor: float = 1e-4) -> Tensor:
    """The AWSVD approximation of w at rank, in float64: (W D)_r D⁻¹ → (m, n)."""
    s = act_scale.to(F64)
    s = s.clamp_min(floor * s.max())
    U, S, Vh = svd_ref(w.to(F64) * s, rank)
    return (U * S) @ Vh / s


def obs_removal_cost_ref(w: Tensor, h: Tensor, removed: Tensor) -> float:
    """``min_{W'} tr((W' − W) H (W' − W)ᵀ)`` over ``W'`` zero on columns ``removed``, by a direct
    float64 solve on the kept columns K: ``W'_K = (W H)_{:,K} H_KK⁻¹`` (the OBS kernel's reference)."""
    h, w = h.to(F64), w.to(F64)
    keep = torch.ones(h.shape[0], dtype=torch.bool)
    keep[removed] = False
    wk = torch.linalg.solve(h[keep][:, keep], (w @ h)[:, keep].T).T
    full = torch.zeros_like(w)
    full[:, keep] = wk
    delta = full - w
    return float(((delta @ h) * delta).sum())


def obs_greedy_ref(w: Tensor, gram: Tensor, n_remove: int, damp: float = 0.01, block: int = 1) -> tuple[Tensor, list[tuple[int, float]]]:
    """The greedy OBS steps with every downdate applied at once, in float64 (what
    ``kernels.obs`` defers): (alive mask, [(columns removed, cost) per step])."""
    h = gram.to(F64).clone()
    h.diagonal().add_(max(damp * float(h.diagonal().mean()), 1e-12))
    hinv, cur = torch.linalg.inv(h), w.to(F64).clone()
    alive = torch.ones(h.shape[0], dtype=torch.bool)
    steps, left = [], n_remove
    while left > 0:
        k = min(block, left)
        single = torch.where(alive, cur.pow(2).sum(0) / hinv.diagonal(), torch.full((h.shape[0],), float("inf"), dtype=F64))
        s = torch.topk(single, k, largest=False, sorted=True).indices
        hss_inv = torch.linalg.inv(hinv[s][:, s])
        ws = cur[:, s] @ hss_inv
        steps.append((k, float((ws * cur[:, s]).sum())))
        row = hinv[s].clone()
        cur -= ws @ row
        hinv -= row.T @ hss_inv @ row
        cur[:, s], hinv[s], hinv[:, s] = 0, 0, 0
        alive[s] = False
        left -= k
    return alive, steps
