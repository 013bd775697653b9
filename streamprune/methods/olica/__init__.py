"""Olica (He & Lin, ICML 2025, arXiv 2506.08436; code github.com/BetterTMrR/LLM-Olica).

Contract: ``/work/shared/spec/ALGORITHMS.md`` ("Olica", "Ratio contract"), generalised to
grouped-query attention. Four parts: Q/K activation-weighted SVD (RoPE untouched), V/O
Fast-OND rotation + per-group value-dimension pruning, FFN channel pruning, and Linear
Calibration (LC): a low-rank linear bypass fitted to the FFN's pruning residual on the
``mlp_num`` most linear layers.

Files: this one (config, Linear Calibration, the method); ``.budget`` (ratio →
knobs); ``.attention`` (Fast-OND, value scores); ``.observers`` (what each pass
measures); the FFN channel score and selection are LoRAP's too (``channels``).

Passes (see :mod:`streamprune.methods.base`):

- survey (dense model, dense hidden states): per layer the FFN linearity score (only with LC
  layers to choose, ``mlp_num > 0``) and the o_proj output energy (the Fast-OND statistic).
  A few floats per layer, journaled.
- pass A (dense layer, sequentially pruned hidden states): attention-input energy, per
  head h×h Gram of the o_proj input, MLP-input and down_proj-input energies.
- decide: Q/K factors, rotated + sliced V/O, sliced FFN; LC layers get a *zero* bypass so
  the decision already matches its planned spec (a zero bypass computes nothing).
- pass B (``pass_b_layer = "dense"``, LC layers only): re-run the dense layer and
  accumulate XᵀX, XᵀE, ΣX, ΣE, ΣE² chunk by chunk (E = dense − pruned FFN output);
  ``refine`` fits the bypass from those moments.

Ambiguities, and how they are resolved (official = the released code, ``utils/llama_utils.py``):

1. *What X is for LC.* Official ``pruning()`` hooks ``layer.mlp`` while running the still
   dense layer l over the hidden states that came out of the pruned layers 0..l-1, then
   evaluates the thinned MLP on those same inputs. So X = the MLP input (post-attention
   norm output) of the **dense** layer l, on the **sequentially pruned** stream; E = dense
   FFN(X) − pruned FFN(X). We do the same: pass B re-runs the dense layer. E is formed as
   ``H[:, pruned] · W_down[:, pruned]ᵀ`` from the dense down_proj input H, which equals
   Y − Ŷ exactly, needs no knowledge of the activation function and has no cancellation.
2. *Survey statistics.* Official ``fast_OND`` streams the dense model over dense hidden
   states, fits the ridge (same ``solve``) for the linearity score and takes the o_proj
   output energy for the rotation. Same here; pass A (pruned stream) supplies every other
   energy, as official ``pruning()`` does. Official Pearson mixes a population covariance
   with unbiased stds (a factor (n−1)/n); ours is the exact Pearson.
3. *Rotated-basis energies.* Official re-collects o_proj input energies on the rotated
   model; we collect per-head Grams G_q of the dense o_proj input and read
   ``diag(Tᵀ G_q T)`` — the same numbers, exactly, without a second forward.
4. *λ needs N and T only through N·T.* ``λ = percdamp·mean(diag XᵀX)/((N/128)(T/128))``;
   N·T is the number of tokens the moments saw, so the method takes no nsamples/seqlen
   plumbing (a resumed run cannot disagree with itself). NOTE: official runs set
   ``num_samples = len(dataloader) = 256`` with ``--percdamp 0.5``, i.e. λ = 0.25·mean(diag)
   at 256×128 tokens; percdamp = 0.5 here reproduces that, the default 1.0 gives 0.5·mean.
5. *Q/K ranks.* ALGORITHMS.md: ``r = floor((1−s_qk)·m·n/(m+n))`` per matrix (k_proj is
   not square under GQA); official ``ceil((1−s_qk)·out/2)`` agrees for square matrices.
6. *Budget.* ``sr_allocation`` gives s_qk and s_vo; s_mlp is solved from the *exact*
   parameter counts of the planned specs, LC bypass parameters included (official counts
   neither the rank floors nor the bypass), so the total lands within ±1 pp.
7. *GQA rotation.* One rotation per KV group from the stacked o_proj blocks of all its
   query heads; every group keeps the same ``h_v``. For H = G this is the official code.
8. *LC weights.* ``w = sigmoid((ρ − mean ρ)/0.05)``; the weighted SVD floors w at
   1e-4·max(w) before dividing by it (official divides by the raw w, which is ≥ 4e-18).
9. *Index order.* Kept FFN channels keep their original order; kept value dimensions are
   listed in ascending order of the rotated basis (singular-value order).
10. *LC layers.* Lowest ``mlp_num`` scores among layers 0..L−2 (official
    ``mlp_r_list[:-1].argsort()[:mlp_num]``); ties go to the lower index. ``mlp_num`` is
    capped at L−1; LC is off when ``floor(lc_rank_ratio·d) = 0``.
11. *Exact OND (ablation).* SVD of the stacked ``Wv_gᵀ [Wo_qᵀ Dout]_q`` (d × (H/G)·d) per
    group; the value basis becomes its top-h left singular vectors (``Wv ← U_hᵀ``,
    ``Wo_q ← Wo_q Wv U_h``), an invertible, non-orthogonal change of basis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import RatioError
from ...kernels.pearson import linear_fit_pearson
from ...kernels.ridge import ridge_lambda, ridge_solve
from ...kernels.svd import SOLVERS, weighted_svd
from ...shapes import ModelShapes
from ...spec import LayerSpec
from ..base import Decision, Method
from ..channels import ffn_channel_scores, select_channels, slice_ffn
from .attention import exact_ond_transform, fast_ond_rotation, keep_lowest_dropped, slice_values, value_scores
from .budget import OlicaPlan, attention_knobs, budget_split, ffn_counts, layer_spec, pick_lc_layers
from .observers import LCObserver, PassAObserver, SurveyObserver

OLICA_CONFIG_VERSION = 1


@dataclass(frozen=True)
class OlicaConfig:
    """Olica knobs. nsamples/seqlen are not here: λ only needs the token count (note 4)."""

    k: float = 3.0  # Q/K : V/O budget ratio of sr_allocation
    mlp_num: int = 6  # layers that get Linear Calibration
    lc_rank_ratio: float = 0.03  # LC bypass rank = floor(lc_rank_ratio · d)
    percdamp: float = 1.0  # ridge strength (see note 4)
    keep_least_frac: float = 0.01  # FFN: the least important fraction is kept
    exact_ond: bool = False  # ablation: SVD of the full Wv·Wo product (small models only)
    svd_solver: str = "auto"  # streamprune.kernels.svd solver

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"OlicaConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 < self.k < math.inf:
            raise bad("k", "a positive number")
        if isinstance(self.mlp_num, bool) or not isinstance(self.mlp_num, int) or self.mlp_num < 0:
            raise bad("mlp_num", "an int >= 0")
        if not isinstance(self.lc_rank_ratio, (int, float)) or not 0 <= self.lc_rank_ratio < 1:
            raise bad("lc_rank_ratio", "in [0, 1)")
        if not isinstance(self.percdamp, (int, float)) or not 0 <= self.percdamp < math.inf:
            raise bad("percdamp", "a finite number >= 0")
        if not isinstance(self.keep_least_frac, (int, float)) or not 0 <= self.keep_least_frac < 0.05:
            raise bad("keep_least_frac", "in [0, 0.05)")
        if not isinstance(self.exact_ond, bool):
            raise bad("exact_ond", "a bool")
        if self.svd_solver not in ("auto",) + SOLVERS:
            raise bad("svd_solver", f"one of {('auto',) + SOLVERS}")


# ---- FFN (scores and selection shared with LoRAP: streamprune.methods.channels) -------------


def pruned_channels(kept: Tensor, f: int) -> Tensor:
    """(f − len(kept),) ascending indices of the channels not in ``kept``: LC's residual uses them."""
    mask = torch.ones(f, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


# ---- Linear Calibration and the survey's linearity score ------------------------------------


def lc_lambda(xtx: Tensor, percdamp: float, n_tokens: int) -> float:
    """``percdamp·mean(diag XᵀX)/((N/128)(T/128))`` with N·T = ``n_tokens`` (note 4)."""
    return ridge_lambda(xtx, percdamp, nsamples=n_tokens, seqlen=1)


def linearity_score(n: int, sx: Tensor, xtx: Tensor, xty: Tensor, sy: Tensor, syy_diag: Tensor, percdamp: float) -> float:
    """Survey score ``1 − mean_c Pearson(X Ŵ, Y)_c`` of the ridge fit of Y from X (low = linear)."""
    W, _ = ridge_solve(xtx, xty, lc_lambda(xtx, percdamp, n))
    return 1.0 - float(linear_fit_pearson(n, sx, xtx, xty, sy, syy_diag, W).double().mean())


@dataclass
class LCFit:
    A: Tensor  # (d, r) = U_r S_r
    B: Tensor  # (r, d) = V_rᵀ diag(w)⁻¹; bypass(x) = x A B
    W: Tensor  # (d, d) ridge solution
    rho: Tensor  # (d,) Pearson of the fit per output dim
    weight: Tensor  # (d,) sigmoid weights
    lam: float


def linear_calibration(n: int, sx: Tensor, xtx: Tensor, xte: Tensor, se: Tensor, see_diag: Tensor,
                       percdamp: float, rank: int, solver: str = "auto", seed: int = 0) -> LCFit:
    """Fit the bypass from moments of X (MLP input) and E (pruning residual), all fp32."""
    W, lam = ridge_solve(xtx, xte, lc_lambda(xtx, percdamp, n))  # (d, d)
    rho = linear_fit_pearson(n, sx, xtx, xte, se, see_diag, W)  # (d,)
    w = torch.sigmoid((rho - rho.mean()) / 0.05)
    A, B = weighted_svd(W, w, rank, balance="left", solver=solver, seed=seed)  # W ≈ A B
    return LCFit(A=A, B=B, W=W, rho=rho, weight=w, lam=lam)


def residual_ratio(xtx: Tensor, xte: Tensor, see_diag: Tensor, M: Tensor) -> float:
    """‖E − X M‖² / ‖E‖² on the calibration tokens, from moments (diagnostic, journaled)."""
    M = M.float()
    err = see_diag.sum() - 2 * (M * xte).sum() + ((xtx @ M) * M).sum()
    return float(err / see_diag.sum().clamp_min(1e-30))


# ---- the method --------------------------------------------------------------------------------


class Olica(Method):
    """Olica on the streaming engine: survey → plan → per layer pass A, decide, pass B, refine."""

    name = "olica"
    config_version = OLICA_CONFIG_VERSION
    needs_survey = True
    needs_pass_b = True
    pass_b_layer = "dense"
    # Fraction of sr_allocation's attention cut (the paper: 1). Not an Olica knob: methods
    # built on Olica's selection (cascade) set it before ``plan``.
    attn_scale: float = 1.0

    def __init__(self, config: OlicaConfig, ratio: float):
        super().__init__(config, ratio)
        self.knobs: OlicaPlan | None = None
        self._shapes: ModelShapes | None = None
        self._survey: list[dict[str, Tensor]] | None = None
        self._lc_pending: dict[int, tuple[Tensor, Tensor]] = {}

    # ---- plan ---------------------------------------------------------------------------
    def plan(self, shapes: ModelShapes, survey: list[dict[str, Tensor]] | None = None) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise RatioError(f"--ratio must be in (0, 1) for method olica, got {self.ratio}")
        cfg, d, L = self.config, shapes.hidden_size, shapes.num_layers
        lc_rank = math.floor(cfg.lc_rank_ratio * d)
        mlp_num = min(cfg.mlp_num, L - 1) if self._wants_lc(d) else 0
        s_qk, s_vo, s_mlp = budget_split(shapes, self.ratio, cfg.k, mlp_num * 2 * d * lc_rank, self.attn_scale)
        q_rank, k_rank, h_v = attention_knobs(shapes, s_qk, s_vo)
        n_least, n_pruned = ffn_counts(shapes.intermediate_size, s_mlp, cfg.keep_least_frac)
        if survey is not None:
            keys = {"linearity", "o_out_energy"} if mlp_num else {"o_out_energy"}
            if len(survey) != L or any(not keys <= set(s) for s in survey):
                raise ValueError(f"olica survey must hold {L} dicts with {sorted(keys)}")
            lc_layers = pick_lc_layers([float(s["linearity"]) for s in survey], mlp_num) if mlp_num else ()
        else:
            lc_layers = tuple(range(mlp_num))  # provisional: same parameter count
        self.knobs = OlicaPlan(s_qk, s_vo, s_mlp, q_rank, k_rank, h_v, n_least, n_pruned, lc_rank,
                               lc_layers, lc_provisional=survey is None)
        self._shapes, self._survey = shapes, survey

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        if self.knobs is None:
            raise RuntimeError("Olica.planned_specs called before plan()")
        return [self._layer_spec(shapes, i) for i in range(shapes.num_layers)]

    def ffn_pruned(self, i: int) -> int:
        """FFN channels layer ``i`` loses: the plan's uniform count, or a per-layer allocation."""
        p = self.knobs
        return p.n_ffn_pruned if p.ffn_pruned_per_layer is None else p.ffn_pruned_per_layer[i]

    def _layer_spec(self, shapes: ModelShapes, i: int) -> LayerSpec:
        p = self.knobs
        f = shapes.intermediate_size - self.ffn_pruned(i)
        return layer_spec(shapes, p.q_rank, p.k_rank, p.v_head_dim, f, p.lc_rank if i in p.lc_layers else 0)

    # ---- survey -------------------------------------------------------------------------------
    def _wants_lc(self, d: int) -> bool:
        """Whether any layer can get Linear Calibration (else the survey skips the linearity moments)."""
        return self.config.mlp_num > 0 and math.floor(self.config.lc_rank_ratio * d) > 0

    def survey_observer(self, layer_idx: int, weights: dict[str, Tensor]) -> SurveyObserver:
        d = weights["mlp.down_proj.weight"].shape[0]
        return SurveyObserver(d, moments=self._wants_lc(d))

    def survey_result(self, layer_idx: int, observer: SurveyObserver) -> dict[str, Tensor]:
        out = {"o_out_energy": observer.eo.float().cpu()}
        if not observer.moments:
            return out
        m = observer.mlp
        m.check_finite(f"olica survey statistics of layer {layer_idx}")
        score = linearity_score(m.n, m.sx, m.xtx, m.xty, m.sy, m.syy_diag, self.config.percdamp)
        return {"linearity": torch.tensor(score, dtype=torch.float32), **out}

    # ---- per layer ---------------------------------------------------------------------------
    def observer(self, layer_idx: int, pass_name: str, weights: dict[str, Tensor]):
        s = self._shapes
        if pass_name == "A":
            return PassAObserver(s.num_heads, s.head_dim)
        if pass_name == "B" and layer_idx in self._lc_pending:
            pruned, down_pruned = self._lc_pending[layer_idx]
            return LCObserver(s.hidden_size, pruned, down_pruned)
        return None

    def decide(self, layer_idx: int, weights: dict[str, Tensor], observer: PassAObserver) -> Decision:
        if self._survey is None:
            raise RuntimeError("Olica.decide needs the survey: call plan(shapes, survey) first")
        s, p, cfg = self._shapes, self.knobs, self.config
        hpg, h, seed = s.heads_per_group, s.head_dim, layer_idx
        spec = self._layer_spec(s, layer_idx)
        ev, ex, eh = observer.e["v_proj"], observer.e["gate_proj"], observer.e["down_proj"]
        # every norm as is (block norms, q/k norms: Olica keeps every head, so a whole-projection q/k norm stays whole)
        out: dict[str, Tensor] = {n: w for n, w in weights.items() if n.endswith("norm.weight")}

        for proj, rank in (("q", p.q_rank), ("k", p.k_rank)):  # activation-weighted SVD
            w = weights[f"self_attn.{proj}_proj.weight"]
            if rank is None:  # nothing to save: the projection stays dense
                out[f"self_attn.{proj}_proj.weight"] = w
                if s.qkv_bias:
                    out[f"self_attn.{proj}_proj.bias"] = weights[f"self_attn.{proj}_proj.bias"]
                continue
            up, down = weighted_svd(w, ev.sqrt(), rank, balance="left", solver=cfg.svd_solver, seed=seed)
            out[f"self_attn.{proj}_proj.down.weight"] = down.contiguous()
            out[f"self_attn.{proj}_proj.up.weight"] = up.contiguous()
            if s.qkv_bias:
                out[f"self_attn.{proj}_proj.up.bias"] = weights[f"self_attn.{proj}_proj.bias"]

        wv, wo = weights["self_attn.v_proj.weight"], weights["self_attn.o_proj.weight"]
        eo = self._survey[layer_idx]["o_out_energy"].to(wo.device)
        ond = exact_ond_transform if cfg.exact_ond else fast_ond_rotation
        wv_r, wo_r, T = ond(wv, wo, eo, hpg, h, solver=cfg.svd_solver, seed=seed)
        bv = None
        if s.qkv_bias:  # v' = v T, so b' = b T per group
            bv = (weights["self_attn.v_proj.bias"].float().reshape(-1, 1, h) @ T).reshape(-1)
        keep_v = keep_lowest_dropped(value_scores(wv_r, wo_r, ev, observer.o_grams, T, hpg), h - p.v_head_dim)
        wv_s, wo_s, bv_s = slice_values(wv_r, wo_r, keep_v, hpg, bv)
        out["self_attn.v_proj.weight"] = wv_s.to(wv.dtype)
        out["self_attn.o_proj.weight"] = wo_s.to(wo.dtype)
        if bv_s is not None:
            out["self_attn.v_proj.bias"] = bv_s.to(wv.dtype)
        if s.o_bias:
            out["self_attn.o_proj.bias"] = weights["self_attn.o_proj.bias"]

        gate, upw, down = (weights[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        kept = select_channels(ffn_channel_scores(gate, upw, down, ex, eh), self.ffn_pruned(layer_idx), cfg.keep_least_frac)
        ffn = slice_ffn(weights, kept)
        out.update({f"mlp.{n}_proj.weight": ffn[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
        if spec.bypass_rank:  # zero bypass until refine() fits it
            d, r = s.hidden_size, spec.bypass_rank
            out["mlp.bypass.down.weight"] = torch.zeros(r, d, dtype=down.dtype, device=down.device)
            out["mlp.bypass.up.weight"] = torch.zeros(d, r, dtype=down.dtype, device=down.device)
            pruned = pruned_channels(kept, down.shape[1])
            self._lc_pending[layer_idx] = (pruned, down[:, pruned].contiguous())

        info = {"q_rank": p.q_rank, "k_rank": p.k_rank, "v_head_dim": p.v_head_dim,
                "ffn_kept": int(kept.numel()), "lc": bool(spec.bypass_rank), "ond": "exact" if cfg.exact_ond else "fast"}
        decision = Decision(spec, out, info)
        decision.validate(layer_idx)
        return decision

    def refine(self, layer_idx: int, decision: Decision, observer: LCObserver | None) -> Decision:
        if observer is None:
            return decision
        self._lc_pending.pop(layer_idx, None)
        m = observer.moments
        m.check_finite(f"olica LC statistics of layer {layer_idx}")
        fit = linear_calibration(m.n, m.sx, m.xtx, m.xty, m.sy, m.syy_diag, self.config.percdamp,
                                 decision.spec.bypass_rank, solver=self.config.svd_solver, seed=layer_idx)
        dtype = decision.tensors["mlp.down_proj.weight"].dtype
        tensors = dict(decision.tensors)
        tensors["mlp.bypass.down.weight"] = fit.A.T.contiguous().to(dtype)  # (r, d): x ↦ x A
        tensors["mlp.bypass.up.weight"] = fit.B.T.contiguous().to(dtype)  # (d, r): z ↦ z B
        info = {**decision.info, "lc_lambda": fit.lam, "lc_rho_mean": float(fit.rho.mean()),
                "lc_residual_ratio": residual_ratio(m.xtx, m.xty, m.syy_diag, fit.A @ fit.B)}
        refined = Decision(decision.spec, tensors, info)
        refined.validate(layer_idx)
        return refined
