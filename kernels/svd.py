"""Truncated and activation-weighted SVD.

Solvers (all return the top ``rank`` triplets, singular values descending):

- ``"full"``: ``torch.linalg.svd(full_matrices=False)`` then truncate. Exact; O(m·n·min(m,n)).
- ``"gram"``: ``eigh`` of the smaller Gram matrix (aᵀa or aaᵀ) in the working dtype.
  Cheapest exact-rank route on GPU, but squaring the matrix squares its condition number:
  eigenvalues carry an absolute error ~ ε·σ₁², so σᵢ has relative error ~ ε·(σ₁/σᵢ)² and
  singular values below ~sqrt(ε)·σ₁ (≈3e-4·σ₁ in fp32) and their vectors are noise.
  Fine for truncations that keep only the large σ; do not use it to invert small ones.
- ``"randomized"``: Halko, Martinsson & Tropp (2011), Alg. 4.4/5.1: Gaussian sketch of
  ``rank + oversample`` columns, ``power_iters`` subspace iterations with QR
  re-orthonormalisation after every product, then the exact SVD of the small projection.
  The sketch comes from a ``torch.Generator`` on the tensor's device seeded with ``seed``,
  so the result is deterministic. Accurate when the spectrum decays past ``rank``.
- ``"auto"``: :func:`choose_solver`.

Sign convention (every solver): each pair (U[:, i], Vh[i, :]) is flipped so that the entry
of U[:, i] with the largest magnitude (first one on ties) is positive. Same input, device
and solver ⇒ same bytes.

Computation is in fp32 (fp64 input stays fp64, which the tests' references use).
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamprune.errors import NumericalError

__all__ = ["SOLVERS", "choose_solver", "truncated_svd", "weighted_svd"]

SOLVERS = ("full", "gram", "randomized")

# choose_solver: below this smallest dimension a full SVD is cheap enough on any device;
# above this fraction of min(m, n) the randomized sketch is nearly as big as the matrix.
_FULL_MAX_DIM = 1024
_RANDOMIZED_MAX_RANK_FRACTION = 0.25


def choose_solver(m: int, n: int, rank: int, device: torch.device | str | None = None) -> str:
    """The solver ``"auto"`` uses for an m×n matrix at ``rank``.

    ``"full"`` when ``min(m, n) <= 1024`` or ``rank > 0.25·min(m, n)``, else ``"randomized"``.
    The rule is the same on every device (``device`` is accepted so a device-specific rule
    can be added without changing callers).
    """
    k = min(m, n)
    if k <= _FULL_MAX_DIM or rank > _RANDOMIZED_MAX_RANK_FRACTION * k:
        return "full"
    return "randomized"


def _fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each (U[:, i], Vh[i, :]) so U's largest-|.| entry in column i is positive."""
    idx = U.abs().argmax(dim=0, keepdim=True)  # (1, r) first max on ties
    sign = torch.sign(torch.gather(U, 0, idx)).squeeze(0)  # (r,)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign[:, None]


