"""Per-column Pearson correlation from accumulated moments (no activations needed).

For columns ``u[:, c]`` and ``v[:, c]`` over ``n`` rows,
``ρ_c = (n·Σuv − Σu·Σv) / sqrt((n·Σu² − (Σu)²)·(n·Σv² − (Σv)²))``.
The sums come in fp32 (see :mod:`streamprune.kernels.moments`); the centring and the
division are done in float64 on (c,) vectors — a few element-wise ops, cheap on CPU and
GPU alike — so the subtraction adds no cancellation error of its own. What the fp32 sums
already lost cannot be recovered: a column whose std/|mean| is below ~1e-3 is not resolved.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pearson_from_moments", "linear_fit_pearson"]


def _f64(t: Tensor | float | int, device: torch.device) -> Tensor:
    return torch.as_tensor(t, device=device).to(torch.float64)


def pearson_from_moments(
    n: int | float | Tensor,
    su: Tensor,
    sv: Tensor,
    suu: Tensor,
    svv: Tensor,
    suv: Tensor,
    eps: float = 1e-12,
) -> Tensor:
    """Per-column Pearson correlation of u and v from their sums → (c,) fp32 in [-1, 1].

    Args: ``n`` rows; ``su``/``sv`` (c,) Σu, Σv; ``suu``/``svv`` (c,) Σu², Σv²; ``suv`` (c,) Σuv.
    A column whose centred variance is ``<= eps`` times its raw second moment ``n·Σu²``
    (constant, or all zero) gets correlation 0.
    """
    shapes = {t.shape for t in (su, sv, suu, svv, suv)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"su, sv, suu, svv, suv must all be (c,), got shapes {sorted(map(tuple, shapes))}")
    dev = su.device
    n64 = _f64(n, dev)
    su, sv, suu, svv, suv = (_f64(t, dev) for t in (su, sv, suu, svv, suv))
    cov = n64 * suv - su * sv  # (c,) = n²·cov
    raw_u = (n64 * suu).abs()  # (c,) uncentred, same units as var_u
    raw_v = (n64 * svv).abs()
    var_u = n64 * suu - su * su  # (c,) = n²·var(u)
    var_v = n64 * svv - sv * sv
    ok = (var_u > eps * raw_u) & (var_v > eps * raw_v) & (var_u > 0) & (var_v > 0)
    denom = torch.sqrt(var_u.clamp_min(0) * var_v.clamp_min(0))
    r = torch.where(ok, cov / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0).to(torch.float32)


def linear_fit_pearson(
    n: int | float | Tensor,
    sx: Tensor,
    xtx: Tensor,
    xty: Tensor,
    sy: Tensor,
    syy_diag: Tensor,
    W: Tensor,
    block_cols: int = 4096,
) -> Tensor:
    """Pearson, per output column, between the linear fit ``u = X W`` and the truth ``y`` → (c,) fp32.

    Needs only moments: ``n`` rows, ``sx`` (dx,) Σx, ``xtx`` (dx, dx) XᵀX, ``xty`` (dx, c) XᵀY,
    ``sy`` (c,) Σy, ``syy_diag`` (c,) Σy², and ``W`` (dx, c). Then Σu = sxᵀW,
    Σu² = diag(Wᵀ XᵀX W) (column blocks of ``block_cols``, never a c×c matrix),
    Σuy = diag(Wᵀ XᵀY). Matmuls in fp32, centring in float64.
    """
    dx, c = W.shape
    if xtx.shape != (dx, dx) or xty.shape != (dx, c) or sx.shape != (dx,):
        raise ValueError(
            f"W is {tuple(W.shape)}: need xtx ({dx}, {dx}), xty ({dx}, {c}), sx ({dx},); "
            f"got {tuple(xtx.shape)}, {tuple(xty.shape)}, {tuple(sx.shape)}"
        )
    if sy.shape != (c,) or syy_diag.shape != (c,):
        raise ValueError(f"sy and syy_diag must be ({c},), got {tuple(sy.shape)} and {tuple(syy_diag.shape)}")
    W32 = W.to(torch.float32)
    xtx32 = xtx.to(torch.float32)
    su = sx.to(torch.float32) @ W32  # (c,)
    suu = torch.empty(c, dtype=torch.float32, device=W.device)
    for j in range(0, c, block_cols):
        Wb = W32[:, j : j + block_cols]  # (dx, cb)
        suu[j : j + block_cols] = (Wb * (xtx32 @ Wb)).sum(dim=0)
    suv = (W32 * xty.to(torch.float32)).sum(dim=0)  # (c,)
    return pearson_from_moments(n, su, sy, suu, syy_diag, suv)
