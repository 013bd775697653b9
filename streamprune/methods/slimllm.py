"""SlimLLM (Guo et al., ICML 2025, arXiv 2505.22689; code github.com/guojialong1/Slimllm).

Contract: ``/work/shared/spec/ALGORITHMS.md`` ("SlimLLM", "Ratio contract"), generalised to
grouped-query attention. Per-layer ratios from layer redundancy; attention heads pruned by
Pearson similarity + greedy swap; FFN channels pruned by a PCA-weighted score; each part is
followed by a per-output-dim linear regression folded into o_proj / down_proj (+ bias).

Passes (see :mod:`streamprune.methods.base`):

- survey (dense model, dense stream): ``c_l`` = mean over tokens of cos(layer out, layer in).
- plan: ``r_l = r·N_p·softmax(α c)_l`` on the N_p layers with the largest ``c_l`` (0 elsewhere),
  clamped to ``r_max`` with the excess re-split (water-filling); r solved by bisection on the
  exact parameter totals so the achieved reduction is within ±1 pp of ``--ratio``.
- pass A (dense layer, pruned stream; layers that lose heads): ``M[c,i,j] = Σ_t T_i[t,c]·T_j[t,c]``
  (d, H, H) and ``S[i,c] = Σ_t T_i[t,c]``, ``T_i = A_i Wo_iᵀ``, from one row block of one chunk
  at a time. decide: scores, greedy swap and regression from those moments; FFN untouched.
- pass B (the layer with its attention pruned; layers that lose FFN channels): Gram ``HᵀH``
  (f, f) and ``ΣH`` of the down_proj input, MLP-input energy, down_proj-output moments;
  refine: covariance eigh, scores, slice, regression of the full FFN output on the pruned
  one (both are linear in H, so their moments come from the Gram) folded into down_proj.

Where the paper is vague we follow the released code (``hf_prune.py``,
``LLMPruner/models/hf_llama/modeling_llama.py``), except where noted:

1. *Head/FFN split of r_l.* None: ``hf_prune.py`` passes ``prune_ratio = pruning_ratio·d[i]`` to
   ``LlamaDecoderLayer.prune``, which calls ``self_attn.compress(pruned_ratio=prune_ratio)``
   (``round(prune_ratio·num_heads)`` heads) and ``mlp.compress(pruned_ratio=prune_ratio)``
   (``round(prune_ratio·intermediate_size)`` channels). Every pruned layer loses the same
   fraction r_l of its heads and of its FFN channels; Python ``round`` (half to even) as there.
2. *The knob.* Official runs fix ``--pruning_ratio`` (0.25 / 0.55) and report what results; we
   solve r (the mean r_l over the N_p layers; LLaMA-7B at 0.2 / 0.5 solves to 0.255 / 0.555).
   The clamp to ``r_max`` is ALGORITHMS.md's, not the official code's. Ratio contract: when
   whole heads make every r miss ±1 pp (a GQA group has only 2–3 heads to lose), the heads
   keep the r on one side and the FFN share β is solved (channels: ``min(β·r_l, r_max)``).
3. *Regimes.* ``alpha``/``n_p`` left None take the official script values: α 10, N_p 26/32 for
   ``--ratio ≤ 0.35``; α 7, N_p 30/32 above. ``N_p = round(n_p·L)`` (at least 1).
4. *GQA.* Official is MHA only. With H/G > 1 every KV group loses ``round(r_l·H/G)`` query heads
   (it keeps its k/v rows while one is left; all lost = no attention, only the o_proj bias);
   the greedy swaps stay inside a group. With H = G the pool is the whole layer (official).
5. *Greedy.* As official: pruned heads visited in descending score order, each tried in every
   kept slot of its pool, the best strict improvement taken (ties: earliest slot); a
   swapped-out head is not retried. Every evaluation is O(d) from ``M``, ``S`` (rank-2 update).
6. *Pearson* is computed here in float64 (the kernel returns fp32): the greedy compares sums over
   d of |ρ|, where fp32 rounding would turn near-ties into platform noise.
7. *Regression* = ``np.polyfit(x, y, 1)`` per output dim, from moments; a constant x (e.g. every
   head pruned) gets ``a = 0, b = mean(y)``.
8. *FFN.* Official ``np.linalg.eig`` of the centred covariance; we use ``eigh`` (fp32, float64
   retry). Keep-least count ``floor(0.01·f)`` (shared ``select_channels``; official rounds).
   The Gram costs f²·4 bytes (0.5 GB at f = 11008, 3.3 GB at 28672): the kept set is only
   known after the pass, and the pruned output's moments are quadratic in H.
9. *Layers with nothing to prune* (r_l = 0, or round(·) = 0 for a part) stay as they are; the
   official code fits an identity regression there (a bias that changes nothing).
10. *Survey.* Official keeps the cos mean of its last calibration batch (it uses one); we
    average over all tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import NumericalError, RatioError
from ..kernels import Moments, energy
from ..shapes import ModelShapes
from ..spec import LayerSpec
from .base import Decision, Method
from .channels import ffn_channel_scores, select_channels, slice_ffn

SLIMLLM_CONFIG_VERSION = 1
REGIMES = ((0.35, 10.0, 26 / 32), (1.0, 7.0, 30 / 32))  # (ratio up to, alpha, n_p): official scripts
_TOL = 0.01  # ratio contract: ±1 percentage point
_ELEMS = 1 << 24  # fp32 elements of one head-output block (H, rows, d)
_BLOCK = 4096


@dataclass(frozen=True)
class SlimLLMConfig:
    """SlimLLM knobs; ``alpha``/``n_p`` None = the official regime for the ratio (note 3)."""

    alpha: float | None = None  # softmax sharpness of the per-layer ratios
    n_p: float | None = None  # fraction of the layers that are pruned
    r_max: float = 0.9  # cap on a layer's ratio (the excess is redistributed)
    keep_least_frac: float = 0.01  # FFN: the least important fraction is kept

    def __post_init__(self) -> None:
        def num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = {
            "alpha": (self.alpha is None or (num(self.alpha) and self.alpha >= 0), "None or a finite number >= 0"),
            "n_p": (self.n_p is None or (num(self.n_p) and 0 < self.n_p <= 1), "None or in (0, 1]"),
            "r_max": (num(self.r_max) and 0 < self.r_max < 1, "in (0, 1)"),
            "keep_least_frac": (num(self.keep_least_frac) and 0 <= self.keep_least_frac < 0.05, "in [0, 0.05)"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"SlimLLMConfig.{name} must be {rule}, got {getattr(self, name)!r}")

    def regime(self, ratio: float) -> tuple[float, float]:
        """``(alpha, n_p)`` for ``ratio``: the configured values, else the official regime's."""
        _, alpha, n_p = next(r for r in REGIMES if ratio <= r[0])
        return (alpha if self.alpha is None else float(self.alpha), n_p if self.n_p is None else float(self.n_p))