def _svd_full(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def _svd_gram(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    m, n = a.shape
    tiny = torch.finfo(a.dtype).tiny
    if m >= n:
        evals, V = torch.linalg.eigh(a.T @ a)  # (n,), (n, n) ascending
        S = evals.flip(0)[:rank].clamp_min(0).sqrt()  # (r,)
        V = V.flip(1)[:, :rank]  # (n, r)
        # U = A V / S; a zero σ has no defined left vector: leave that column zero (U·S = 0).
        U = (a @ V) / torch.where(S > tiny, S, torch.ones_like(S))
        U = torch.where(S > tiny, U, torch.zeros_like(U))
        return U, S, V.T
    evals, U = torch.linalg.eigh(a @ a.T)  # (m,), (m, m) ascending
    S = evals.flip(0)[:rank].clamp_min(0).sqrt()
    U = U.flip(1)[:, :rank]  # (m, r)
    Vh = (U.T @ a) / torch.where(S > tiny, S, torch.ones_like(S))[:, None]
    Vh = torch.where(S[:, None] > tiny, Vh, torch.zeros_like(Vh))
    return U, S, Vh


def _svd_randomized(
    a: Tensor, rank: int, oversample: int, power_iters: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    m, n = a.shape
    k = min(rank + oversample, m, n)
    if k >= min(m, n):  # the sketch would be the whole range: nothing to gain
        return _svd_full(a, rank)
    gen = torch.Generator(device=a.device).manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, device=a.device, dtype=a.dtype)  # (n, k)
    Q = torch.linalg.qr(a @ omega).Q  # (m, k) orthonormal basis of the sketch
    for _ in range(power_iters):
        Z = torch.linalg.qr(a.T @ Q).Q  # (n, k)
        Q = torch.linalg.qr(a @ Z).Q  # (m, k)
    Ub, S, Vh = torch.linalg.svd(Q.T @ a, full_matrices=False)  # (k, k), (k,), (k, n)
    return (Q @ Ub[:, :rank]), S[:rank], Vh[:rank]


def truncated_svd(
    a: Tensor,
    rank: int,
    solver: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of a 2-D matrix → ``(U_r (m, r), S_r (r,), Vh_r (r, n))``, a ≈ U_r diag(S_r) Vh_r.

    Works in fp32 (bf16/fp16 input is upcast; fp64 stays fp64). See the module docstring for
    the solvers and the sign convention. Raises :class:`NumericalError` on NaN/Inf input or
    a factorisation that does not converge.
    """
    if a.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(a.shape)}")
    m, n = a.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")
    if solver == "auto":
        solver = choose_solver(m, n, rank, a.device)
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; choose one of {('auto',) + SOLVERS}")
    a = a if a.dtype == torch.float64 else a.to(torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise NumericalError(
            f"the {m}×{n} matrix to factorise contains NaN/Inf; check the weights and the activation "
            "statistics (accumulate in fp32)."
        )
    try:
        if solver == "full":
            U, S, Vh = _svd_full(a, rank)
        elif solver == "gram":
            U, S, Vh = _svd_gram(a, rank)
        else:
            U, S, Vh = _svd_randomized(a, rank, oversample, power_iters, seed)
    except torch.linalg.LinAlgError as e:  # did not converge
        raise NumericalError(
            f"{solver} SVD of a {m}×{n} matrix (rank {rank}) failed to converge: {e}. "
            "Try solver='full' or check the statistics for extreme values."
        ) from e
    U, Vh = _fix_signs(U, Vh)
    return U, S, Vh


def weighted_svd(
    w: Tensor,
    act_scale: Tensor,
    rank: int,
    balance: str = "left",
    solver: str = "auto",
    seed: int = 0,
    floor: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Activation-weighted SVD (AWSVD) of ``w`` (m, n) → ``(up (m, r), down (r, n))`` in ``w.dtype``.

    ``act_scale`` (n,) is sqrt of the input energy of each input column (``D = diag(act_scale)``);
    entries below ``floor·max(act_scale)`` are raised to it so D⁻¹ stays finite (an all-zero
    ``act_scale`` means no information: plain SVD). Factor ``W D = U S Vᵀ`` at ``rank``, then

    - ``balance="left"`` (Olica): ``up = U_r S_r``, ``down = V_rᵀ D⁻¹``;
    - ``balance="sqrt"`` (LoRAP): ``up = U_r S_r^{1/2}``, ``down = S_r^{1/2} V_rᵀ D⁻¹``.

    ``w ≈ up @ down``, optimal in ‖(W − up·down) D‖_F. Computed in fp32.
    """
    if balance not in ("left", "sqrt"):
        raise ValueError(f"balance must be 'left' (Olica) or 'sqrt' (LoRAP), got {balance!r}")
    if w.dim() != 2 or act_scale.shape != (w.shape[1],):
        raise ValueError(
            f"w must be (m, n) and act_scale (n,): got w {tuple(w.shape)}, act_scale {tuple(act_scale.shape)}"
        )
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    s = act_scale.to(torch.float32)  # (n,)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise NumericalError(
            f"act_scale ({s.numel()},) has NaN/Inf or negative entries; it must be sqrt of an input "
            "energy accumulated in fp32."
        )
    smax = s.max()
    s = torch.ones_like(s) if float(smax) == 0.0 else s.clamp_min(floor * smax)
    wd = w.to(torch.float32) * s  # (m, n) = W D
    U, S, Vh = truncated_svd(wd, rank, solver=solver, seed=seed)
    if balance == "left":
        up = U * S  # (m, r)
        down = Vh / s  # (r, n) = V_rᵀ D⁻¹
    else:
        root = S.sqrt()
        up = U * root
        down = (root[:, None] * Vh) / s
    return up.to(w.dtype), down.to(w.dtype)
