"""OBS column removal (``streamprune.kernels.obs``) against brute-force least squares (``lstsq``, and ``kernels.reference.obs_removal_cost_ref``).

Run: ``.venv/bin/pytest tests/test_obs.py -q``. Explicit activations ``h`` (tokens, n) with
correlated columns, a consumer ``W`` (out, n); every figure is checked against the direct
float64 solve of ``min ‖h Wᵀ − h_K W'ᵀ‖² + λ‖W' − W_K‖²`` over the kept columns K.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from streamprune.kernels import obs
from streamprune.kernels.obs import damped, ls_kept_weights, obs_cost_curve, obs_remove_columns
from streamprune.kernels.reference import obs_greedy_ref
from streamprune.kernels.reference import obs_removal_cost_ref as removal_cost


def _problem(n=12, out=5, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.5 + torch.eye(n)  # correlated columns
    h = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.double()
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    return h, w


def _brute_lstsq(h, w, kept, lam):
    """min_{W'} ‖h Wᵀ − h_K W'ᵀ‖² + λ‖W' − W_K‖², by torch.linalg.lstsq on the stacked system."""
    hk = h[:, kept]
    a = torch.cat([hk, lam ** 0.5 * torch.eye(len(kept), dtype=h.dtype)])
    b = torch.cat([h @ w.T, lam ** 0.5 * w[:, kept].T])
    return torch.linalg.lstsq(a, b).solution.T


def test_ls_kept_weights_is_the_ridge_toward_the_current_weights():
    h, w = _problem()
    gram = h.T @ h
    hd = damped(gram, 0.05)
    lam = float(hd[0, 0] - gram[0, 0])
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    assert torch.allclose(ls_kept_weights(w, hd, kept), _brute_lstsq(h, w, kept, lam), atol=1e-9, rtol=1e-9)
    # the objective tr((W'−W) H (W'−W)ᵀ) differs from the ridge's by a constant (λ‖W_S‖²): brute force
    removed = torch.tensor([1, 4, 6, 9, 10])
    wk = _brute_lstsq(h, w, kept, lam)
    ridge = float(((h @ w.T - h[:, kept] @ wk.T) ** 2).sum() + lam * ((wk - w[:, kept]) ** 2).sum())
    assert removal_cost(w, hd, removed) == pytest.approx(ridge + lam * float((w[:, removed] ** 2).sum()), rel=1e-9)


def test_removing_one_column_picks_the_brute_force_best_and_its_exact_refit():
    h, w = _problem()
    hd = damped(h.T @ h, 0.01)
    costs = [removal_cost(w, hd, torch.tensor([j])) for j in range(12)]
    kept, wk, cost = obs_remove_columns(w, h.T @ h, 1, damp=0.01)
    best = min(range(12), key=costs.__getitem__)
    assert set(range(12)) - set(kept.tolist()) == {best}
    assert cost == pytest.approx(costs[best], rel=1e-9)
    assert torch.allclose(wk, ls_kept_weights(w, hd, kept), atol=1e-10)


@pytest.mark.parametrize("block", [1, 3])
def test_greedy_costs_sum_to_the_brute_force_cost_of_the_removed_set(block):
    """The step-by-step weight updates and inverse downdates are exact: the costs the greedy
    steps report add up to the objective of refitting the final kept set directly."""
    h, w = _problem(seed=1)
    kept, wk, cost = obs_remove_columns(w, h.T @ h, 7, damp=0.01, block=block)
    removed = torch.tensor(sorted(set(range(12)) - set(kept.tolist())))
    assert len(kept) == 5 and len(removed) == 7
    assert cost == pytest.approx(removal_cost(w, damped(h.T @ h, 0.01), removed), rel=1e-8)


def test_greedy_removal_is_close_to_the_best_subset():
    """Greedy OBS is not optimal in general, but on a small problem it is within a few percent of
    the exhaustive best subset, and far better than removing by weight norm."""
    h, w = _problem(n=9, seed=2)
    hd = damped(h.T @ h, 0.01)
    _, _, cost = obs_remove_columns(w, h.T @ h, 3, damp=0.01)
    exhaustive = min(removal_cost(w, hd, torch.tensor(s)) for s in itertools.combinations(range(9), 3))
    by_norm = removal_cost(w, hd, torch.argsort(w.norm(dim=0))[:3])
    assert exhaustive <= cost <= 1.05 * exhaustive and cost < by_norm


def test_huge_damping_keeps_the_current_weights_and_protect_is_honoured():
    h, w = _problem()
    kept, wk, _ = obs_remove_columns(w, h.T @ h, 4, damp=1e9)
    assert torch.allclose(wk, w[:, kept], atol=1e-6)  # shrinks toward W, not toward zero
    protect = torch.tensor([0, 1, 2, 3])
    kept, _, _ = obs_remove_columns(w, h.T @ h, 8, protect=protect)
    assert kept.tolist() == [0, 1, 2, 3]


def test_float32_arithmetic_matches_float64_and_keeps_the_weights_dtype():
    h, w = _problem(n=64, out=16, tokens=512, seed=3)
    k64, w64, c64 = obs_remove_columns(w, h.T @ h, 20)
    k32, w32, c32 = obs_remove_columns(w.float(), (h.T @ h).float(), 20, dtype=torch.float32)
    assert w32.dtype == torch.float32 and torch.equal(k32, k64)
    assert torch.allclose(w32.double(), w64, rtol=1e-3, atol=1e-4) and c32 == pytest.approx(c64, rel=1e-3)


@pytest.mark.parametrize("kw,match", [({"n_remove": 13}, "n_remove"), ({"n_remove": -1}, "n_remove"),
                                      ({"block": 0}, "block"), ({"gram": torch.eye(5)}, "gram must be")])
def test_bad_arguments_name_the_value(kw, match):
    h, w = _problem()
    args = {"gram": h.T @ h, "n_remove": 2, **kw}
    with pytest.raises(ValueError, match=match):
        obs_remove_columns(w, args.pop("gram"), args.pop("n_remove"), **args)


@pytest.mark.parametrize("block", [1, 2])
def test_cost_curve_is_the_brute_force_cost_of_each_greedy_prefix(block):
    h, w = _problem(seed=4)
    gram = h.T @ h
    curve = obs_cost_curve(w, gram, 8, block=block)
    assert curve.shape == (9,) and curve[0] == 0 and bool((curve[1:] >= curve[:-1]).all())
    hd = damped(gram, 0.01)
    for k in range(0, 9, block):  # after each whole step, the curve is the removed set's exact cost
        kept, _, cost = obs_remove_columns(w, gram, k, block=block)
        removed = torch.tensor(sorted(set(range(12)) - set(kept.tolist())), dtype=torch.int64)
        assert float(curve[k]) == pytest.approx(cost, rel=1e-9, abs=1e-12)
        if k:
            assert float(curve[k]) == pytest.approx(removal_cost(w, hd, removed), rel=1e-8)


@pytest.mark.parametrize("block,flush", [(1, obs.FLUSH), (1, 7), (3, 7), (4, 1)])
def test_deferred_downdates_take_the_eager_steps(block, flush):
    """The kernel defers its downdates (applied as GEMMs once ``flush`` columns are pending); across several
    flushes and a partial one it takes the same columns in the same order, at the same costs,
    as the loop that applies each downdate at once (the float64 reference)."""
    h, w = _problem(n=160, out=24, tokens=600, seed=5)
    gram = h.T @ h
    n_remove = 150
    assert n_remove > 2 * flush
    alive_ref, steps_ref = obs_greedy_ref(w, gram, n_remove, block=block)
    alive, steps, _ = obs._greedy(w, damped(gram, 0.01), n_remove, block, torch.float64, None, flush=flush)
    assert torch.equal(alive, alive_ref)
    assert [k for k, _ in steps] == [k for k, _ in steps_ref]
    assert [c for _, c in steps] == pytest.approx([c for _, c in steps_ref], rel=1e-9, abs=1e-12)
    if flush == obs.FLUSH:  # the public curve is the same greedy
        curve = obs_cost_curve(w, gram, n_remove, block=block)
        assert float(curve[-1]) == pytest.approx(sum(c for _, c in steps_ref), rel=1e-9)
