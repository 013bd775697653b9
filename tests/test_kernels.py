"""Every kernel in ``streamprune.kernels`` against its float64 reference.

Run:  . .venv/bin/activate && python -m pytest tests/test_kernels.py -q     (CPU, ~10 s)

Tolerances. The moment kernels upcast each block to fp32, so a bf16/fp16 input value is
represented exactly; the references are computed from the *same* (rounded) values in
float64, so the only error left is fp32 accumulation, which does not depend on the input
dtype. That is why ``MOMENT_RTOL`` is the same for every input dtype — and why a kernel that
accumulated in bf16/fp16 (relative error ~1e-2/1e-3 after a few hundred rows) fails here.
Errors are measured as ‖kernel − reference‖ / ‖reference‖ (Frobenius), never elementwise.
"""

from __future__ import annotations

import logging

import pytest
import torch

from streamprune.errors import NumericalError
from streamprune.kernels.moments import Moments, colsum, cross, energy, gram
from streamprune.kernels.pearson import linear_fit_pearson, pearson_from_moments
from streamprune.kernels.ridge import ridge_lambda, ridge_solve
from streamprune.kernels.svd import choose_solver, truncated_svd, weighted_svd
from streamprune.kernels import reference as ref

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 accumulation of a few hundred rows, per input dtype (see module docstring).
MOMENT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# (tokens, d): tall (many tokens), wide (fewer tokens than features), square.
ROW_SHAPES = {"tall": (517, 24), "wide": (40, 96), "square": (64, 64)}
BLOCKS = [17, 4096]  # 17 < tokens: several blocks and a ragged last one; 4096: one block


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def acts(tokens: int, d: int, dtype: torch.dtype, seed: int = 0, offset: float = 0.5) -> torch.Tensor:
    """Activation-like data: non-zero mean, unequal column scales, cast to dtype."""
    g = gen(seed)
    scale = torch.logspace(-1, 1, d, dtype=F64)
    x = offset + torch.randn(tokens, d, generator=g, dtype=F64) * scale
    return x.to(dtype)


# ----------------------------------------------------------------------------- moments


