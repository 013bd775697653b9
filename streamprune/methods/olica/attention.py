"""Olica's attention numerics: Fast-OND on V/O per KV group, value-dimension scores and slicing.

He & Lin, ICML 2025 (arXiv 2506.08436), ``/work/shared/spec/ALGORITHMS.md`` ("V/O: Fast-OND
rotation, then per-head neuron pruning"), generalised to grouped-query attention: one
rotation per KV group from the stacked o_proj blocks of all its query heads (for H = G this
is the official code). The exact-OND ablation is :func:`exact_ond_transform`. Q/K use the
activation-weighted SVD of :mod:`streamprune.kernels` directly. Pure functions: fp32
tensors in and out, no hooks, devices or files.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.svd import truncated_svd



def _apply_value_basis(wv: Tensor, wo: Tensor, T: Tensor, T_inv_t: Tensor, hpg: int) -> tuple[Tensor, Tensor]:
    """Values v ← v·T per group: ``Wv_g ← Tᵀ Wv_g``, ``Wo_q ← Wo_q T⁻ᵀ``. fp32 in, fp32 out."""
    G, h, _ = T.shape
    d = wv.shape[1]
    wv_new = (T.transpose(1, 2) @ wv.reshape(G, h, d)).reshape(G * h, d)  # (G·h, d)
    wo_new = torch.einsum("dgqi,gij->dgqj", wo.reshape(d, G, hpg, h), T_inv_t).reshape(d, G * hpg * h)
    return wv_new, wo_new


def _stacked_o(wo: Tensor, eo: Tensor, G: int, hpg: int, h: int) -> Tensor:
    """(G, h, hpg·d): per group ``[Wo_q1ᵀ Dout, Wo_q2ᵀ Dout, …]``."""
    d = wo.shape[0]
    dout = eo.float().clamp_min(0).sqrt().to(wo.device)  # (d,)
    return (wo.reshape(d, G, hpg, h) * dout[:, None, None, None]).permute(1, 3, 2, 0).reshape(G, h, hpg * d)


def fast_ond_rotation(wv: Tensor, wo: Tensor, eo: Tensor, n_heads_per_group: int, head_dim: int,
                      solver: str = "auto", seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Fast-OND per KV group → ``(wv_rot (G·h, d), wo_rot (d, H·h), U (G, h, h))``, fp32.

    ``M_g = [Wo_qᵀ Dout]_q = U Σ Vᵀ``; ``Wv_g ← Uᵀ Wv_g``, ``Wo_q ← Wo_q U``. U is orthogonal,
    so the layer computes the same function.
    """
    h, hpg = head_dim, n_heads_per_group
    G = wv.shape[0] // h
    wv32, wo32 = wv.float(), wo.float()
    M = _stacked_o(wo32, eo, G, hpg, h)
    U = torch.stack([truncated_svd(M[g], h, solver=solver, seed=seed)[0] for g in range(G)])  # (G, h, h)
    wv_rot, wo_rot = _apply_value_basis(wv32, wo32, U, U, hpg)
    return wv_rot, wo_rot, U


def exact_ond_transform(wv: Tensor, wo: Tensor, eo: Tensor, n_heads_per_group: int, head_dim: int,
                        solver: str = "auto", seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Exact OND (ablation, O(G·d²·(H/G)·d)): like :func:`fast_ond_rotation`, T not orthogonal."""
    h, hpg = head_dim, n_heads_per_group
    G = wv.shape[0] // h
    wv32, wo32 = wv.float(), wo.float()
    M = _stacked_o(wo32, eo, G, hpg, h)
    Ts, Tits = [], []
    for g in range(G):
        wv_g = wv32[g * h:(g + 1) * h]  # (h, d)
        U_h = truncated_svd(wv_g.T @ M[g], h, solver=solver, seed=seed)[0]  # (d, h)
        T_inv_t = wv_g @ U_h  # (h, h) = (U_hᵀ Wv_gᵀ)ᵀ
        Ts.append(torch.linalg.inv(T_inv_t.T))
        Tits.append(T_inv_t)
    T = torch.stack(Ts)
    wv_new, wo_new = _apply_value_basis(wv32, wo32, T, torch.stack(Tits), hpg)
    return wv_new, wo_new, T


def value_scores(wv_rot: Tensor, wo_rot: Tensor, ev: Tensor, o_grams: Tensor, T: Tensor, n_heads_per_group: int) -> Tensor:
    """(G, h) importance of each value dimension in the new basis.

    ``I_j = ‖|Wv_g[j,:]| ⊙ sqrt(ev)‖ + Σ_q ‖Wo_q[:, j]‖·sqrt(eoin[q, j])``, with the o_proj
    input energy in the new basis ``eoin[q] = diag(Tᵀ G_q T)`` from the per-head Grams
    ``o_grams`` (H, h, h) of the original basis.
    """
    G, h, _ = T.shape
    d, hpg = wv_rot.shape[1], n_heads_per_group
    v_part = (wv_rot * ev.float().sqrt()).norm(dim=1).reshape(G, h)
    Tq = T.repeat_interleave(hpg, dim=0)  # (H, h, h)
    eoin = ((o_grams.float() @ Tq) * Tq).sum(dim=1).clamp_min(0)  # (H, h)
    o_part = wo_rot.reshape(d, G * hpg, h).norm(dim=0) * eoin.sqrt()  # (H, h)
    return v_part + o_part.reshape(G, hpg, h).sum(dim=1)


def keep_lowest_dropped(scores: Tensor, n_drop: int) -> Tensor:
    """(G, h − n_drop) kept indices per row (ascending), dropping the ``n_drop`` lowest scores."""
    order = torch.argsort(scores, dim=1, stable=True)
    return torch.sort(order[:, n_drop:], dim=1).values


def slice_values(wv: Tensor, wo: Tensor, keep: Tensor, n_heads_per_group: int,
                 bv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep value dims ``keep`` (G, h_v) of every group: v rows, o columns of every query head."""
    G, h_v = keep.shape
    d = wv.shape[1]
    h = wv.shape[0] // G
    wv_s = torch.gather(wv.reshape(G, h, d), 1, keep[:, :, None].expand(G, h_v, d)).reshape(G * h_v, d)
    wo4 = wo.reshape(d, G, n_heads_per_group, h)
    idx = keep[None, :, None, :].expand(d, G, n_heads_per_group, h_v)
    wo_s = torch.gather(wo4, 3, idx).reshape(d, G * n_heads_per_group * h_v)
    bv_s = None if bv is None else torch.gather(bv.reshape(G, h), 1, keep).reshape(-1)
    return wv_s, wo_s, bv_s