# ---- per-layer ratios and the budget ------------------------------------------------------


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


def head_pools(num_heads: int, num_kv_heads: int) -> list[list[int]]:
    """Heads that compete for the pruned slots: the whole layer (MHA) or each KV group (GQA)."""
    hpg = num_heads // num_kv_heads
    if hpg == 1:
        return [list(range(num_heads))]
    return [list(range(g * hpg, (g + 1) * hpg)) for g in range(num_kv_heads)]


def heads_to_prune(r_l: float, num_heads: int, num_kv_heads: int) -> int:
    """Heads pruned per pool: ``round(r_l·H)`` (MHA) or ``round(r_l·H/G)`` per KV group."""
    pool = num_heads if num_heads == num_kv_heads else num_heads // num_kv_heads
    return round(r_l * pool)


def ffn_to_prune(r_l: float, f: int, keep_least_frac: float) -> int:
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


# ---- heads: moments, scores, greedy swap ------------------------------------------------------


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
    """Keep query heads ``kept`` (their q rows, o columns) and the KV groups they use."""
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
    out["self_attn.o_proj.weight"] = weights["self_attn.o_proj.weight"][:, q_rows].contiguous()
    return out


# ---- FFN: score and regression from pass-B moments ------------------------------------------


def _eigh(c: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.eigh(c)
    except torch.linalg.LinAlgError:
        try:
            lam, q = torch.linalg.eigh(c.double())
            return lam.float(), q.float()
        except torch.linalg.LinAlgError as e:
            raise NumericalError("slimllm: eigh of the down_proj output covariance failed; check the "
                                 "calibration data or run with --dtype float32") from e


def ffn_scores(gate: Tensor, up: Tensor, down: Tensor, ex: Tensor, eh: Tensor, y_cov: Tensor) -> Tensor:
    """(f,) ``I_j = ‖H[:,j]‖·‖|Qᵀ Wdown[:,j]| ⊙ λ̃‖ + ‖Wgate[j,:] ⊙ n_x‖ + ‖Wup[j,:] ⊙ n_x‖``.

    ``eh`` (f,) = Σ_t H², ``ex`` (d,) = MLP-input energy (n_x = sqrt), ``y_cov`` (d, d) the
    centred covariance of the down_proj output; ``C = Q Λ Qᵀ``, ``λ̃ = sigmoid(|λ|/mean|λ|)``.
    """
    lam, Q = _eigh(((y_cov + y_cov.T) / 2).float())
    lam = lam.abs()
    lt = torch.sigmoid(lam / lam.mean().clamp_min(torch.finfo(torch.float32).tiny))  # (d,)
    proj = torch.cat([((Q.T @ down[:, i:i + _BLOCK].float()).abs() * lt[:, None]).norm(dim=0)
                      for i in range(0, down.shape[1], _BLOCK)])  # (f,)
    # The gate/up terms are exactly the Olica/LoRAP terms; eh = 0 drops their down term.
    gu = ffn_channel_scores(gate, up, down, ex, torch.zeros(down.shape[1], device=down.device))
    return eh.float().clamp_min(0).sqrt().to(proj.device) * proj + gu


def ffn_fit(n: int, gram: Tensor, sh: Tensor, down: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Regression ``y ≈ a·x + b`` per output dim, y = H Wdᵀ (full FFN), x = H_K Wd_Kᵀ (kept).

    From the Gram ``HᵀH`` (f, f) and ``ΣH`` (f,): ``Σx² = diag(Wk G Wkᵀ)``, ``Σxy = diag(Wk G Wdᵀ)``,
    ``Σy² = diag(Wd G Wdᵀ)`` with ``Wk`` = Wd with the pruned columns zeroed. fp32 products,
    column blocks of d bound the (f, block) temporaries.
    """
    wd = down.float()  # (d, f)
    wk = torch.zeros_like(wd)
    wk[:, keep] = wd[:, keep]
    g, sh = gram.float(), sh.float()
    sxx, sxy, syy = (torch.empty(wd.shape[0], device=wd.device) for _ in range(3))
    blk = max(1, _ELEMS // wd.shape[1])
    for i in range(0, wd.shape[0], blk):
        zd, zk = g @ wd[i:i + blk].T, g @ wk[i:i + blk].T  # (f, b)
        syy[i:i + blk] = (wd[i:i + blk].T * zd).sum(0)
        sxy[i:i + blk] = (wk[i:i + blk].T * zd).sum(0)
        sxx[i:i + blk] = (wk[i:i + blk].T * zk).sum(0)
    return linear_fit(n, wk @ sh, wd @ sh, sxx, sxy)


# ---- observers ------------------------------------------------------------------------------------


class _SurveyObserver:
    """Σ over tokens of cos(layer output, layer input), float64."""

    taps = frozenset({"layer"})

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        for i in range(0, x_in.shape[0], _BLOCK):
            cos = F.cosine_similarity(y_out[i:i + _BLOCK].float(), x_in[i:i + _BLOCK].float(), dim=-1)
            self.total += float(cos.double().sum())
        self.n += x_in.shape[0]


class _HeadObserver:
    """Pass A: ``M`` (d, H, H) and ``S`` (H, d) of ``T_i = A_i Wo_iᵀ``, fp32, a row block at a time."""

    taps = frozenset({"o_proj"})

    def __init__(self, wo: Tensor, num_heads: int, head_dim: int):
        d = wo.shape[0]
        self.H, self.h = num_heads, head_dim
        self.wo = wo.float().reshape(d, num_heads, head_dim).permute(1, 2, 0).contiguous()  # (H, h, d)
        self.M = torch.zeros(d, num_heads, num_heads, device=wo.device)
        self.S = torch.zeros(num_heads, d, device=wo.device)
        self.n, self.rows = 0, max(1, _ELEMS // (num_heads * d))

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        for i in range(0, x_in.shape[0], self.rows):
            a = x_in[i:i + self.rows].float().reshape(-1, self.H, self.h).transpose(0, 1)  # (H, t, h)
            T = torch.bmm(a, self.wo)  # (H, t, d) head contributions
            Tc = T.permute(2, 0, 1).contiguous()  # (d, H, t): a strided bmm is ~5x slower on CPU
            self.M.baddbmm_(Tc, Tc.transpose(1, 2))
            self.S += T.sum(1)
        self.n += x_in.shape[0]

    def moments(self) -> HeadMoments:
        if not (torch.isfinite(self.M).all() and torch.isfinite(self.S).all()):
            raise NumericalError("NaN/Inf in slimllm head statistics; run with --dtype float32 or check the data")
        return HeadMoments(self.n, self.M, self.S)


class _FFNObserver:
    """Pass B (attention already pruned): H moments with Gram, MLP-input energy, y moments."""

    taps = frozenset({"mlp", "down_proj"})

    def __init__(self) -> None:
        self.h: Moments | None = None  # down_proj input H: n, sx = ΣH, sxx_diag, xtx = HᵀH
        self.y: Moments | None = None  # down_proj output: sx, xtx
        self.ex: Tensor | None = None

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if tap == "mlp":
            e = energy(x_in)
            self.ex = e if self.ex is None else self.ex + e
            return
        if self.h is None:
            self.h = Moments(x_in.shape[1], device=x_in.device)
            self.y = Moments(y_out.shape[1], device=y_out.device)
        self.h.update(x_in)
        self.y.update(y_out)

    def y_cov(self) -> Tensor:
        return self.y.xtx - torch.outer(self.y.sx, self.y.sx) / self.y.n


# ---- the method --------------------------------------------------------------------------------


class SlimLLM(Method):
    """SlimLLM on the streaming engine: survey → plan → per layer pass A (heads), pass B (FFN)."""

    name = "slimllm"
    needs_survey = True
    needs_pass_b = True
    pass_b_layer = "pruned"

    def __init__(self, config: SlimLLMConfig, ratio: float):
        super().__init__(config, ratio)
        self.knobs: SlimLLMPlan | None = None
        self._shapes: ModelShapes | None = None

    def config_dict(self) -> dict:
        return {"method": self.name, "ratio": self.ratio, "config_version": SLIMLLM_CONFIG_VERSION, **asdict(self.config)}

    # ---- plan -------------------------------------------------------------------------------
    def plan(self, shapes: ModelShapes, survey: list[dict[str, Tensor]] | None = None) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1) for method slimllm, got {self.ratio}")
        L, cfg = shapes.num_layers, self.config
        alpha, n_p_frac = cfg.regime(self.ratio)
        n_p = min(L, max(1, round(n_p_frac * L)))
        if survey is not None:
            if len(survey) != L or any("cos" not in s for s in survey):
                raise ValueError(f"slimllm survey must hold {L} dicts with 'cos'")
            cos = [float(s["cos"]) for s in survey]
        else:
            cos = [0.0] * L  # provisional (dry run): the first N_p layers, equal shares
        r, beta, ratios, ffn, specs, achieved = solve_plan(shapes, cos, self.ratio, alpha, n_p, cfg.r_max, cfg.keep_least_frac)
        self.knobs = SlimLLMPlan(alpha, n_p, r, beta, tuple(ratios), tuple(ffn), tuple(specs), achieved,
                                 provisional=survey is None)
        self._shapes = shapes

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        if self.knobs is None:
            raise RuntimeError("SlimLLM.planned_specs called before plan()")
        return list(self.knobs.specs)

    def workspace_bytes(self, shapes: ModelShapes) -> int:
        """Pass B: Gram f², y moments + eigh 3·d², fp32 Wd copies 2·d·f, fit blocks; pass A:
        M in fp32 + float64 (and its derived copies) ~24·d·H², head-output blocks."""
        d, f, H = shapes.hidden_size, shapes.intermediate_size, shapes.num_heads
        return 4 * (f * f + 3 * d * d + 2 * d * f + 4 * _ELEMS) + 24 * d * H * H

    # ---- survey -------------------------------------------------------------------------------
    def survey_observer(self, layer_idx: int, weights: dict[str, Tensor]) -> _SurveyObserver:
        return _SurveyObserver()

    def survey_result(self, layer_idx: int, observer: _SurveyObserver) -> dict[str, Tensor]:
        if observer.n == 0 or not math.isfinite(observer.total):
            raise NumericalError(f"slimllm survey of layer {layer_idx}: no tokens or NaN/Inf cosine similarity")
        return {"cos": torch.tensor(observer.total / observer.n, dtype=torch.float64)}

    # ---- per layer ------------------------------------------------------------------------------
    def observer(self, layer_idx: int, pass_name: str, weights: dict[str, Tensor]):
        s, spec = self._shapes, self.knobs.specs[layer_idx]
        if pass_name == "A" and spec.num_heads < s.num_heads:
            return _HeadObserver(weights["self_attn.o_proj.weight"], s.num_heads, s.head_dim)
        if pass_name == "B" and spec.intermediate_size < s.intermediate_size:
            return _FFNObserver()
        return None

    def decide(self, layer_idx: int, weights: dict[str, Tensor], observer: _HeadObserver | None) -> Decision:
        if self.knobs.provisional:
            raise RuntimeError("SlimLLM.decide needs the survey: call plan(shapes, survey) first")
        s, spec, r_l = self._shapes, self.knobs.specs[layer_idx], self.knobs.ratios[layer_idx]
        out = dict(weights)
        info = {"r_l": r_l, "r_ffn": self.knobs.ffn_ratios[layer_idx], "heads_kept": list(range(s.num_heads))}
        if spec.num_heads < s.num_heads:
            hm = observer.moments()
            kept, _ = select_heads(hm, head_pools(s.num_heads, s.num_kv_heads), heads_to_prune(r_l, s.num_heads, s.num_kv_heads))
            w = torch.zeros(s.num_heads, dtype=torch.float64, device=hm.S.device)
            w[torch.tensor(kept, dtype=torch.long, device=w.device)] = 1.0
            sx, sxx, sxy = hm.fit_terms(w)
            a, b = linear_fit(hm.n, sx, hm.sy, sxx, sxy)
            out = slice_heads(weights, kept, s.num_heads, s.num_kv_heads, s.head_dim)
            bias = weights.get("self_attn.o_proj.bias")
            if kept:
                out["self_attn.o_proj.weight"], out["self_attn.o_proj.bias"] = fold_regression(out["self_attn.o_proj.weight"], a, b, bias)
            else:  # no head left: the block outputs the fitted constant mean(Y) (+ the old bias)
                dt = weights["self_attn.o_proj.weight"].dtype
                out["self_attn.o_proj.bias"] = (b.float() + (0 if bias is None else bias.float())).to(dt)
            info["heads_kept"] = kept
        staged = replace(spec, intermediate_size=s.intermediate_size, down_bias="mlp.down_proj.bias" in weights)
        return Decision(staged, out, info)

    def refine(self, layer_idx: int, decision: Decision, observer: _FFNObserver | None) -> Decision:
        if observer is None:
            return decision
        s, spec, r_ffn = self._shapes, self.knobs.specs[layer_idx], self.knobs.ffn_ratios[layer_idx]
        t = decision.tensors
        gate, up, down = t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"]
        h = observer.h
        h.check_finite(f"slimllm FFN statistics of layer {layer_idx}")
        observer.y.check_finite(f"slimllm FFN output statistics of layer {layer_idx}")
        scores = ffn_scores(gate, up, down, observer.ex, h.sxx_diag, observer.y_cov())
        keep = select_channels(scores, ffn_to_prune(r_ffn, s.intermediate_size, self.config.keep_least_frac),
                               self.config.keep_least_frac)
        a, b = ffn_fit(h.n, h.xtx, h.sx, down, keep)
        out = slice_ffn(t, keep)
        out["mlp.down_proj.weight"], out["mlp.down_proj.bias"] = fold_regression(
            out["mlp.down_proj.weight"], a, b, t.get("mlp.down_proj.bias"))
        return Decision(spec, out, {**decision.info, "ffn_kept": int(keep.numel())})
