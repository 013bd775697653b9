"""LoRAP (Li, Tang & Zhang, ICML 2024, arXiv 2404.09695; code github.com/lihuang258/LoRAP).

Contract: ``/work/shared/spec/ALGORITHMS.md`` ("LoRAP", "Ratio contract"), generalised to
grouped-query attention. Every layer loses the same fraction s of its parameters:

- attention: activation-weighted SVD (AWSVD) of q/k/v/o with a 3:1 retained budget
  (V/O : Q/K), ``W D = U S Vᵀ``, ``up = U_r S_r^½``, ``down = S_r^½ V_rᵀ D⁻¹``;
  V/O stay dense when factors would cost as much as the dense matrix (the cap);
- FFN: channel groups scored by :func:`~streamprune.methods.channels.ffn_channel_scores`,
  the least important 1 % kept, the next ``floor(s·f)`` pruned.

One pass per layer (pass A: the still-dense layer over the sequentially pruned stream)
collects every statistic: attention-input energy (q/k/v), o_proj-input energy (o),
MLP-input energy (gate/up) and down_proj-input energy.

Where this follows the released code, or resolves what the paper leaves open:

1. *Per-layer fraction vs total ratio.* Official ``--sparsity_ratio`` is the per-layer
   fraction s (``utils/decomposition.py::cal_saved_rank``); embeddings and lm_head are not
   pruned, so the model-wide reduction is below s (LLaMA-7B, s = 0.2: 19.2 %). Our
   ``--ratio`` is the total reduction (ratio contract): :func:`solve_fraction` bisects on
   s. The paper's LLaMA-7B ranks (20 %: Q/K 1228, V/O dense; 50 %: Q/K 512, V/O 1536)
   are ``allocate_ranks`` at s = 0.2 and s = 0.5 exactly (only s in (0.19995, 0.20020)
   and (0.49967, 0.5] give them); at ``--ratio 0.2`` the solver picks s ≈ 0.2081 (Q/K
   rank 1195), at 0.5 s ≈ 0.5202 (Q/K 491, V/O 1473).
2. *Budget → rank.* ALGORITHMS.md: budgets split inside each pair by matrix size and
   ``r = floor(R_m/(m+n))`` per matrix. For square MHA matrices this is the official
   ``k_max = int(k_att·2a/(1+a))``, ``k_min = int(k_att·2/(1+a))`` with
   ``k_att = int((1−s)·d/2)`` up to the order of the floors; under GQA k/v are not square.
3. *Cap.* V and O are capped together (dense if either one's factors would cost at least
   its dense size; under GQA the two hit the cap at the same s up to floor rounding). The
   same rule is applied to Q and K, which only triggers at s ≈ 0, so ratio 0 returns the
   dense model instead of lossy factors of dense cost. Official code never reaches it.
4. *D.* ``D = diag(sqrt(e))`` with entries below ``floor·max`` raised to it (official:
   exact zeros become 1e-4). Energies are sums Σx² (official: means); D's scale cancels.
5. *FFN indices.* Official ``sorted[int(f·0.01) : int((s + 0.01)·f)]``; ALGORITHMS.md
   ``floor(0.01·f)`` kept then ``floor(s·f)`` pruned (differs by at most one channel).
6. *Randomized SVD* (``svd_solver`` "auto" on large matrices) is seeded per layer and
   projection (``4·layer + j``), so reruns and resumed runs are byte-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import NumericalError, RatioError
from ..kernels.moments import energy
from ..kernels.svd import SOLVERS, weighted_svd
from ..shapes import ModelShapes
from ..spec import LayerSpec
from .base import Decision, Method
from .channels import ffn_channel_scores, select_channels, slice_ffn

LORAP_CONFIG_VERSION = 1
RATIO_TOLERANCE = 0.01  # ratio contract: achieved total within ±1 percentage point
_PROJ = ("q", "k", "v", "o")
_EPS = 1e-9  # floor(x + eps): budgets are products of floats; 1228.9999999 means 1229


@dataclass(frozen=True)
class LoRAPConfig:
    """LoRAP knobs. The per-layer fraction s is not a knob: it is solved from ``--ratio``."""

    a: float = 3.0  # V/O : Q/K retained attention budget (official ``--para_allocate``)
    keep_least_frac: float = 0.01  # FFN: the least important fraction is kept
    svd_solver: str = "auto"  # streamprune.kernels.svd solver
    floor: float = 1e-4  # D entries below floor·max(D) are raised to it

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"LoRAPConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not 0 < self.a < math.inf:
            raise bad("a", "a positive finite number")
        if isinstance(self.keep_least_frac, bool) or not isinstance(self.keep_least_frac, (int, float)) \
                or not 0 <= self.keep_least_frac < 0.5:
            raise bad("keep_least_frac", "in [0, 0.5)")
        if self.svd_solver not in ("auto",) + SOLVERS:
            raise bad("svd_solver", f"one of {('auto',) + SOLVERS}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 < self.floor <= 1:
            raise bad("floor", "in (0, 1]")


# ---- rank allocation (shapes only) ---------------------------------------------------------


def _ranks_in(budget: float, pair: tuple[str, str], dims: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Split ``budget`` over ``pair`` by matrix size; rank ``floor(R_m/(m+n))`` per matrix."""
    sizes = {p: dims[p][0] * dims[p][1] for p in pair}
    total = sum(sizes.values())
    return {p: max(0, math.floor(budget * sizes[p] / total / sum(dims[p]) + _EPS)) for p in pair}


