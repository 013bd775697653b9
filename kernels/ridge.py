"""Ridge regression from moments: ``W = (XᵀX + λI)⁻¹ XᵀY`` by Cholesky, with damping fallback.

Used by Olica's Linear Calibration and its layer survey (ALGORITHMS.md, "Linear
Calibration"): λ follows the official code, ``percdamp · mean(diag(XᵀX))`` scaled by the
number of 128×128 token blocks.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from streamprune.errors import NumericalError

__all__ = ["ridge_lambda", "ridge_solve"]

log = logging.getLogger(__name__)

# When the caller asks for λ = 0 and Cholesky fails, the first damping tried is this
# fraction of mean|diag(XᵀX)|; each further try multiplies λ by 10.
_FIRST_DAMPING = 1e-6


def _require_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"{name} {tuple(t.shape)} contains NaN/Inf; the statistics overflowed or the model produced "
            "NaNs. Accumulate statistics in fp32 and check the calibration data (or run with --dtype float32)."
        )


def ridge_lambda(xtx: Tensor, percdamp: float, nsamples: int, seqlen: int) -> float:
    """Ridge strength ``percdamp · mean(diag(xtx)) / ((nsamples/128)·(seqlen/128))``.

    With percdamp 1.0 and 256×128 calibration tokens this is the official 0.5·mean(diag).
    """
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be square (d, d), got {tuple(xtx.shape)}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    mean_diag = float(xtx.diagonal().to(torch.float64).mean())
    if not math.isfinite(mean_diag):
        _require_finite(xtx, "xtx")
    return percdamp * mean_diag / ((nsamples / 128.0) * (seqlen / 128.0))


def ridge_solve(xtx: Tensor, xty: Tensor, lam: float, max_tries: int = 6) -> tuple[Tensor, float]:
    """Solve ``(xtx + lam·I) W = xty`` in fp32 by Cholesky → ``(W (d, c) fp32, lam_used)``.

    If the factorisation fails (matrix not positive definite) or the solution is not
    finite, λ is multiplied by 10 (or, from λ = 0, set to 1e-6·mean|diag|) and the solve
    retried, up to ``max_tries`` attempts in all; every retry is logged as a warning.
    Raises :class:`NumericalError` on NaN/Inf input or when all attempts fail.
    """
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be square (d, d), got {tuple(xtx.shape)}")
    d = xtx.shape[0]
    if xty.dim() != 2 or xty.shape[0] != d:
        raise ValueError(f"xty must be ({d}, c) to match xtx, got {tuple(xty.shape)}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    lam = float(lam)
    if not (lam >= 0 and lam < float("inf")):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    _require_finite(xtx, "xtx")
    _require_finite(xty, "xty")

    A = xtx.to(torch.float32)  # (d, d)
    B = xty.to(torch.float32)  # (d, c)
    M = torch.empty_like(A)  # one (d, d) work buffer, refilled per attempt
    first = _FIRST_DAMPING * (float(A.diagonal().abs().mean()) or 1.0) if d else _FIRST_DAMPING
    lam_in = lam
    for attempt in range(max_tries):
        tried = lam
        M.copy_(A)
        M.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            W = torch.cholesky_solve(B, L)  # (d, c) fp32
            if bool(torch.isfinite(W).all()):
                if attempt:
                    log.warning("ridge: Cholesky of %d×%d needed damping %.3g (asked %.3g)", d, d, lam, lam_in)
                return W, lam
        lam = lam * 10.0 if lam > 0 else first
    raise NumericalError(
        f"ridge solve failed: the {d}×{d} matrix XᵀX + λI is not positive definite in fp32 after "
        f"{max_tries} tries (λ from {lam_in:.3g} up to {tried:.3g}). Accumulate the statistics in fp32, "
        "use more calibration samples (--nsamples) or a larger damping (--percdamp)."
    )