@pytest.mark.parametrize("block_rows", BLOCKS)
@pytest.mark.parametrize("shape", ROW_SHAPES.values(), ids=ROW_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moment_kernels_match_float64(dtype, shape, block_rows):
    tokens, d = shape
    x = acts(tokens, d, dtype, seed=1)
    y = acts(tokens, d // 2 + 3, dtype, seed=2)
    tol = MOMENT_RTOL[dtype]
    for got, want in [
        (energy(x, block_rows), ref.energy_ref(x)),
        (colsum(x, block_rows), ref.colsum_ref(x)),
        (gram(x, block_rows), ref.gram_ref(x)),
        (cross(x, y, block_rows), ref.cross_ref(x, y)),
    ]:
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) < tol


def test_moments_accept_leading_dims():
    x = acts(4 * 33, 16, torch.bfloat16, seed=3)
    assert torch.equal(gram(x.view(4, 33, 16), 10), gram(x, 10))


def test_fp16_squares_do_not_overflow():
    # 300² = 9e4 > fp16 max (65504): squaring in fp16 would give inf.
    x = torch.full((50, 4), 300.0, dtype=torch.float16)
    assert torch.isfinite(energy(x, 8)).all()
    assert rel_err(energy(x, 8), ref.energy_ref(x)) < 1e-6
    assert rel_err(gram(x, 8), ref.gram_ref(x)) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_accumulator_chunks_and_merge(dtype):
    x = acts(300, 20, dtype, seed=4)
    y = acts(300, 12, dtype, seed=5)
    m = Moments(20, 12, device="cpu", block_rows=16)
    for lo, hi in [(0, 7), (7, 150), (150, 300)]:  # uneven chunks
        m.update(x[lo:hi], y[lo:hi])
    a, b = Moments(20, 12, block_rows=16), Moments(20, 12, block_rows=16)
    a.update(x[:100], y[:100])
    b.update(x[100:], y[100:])
    merged = a.merge(b)
    for mm in (m, merged):
        assert mm.n == 300
        tol = MOMENT_RTOL[dtype]
        assert rel_err(mm.sx, ref.colsum_ref(x)) < tol
        assert rel_err(mm.sxx_diag, ref.energy_ref(x)) < tol
        assert rel_err(mm.xtx, ref.gram_ref(x)) < tol
        assert rel_err(mm.sy, ref.colsum_ref(y)) < tol
        assert rel_err(mm.syy_diag, ref.energy_ref(y)) < tol
        assert rel_err(mm.xty, ref.cross_ref(x, y)) < tol
    m.check_finite()


def test_moments_options_and_errors():
    m = Moments(8, want_gram=False)
    m.update(torch.randn(10, 8))
    assert m.xtx is None and m.sy is None and m.xty is None and m.n == 10
    m2 = Moments(8, 4, want_cross=False)
    m2.update(torch.randn(5, 8), torch.randn(5, 4))
    assert m2.xty is None and m2.sy is not None
    with pytest.raises(ValueError, match="dim_x=8"):
        m.update(torch.randn(10, 9))
    with pytest.raises(ValueError, match="needs y"):
        m2.update(torch.randn(5, 8))
    with pytest.raises(ValueError, match="match x"):
        m2.update(torch.randn(5, 8), torch.randn(6, 4))
    with pytest.raises(ValueError, match="merge"):
        m.merge(m2)
    bad = Moments(2)
    bad.update(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(NumericalError, match="NaN/Inf"):
        bad.check_finite()


# ----------------------------------------------------------------------------- pearson

PEARSON_RTOL = 1e-5  # fp32 sums with |mean| ≈ 3·std: centring costs about one digit


def test_pearson_from_moments_equals_corrcoef():
    g = gen(6)
    n, c = 500, 16
    u = 3.0 + torch.randn(n, c, generator=g, dtype=F64)
    mix = torch.linspace(-1, 1, c, dtype=F64)  # correlations from -1 to 1
    v = -2.0 + mix * u + (1 - mix.abs()) * torch.randn(n, c, generator=g, dtype=F64)
    u32, v32 = u.float(), v.float()
    r = pearson_from_moments(
        n, colsum(u32), colsum(v32), energy(u32), energy(v32), (u32 * v32).to(F64).sum(0).float()
    )
    want = torch.stack([torch.corrcoef(torch.stack([u32[:, j], v32[:, j]]).to(F64))[0, 1] for j in range(c)])
    assert r.dtype == torch.float32
    assert float((r.to(F64) - want).abs().max()) < PEARSON_RTOL
    assert rel_err(r, ref.pearson_ref(u32, v32)) < PEARSON_RTOL


def test_pearson_constant_column_is_zero():
    u = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    v = torch.tensor([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0]])
    r = pearson_from_moments(3, u.sum(0), v.sum(0), (u * u).sum(0), (v * v).sum(0), (u * v).sum(0))
    assert torch.allclose(r, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_fit_pearson_from_moments(dtype):
    g = gen(7)
    tokens, dx, c = 700, 24, 10
    x = acts(tokens, dx, dtype, seed=8)
    w_true = torch.randn(dx, c, generator=g, dtype=F64)
    noise = torch.randn(tokens, c, generator=g, dtype=F64) * torch.logspace(-1, 1.5, c, dtype=F64)
    y = (x.to(F64) @ w_true + noise).to(dtype)
    m = Moments(dx, c, block_rows=64)
    m.update(x, y)
    W, _ = ridge_solve(m.xtx, m.xty, lam=1.0)
    r = linear_fit_pearson(m.n, m.sx, m.xtx, m.xty, m.sy, m.syy_diag, W, block_cols=3)
    want = ref.linear_fit_pearson_ref(x, y, W)
    assert r.shape == (c,)
    assert float((r.to(F64) - want).abs().max()) < 1e-4  # Σu² through an fp32 quadratic form


# ----------------------------------------------------------------------------- ridge


def test_ridge_lambda_official_value():
    xtx = torch.diag(torch.tensor([1.0, 2.0, 3.0, 6.0]))  # mean diag 3
    assert ridge_lambda(xtx, 1.0, nsamples=256, seqlen=128) == pytest.approx(1.5)  # 0.5·mean
    assert ridge_lambda(xtx, 2.0, nsamples=128, seqlen=2048) == pytest.approx(2.0 * 3 / 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ridge_from_moments_equals_closed_form(dtype):
    g = gen(9)
    tokens, dx, dy = 600, 32, 8
    x = acts(tokens, dx, dtype, seed=10)
    y = (x.to(F64) @ torch.randn(dx, dy, generator=g, dtype=F64)
         + torch.randn(tokens, dy, generator=g, dtype=F64)).to(dtype)
    xtx, xty = gram(x, 50), cross(x, y, 50)
    lam = ridge_lambda(xtx, 1.0, nsamples=tokens // 128 + 1, seqlen=128)
    W, lam_used = ridge_solve(xtx, xty, lam)
    assert lam_used == lam and W.dtype == torch.float32
    assert rel_err(W, ref.ridge_ref(x, y, lam)) < 1e-4  # fp32 Cholesky, cond(XᵀX+λI) ~ 1e3


def test_ridge_cholesky_fallback_on_singular(caplog):
    x = torch.randn(100, 16, generator=gen(11))
    x[:, 5] = 0.0  # exact zero row/column in XᵀX: Cholesky pivot is exactly 0
    xtx, xty = gram(x), cross(x, torch.randn(100, 3, generator=gen(12)))
    assert int(torch.linalg.cholesky_ex(xtx).info) != 0
    with caplog.at_level(logging.WARNING, logger="streamprune.kernels.ridge"):
        W, lam_used = ridge_solve(xtx, xty, lam=0.0)
    assert lam_used > 0 and torch.isfinite(W).all()
    assert "damping" in caplog.text
    A = xtx.to(F64) + lam_used * torch.eye(16, dtype=F64)
    assert rel_err(A @ W.to(F64), xty) < 1e-4


def test_ridge_errors():
    with pytest.raises(NumericalError, match="16×16"):
        ridge_solve(-torch.eye(16), torch.ones(16, 2), lam=0.0)  # no damping ≤ 1e-2 helps
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        ridge_solve(bad, torch.ones(4, 1), lam=1.0)
    with pytest.raises(NumericalError, match="NaN/Inf"):
        ridge_solve(torch.eye(4), torch.full((4, 1), float("inf")), lam=1.0)
    with pytest.raises(ValueError):
        ridge_solve(torch.eye(4), torch.ones(3, 1), lam=1.0)


# ----------------------------------------------------------------------------- svd

SVD_SHAPES = {"tall": (90, 40), "wide": (40, 90), "square": (60, 60)}
# Reconstruction ‖A_r − A_r,ref‖/‖A_r,ref‖ per solver on a spectrum σᵢ = 0.7ⁱ at rank 8
# (σ₈/σ₁ ≈ 0.06): full is fp32-exact; gram loses ~ε·(σ₁/σᵣ)²; randomized with 2 power
# iterations and a 0.7ⁱ decay is exact to ~(σ₁₉/σ₉)^5.
SVD_RTOL = {"full": 1e-5, "gram": 1e-4, "randomized": 1e-4}


def decaying(m: int, n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    g = gen(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    return (U * decay ** torch.arange(k, dtype=F64)) @ V.T


@pytest.mark.parametrize("solver", ["full", "gram", "randomized"])
@pytest.mark.parametrize("shape", SVD_SHAPES.values(), ids=SVD_SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_truncated_svd_matches_float64(solver, shape, dtype):
    rank = 8
    a = decaying(*shape, seed=13).to(dtype)
    U, S, Vh = truncated_svd(a, rank, solver=solver, oversample=10, power_iters=2, seed=0)
    Ur, Sr, Vhr = ref.svd_ref(a, rank)
    assert U.shape == (shape[0], rank) and S.shape == (rank,) and Vh.shape == (rank, shape[1])
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    tol = SVD_RTOL[solver]
    assert rel_err(S, Sr) < tol
    assert rel_err((U * S) @ Vh, (Ur * Sr) @ Vhr) < tol
    # same sign convention as the reference ⇒ the vectors themselves agree
    assert rel_err(U, Ur) < 10 * tol and rel_err(Vh, Vhr) < 10 * tol
    eye = torch.eye(rank, dtype=F64)
    assert rel_err(U.T.to(F64) @ U.to(F64), eye) < 1e-4
    assert rel_err(Vh.to(F64) @ Vh.T.to(F64), eye) < 1e-4


def test_randomized_svd_is_deterministic_and_accurate_on_low_rank_plus_noise():
    g = gen(14)
    m, n, rank = 300, 200, 10
    a = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
         + 1e-3 * torch.randn(m, n, generator=g))
    first = truncated_svd(a, rank, solver="randomized", seed=123)
    second = truncated_svd(a, rank, solver="randomized", seed=123)
    for p, q in zip(first, second):
        assert torch.equal(p, q)  # bitwise
    U, S, Vh = first
    Uf, Sf, Vhf = truncated_svd(a, rank, solver="full")
    assert rel_err(S, Sf) < 1e-5
    assert rel_err((U * S) @ Vh, (Uf * Sf) @ Vhf) < 1e-4
    assert rel_err(U, Uf) < 1e-3  # deterministic signs: same vectors, not just same span


def test_choose_solver_rule():
    assert choose_solver(1024, 8192, 500, "cpu") == "full"  # small side ≤ 1024
    assert choose_solver(8192, 8192, 3276, "cpu") == "full"  # rank > 0.25·min
    assert choose_solver(8192, 8192, 245, "cpu") == "randomized"
    assert choose_solver(8192, 28672, 2048, "cuda") == "randomized"


def test_svd_rank_deficient_and_tiny_matrices():
    g = gen(20)
    a = torch.randn(10, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2
    for solver in ("full", "gram", "randomized"):  # randomized: sketch ≥ min(m, n) → exact
        U, S, Vh = truncated_svd(a, 4, solver=solver)
        assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
        assert rel_err((U * S) @ Vh, a) < 1e-5
        # zero σ come out as zero, except through the Gram matrix: ~sqrt(ε_fp32)·σ₁ (documented)
        tiny = 1e-3 if solver == "gram" else 1e-5
        assert float(S[2:].abs().max()) < tiny * float(S[0])


def test_truncated_svd_errors():
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(torch.randn(5, 4), 5)
    with pytest.raises(ValueError, match="solver"):
        truncated_svd(torch.randn(5, 4), 2, solver="lanczos")
    a = torch.randn(5, 4)
    a[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        truncated_svd(a, 2)


# ----------------------------------------------------------------------------- weighted svd


@pytest.mark.parametrize("balance", ["left", "sqrt"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["tall", "wide"])
def test_weighted_svd_full_rank_reproduces_w(balance, shape):
    w = torch.randn(*shape, generator=gen(15))
    act_scale = torch.logspace(-0.3, 0.3, shape[1])  # 0.5 … 2
    up, down = weighted_svd(w, act_scale, min(shape), balance=balance, solver="full")
    assert up.dtype == down.dtype == torch.float32
    assert rel_err(up @ down, w) < 1e-5


@pytest.mark.parametrize("solver", ["full", "gram", "randomized"])
def test_weighted_svd_matches_float64(solver):
    w = torch.randn(64, 48, generator=gen(16)) @ decaying(48, 48, seed=17, decay=0.85).float()
    act_scale = torch.logspace(-1, 1, 48)
    act_scale[3] = 0.0  # a dead input: floored, not divided by
    up, down = weighted_svd(w, act_scale, 12, solver=solver, seed=0)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    # Compared in the metric AWSVD optimises, ‖(·) D‖: the floored column is divided by
    # 1e-3·max, which amplifies fp32 rounding there by 1e3, harmlessly (its input is ~0).
    d = act_scale.clamp_min(1e-4 * act_scale.max()).double()
    assert rel_err((up @ down) * d, ref.weighted_svd_ref(w, act_scale, 12) * d) < 1e-4


def test_weighted_svd_sqrt_balance_and_dtype():
    w = torch.randn(40, 30, generator=gen(18))
    s = torch.logspace(-1, 1, 30)
    up_l, down_l = weighted_svd(w, s, 6, balance="left")
    up_s, down_s = weighted_svd(w, s, 6, balance="sqrt")
    assert rel_err(up_l @ down_l, up_s @ down_s) < 1e-5  # same product, different split
    # sqrt split: upᵀup = S = (down D)(down D)ᵀ
    assert rel_err(up_s.T @ up_s, (down_s * s) @ (down_s * s).T) < 1e-4
    up_b, down_b = weighted_svd(w.bfloat16(), s, 6)
    assert up_b.dtype == down_b.dtype == torch.bfloat16
    up_z, down_z = weighted_svd(w, torch.zeros(30), 6)  # no information: plain SVD
    U, S, Vh = truncated_svd(w, 6)
    assert rel_err(up_z @ down_z, (U * S) @ Vh) < 1e-5


def test_awsvd_beats_plain_svd_on_skewed_activations():
    g = gen(19)
    tokens, m, n, rank = 2000, 48, 64, 16
    x = torch.randn(tokens, n, generator=g) * torch.logspace(-2, 1, n)  # energies span 1e6
    w = torch.randn(m, n, generator=g)
    U, S, Vh = truncated_svd(w, rank)
    up, down = weighted_svd(w, energy(x).sqrt(), rank)
    err_plain = torch.linalg.norm((w - (U * S) @ Vh) @ x.T)
    err_aw = torch.linalg.norm((w - up @ down) @ x.T)
    assert err_aw < 0.5 * err_plain, (float(err_aw), float(err_plain))