def _capped(ranks: dict[str, int], dims: dict[str, tuple[int, int]]) -> bool:
    """True if any factor pair would cost at least its dense matrix: ``r·(m+n) ≥ m·n``."""
    return any(r * (m + n) >= m * n for r, (m, n) in ((ranks[p], dims[p]) for p in ranks))


def allocate_ranks(shapes: ModelShapes, s: float, a: float = 3.0) -> dict[str, int | None]:
    """LoRAP attention ranks at per-layer fraction ``s``: ``{q, k, v, o}`` → rank, or None = dense.

    Retained budget ``R = (1−s)·(P_q+P_k+P_v+P_o)``; V/O get ``a/(1+a)·R``, Q/K ``R/(1+a)``,
    each pair split by matrix size; rank ``floor(R_m/(m+n))``. If V or O would cost at least
    its dense size, V and O stay dense and Q/K share ``R − P_v − P_o`` (note 3 of the module
    docstring: Q/K are capped the same way). A rank 0 means ``s`` is too large for a
    rank-1 factor pair (see :func:`fraction_is_feasible`).
    """
    if not 0 <= s < 1:
        raise ValueError(f"per-layer fraction s must be in [0, 1), got {s}")
    spec = shapes.dense_spec()
    dims = {p: spec.proj_shape(p) for p in _PROJ}  # (out, in)
    size = {p: m * n for p, (m, n) in dims.items()}
    R = (1 - s) * sum(size.values())
    vo = _ranks_in(a / (1 + a) * R, ("v", "o"), dims)
    out: dict[str, int | None]
    if _capped(vo, dims):
        out = {"v": None, "o": None}
        qk = _ranks_in(R - size["v"] - size["o"], ("q", "k"), dims)
    else:
        out = dict(vo)
        qk = _ranks_in(R / (1 + a), ("q", "k"), dims)
    out.update({"q": None, "k": None} if _capped(qk, dims) else qk)
    return {p: out[p] for p in _PROJ}


def ffn_prune_count(f: int, s: float) -> int:
    """FFN channels pruned per layer at fraction ``s``: ``floor(s·f)``."""
    return math.floor(s * f + _EPS)


def fraction_is_feasible(shapes: ModelShapes, s: float, a: float, keep_least_frac: float) -> bool:
    """Every factorised rank ≥ 1 and at least one FFN channel left after pruning."""
    if not 0 <= s < 1:
        return False
    f = shapes.intermediate_size
    ranks = allocate_ranks(shapes, s, a)
    n_least = math.floor(keep_least_frac * f)
    return all(r is None or r >= 1 for r in ranks.values()) and ffn_prune_count(f, s) <= f - n_least - 1


def layer_spec(shapes: ModelShapes, s: float, a: float = 3.0, keep_least_frac: float = 0.01) -> LayerSpec:
    """The spec every layer gets at per-layer fraction ``s``."""
    if not fraction_is_feasible(shapes, s, a, keep_least_frac):
        raise RatioError(
            f"LoRAP per-layer fraction s={s:.4f} leaves a rank-0 projection or an empty FFN; lower --ratio"
        )
    ranks = allocate_ranks(shapes, s, a)
    f = shapes.intermediate_size - ffn_prune_count(shapes.intermediate_size, s)
    return replace(shapes.dense_spec(), intermediate_size=f, **{f"{p}_rank": r for p, r in ranks.items()})


def achieved_ratio_at(shapes: ModelShapes, s: float, a: float = 3.0, keep_least_frac: float = 0.01) -> float:
    """Total reduction of the model whose every layer has :func:`layer_spec` at ``s``."""
    return shapes.achieved_ratio([layer_spec(shapes, s, a, keep_least_frac)] * shapes.num_layers)


def max_fraction(shapes: ModelShapes, a: float, keep_least_frac: float, iters: int = 60) -> float:
    """The largest feasible per-layer fraction (bisection; feasibility is monotone in s)."""
    lo, hi = 0.0, 1.0  # feasible(0) always; feasible(1) never
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction_is_feasible(shapes, mid, a, keep_least_frac) else (lo, mid)
    return lo


def solve_fraction(shapes: ModelShapes, ratio: float, a: float = 3.0, keep_least_frac: float = 0.01,
                   iters: int = 60) -> float:
    """Per-layer fraction s whose achieved total reduction is closest to ``ratio``.

    Bisection on s over [0, s_max] (achieved(s) is a non-decreasing step function up to
    rank-floor jitter of a few parameters), then the closer end of the final bracket.
    Raises :class:`RatioError` naming the reachable range when the result is more than
    ±1 pp off (ratio too large, or a model so small that one step exceeds 2 pp).
    """
    if not 0 <= ratio < 1:
        raise RatioError(f"--ratio must be in [0, 1), got {ratio}")
    s_max = max_fraction(shapes, a, keep_least_frac)
    top = achieved_ratio_at(shapes, s_max, a, keep_least_frac)
    lo, hi = 0.0, s_max
    if top <= ratio:
        lo = hi = s_max
    for _ in range(iters if lo < hi else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved_ratio_at(shapes, mid, a, keep_least_frac) < ratio else (lo, mid)
    s = min((lo, hi), key=lambda x: (abs(achieved_ratio_at(shapes, x, a, keep_least_frac) - ratio), x))
    got = achieved_ratio_at(shapes, s, a, keep_least_frac)
    if abs(got - ratio) > RATIO_TOLERANCE:
        raise RatioError(
            f"--ratio {ratio} is unreachable with method lorap on this model: the closest achievable total "
            f"reduction is {got:.4f} (per-layer fraction s={s:.4f}); reachable range [0, {top:.4f}] "
            f"(a={a}, keep_least_frac={keep_least_frac}). Change --ratio or use another --method."
        )
    return s


# ---- attention factorisation (tensors only) -----------------------------------------------


def awsvd(w: Tensor, e: Tensor, rank: int, solver: str = "auto", seed: int = 0,
          floor: float = 1e-4) -> tuple[Tensor, Tensor]:
    """LoRAP AWSVD of ``w`` (m, n) with input energy ``e`` (n,) → ``(up (m, r), down (r, n))``.

    ``W D = U S Vᵀ``, ``D = diag(sqrt(e))``; ``up = U_r S_r^½``, ``down = S_r^½ V_rᵀ D⁻¹``.
    """
    return weighted_svd(w, e.float().clamp_min(0).sqrt(), rank, balance="sqrt", solver=solver, seed=seed, floor=floor)


# ---- observer ---------------------------------------------------------------------------------


class _EnergyObserver:
    """Pass A on the dense layer: fp32 input energies of q/k/v (shared), o, gate/up (shared), down."""

    taps = frozenset({"q_proj", "o_proj", "gate_proj", "down_proj"})
    summed = ("e",)  # sums over tokens (all-reduced across ranks)

    def __init__(self) -> None:
        self.e: dict[str, Tensor] = {}  # tap -> (in,) fp32 Σx²

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        e = energy(x_in)  # (in,) fp32, block-wise cast
        self.e[tap] = e if tap not in self.e else self.e[tap] + e


# ---- the method --------------------------------------------------------------------------------


class LoRAP(Method):
    """LoRAP on the streaming engine: plan (solve s) → per layer pass A, decide."""

    name = "lorap"
    config_version = LORAP_CONFIG_VERSION

    def __init__(self, config: LoRAPConfig, ratio: float):
        super().__init__(config, ratio)
        self.s: float | None = None
        self.spec: LayerSpec | None = None

    def plan(self, shapes: ModelShapes, survey=None) -> None:
        cfg = self.config
        self.s = solve_fraction(shapes, self.ratio, cfg.a, cfg.keep_least_frac)
        self.spec = layer_spec(shapes, self.s, cfg.a, cfg.keep_least_frac)
        self.n_prune = ffn_prune_count(shapes.intermediate_size, self.s)

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        if self.spec is None:
            raise RuntimeError("LoRAP.planned_specs called before plan()")
        return [self.spec] * shapes.num_layers

    def observer(self, layer_idx: int, pass_name: str, weights: dict[str, Tensor]) -> _EnergyObserver | None:
        return _EnergyObserver() if pass_name == "A" else None

    def decide(self, layer_idx: int, weights: dict[str, Tensor], observer: _EnergyObserver) -> Decision:
        if self.spec is None:
            raise RuntimeError("LoRAP.decide called before plan()")
        spec, cfg = self.spec, self.config
        e = observer.e
        bad = [t for t, v in e.items() if not bool(torch.isfinite(v).all())]
        if bad or set(e) != _EnergyObserver.taps:
            raise NumericalError(
                f"layer {layer_idx}: LoRAP input energies {'have NaN/Inf at ' + str(bad) if bad else 'are missing'}; "
                "the activations overflowed or the layer was not observed. Run in a wider dtype (--dtype float32)."
            )
        gate, up, down = (weights[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        scores = ffn_channel_scores(gate, up, down, e["gate_proj"], e["down_proj"])
        keep = select_channels(scores, self.n_prune, cfg.keep_least_frac)
        out = slice_ffn(weights, keep)  # dense attention tensors pass through as is

        in_energy = {"q": e["q_proj"], "k": e["q_proj"], "v": e["q_proj"], "o": e["o_proj"]}
        for j, p in enumerate(_PROJ):
            rank = spec.rank(p)
            if rank is None:
                continue
            prefix = f"self_attn.{p}_proj"
            w = out.pop(f"{prefix}.weight")
            up_f, down_f = awsvd(w, in_energy[p], rank, cfg.svd_solver, seed=4 * layer_idx + j, floor=cfg.floor)
            out[f"{prefix}.down.weight"] = down_f.contiguous()  # (r, in)
            out[f"{prefix}.up.weight"] = up_f.contiguous()  # (out, r)
            if f"{prefix}.bias" in out:
                out[f"{prefix}.up.bias"] = out.pop(f"{prefix}.bias")

        info = {"s": self.s, **{f"{p}_rank": spec.rank(p) for p in _PROJ}, "ffn_kept": int(keep.numel())}
        decision = Decision(spec, out, info)
        decision.validate(layer_idx)
        return decision
