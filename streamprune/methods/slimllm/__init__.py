"""SlimLLM (Guo et al., ICML 2025, arXiv 2505.22689; code github.com/guojialong1/Slimllm).

Contract: ``/work/shared/spec/ALGORITHMS.md`` ("SlimLLM", "Ratio contract"), generalised to
grouped-query attention. Per-layer ratios from layer redundancy; attention heads pruned by
Pearson similarity + greedy swap; FFN channels pruned by a PCA-weighted score; each part is
followed by a per-output-dim linear regression folded into o_proj / down_proj (+ bias).

Files: this one (config, the FFN score and regression, the method); ``.budget``
(per-layer ratios, the knob solver); ``.heads`` (head scores, greedy swap, regression
folding); ``.observers`` (what each pass measures); channel selection and slicing are
shared with LoRAP and Olica (``channels``).

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
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ...errors import NumericalError, RatioError, UnsupportedArchitectureError
from ...shapes import ModelShapes
from ...spec import LayerSpec
from ..base import Decision, Method
from ..channels import ffn_channel_scores, select_channels, slice_ffn
from .budget import SlimLLMPlan, ffn_to_prune, heads_to_prune, solve_plan
from .heads import fold_regression, head_pools, linear_fit, select_heads, slice_heads
from .observers import BLOCK_ELEMS, FFNObserver, HeadObserver, SurveyObserver

SLIMLLM_CONFIG_VERSION = 1
REGIMES = ((0.35, 10.0, 26 / 32), (1.0, 7.0, 30 / 32))  # (ratio up to, alpha, n_p): official scripts
_BLOCK = 4096  # down_proj columns scored at a time


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
    blk = max(1, BLOCK_ELEMS // wd.shape[1])
    for i in range(0, wd.shape[0], blk):
        zd, zk = g @ wd[i:i + blk].T, g @ wk[i:i + blk].T  # (f, b)
        syy[i:i + blk] = (wd[i:i + blk].T * zd).sum(0)
        sxy[i:i + blk] = (wk[i:i + blk].T * zd).sum(0)
        sxx[i:i + blk] = (wk[i:i + blk].T * zk).sum(0)
    return linear_fit(n, wk @ sh, wd @ sh, sxx, sxy)


# ---- the method --------------------------------------------------------------------------------


class SlimLLM(Method):
    """SlimLLM on the streaming engine: survey → plan → per layer pass A (heads), pass B (FFN)."""

    name = "slimllm"
    config_version = SLIMLLM_CONFIG_VERSION
    needs_survey = True
    needs_pass_b = True
    pass_b_layer = "pruned"

    def __init__(self, config: SlimLLMConfig, ratio: float):
        super().__init__(config, ratio)
        self.knobs: SlimLLMPlan | None = None
        self._shapes: ModelShapes | None = None

    # ---- plan -------------------------------------------------------------------------------
    def plan(self, shapes: ModelShapes, survey: list[dict[str, Tensor]] | None = None) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1) for method slimllm, got {self.ratio}")
        if shapes.qk_norm == "proj":
            raise UnsupportedArchitectureError(
                "--method slimllm removes attention heads, and this model's q/k RMSNorm spans the whole projection (OLMo 2): "
                "removing heads changes its RMS denominator, so the kept heads' queries and keys would change; use --method "
                "cascade, olica, lorap or magnitude")
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
        return 4 * (f * f + 3 * d * d + 2 * d * f + 4 * BLOCK_ELEMS) + 24 * d * H * H

    # ---- survey -------------------------------------------------------------------------------
    def survey_observer(self, layer_idx: int, weights: dict[str, Tensor]) -> SurveyObserver:
        return SurveyObserver()

    def survey_result(self, layer_idx: int, observer: SurveyObserver) -> dict[str, Tensor]:
        if observer.n == 0 or not math.isfinite(observer.total):
            raise NumericalError(f"slimllm survey of layer {layer_idx}: no tokens or NaN/Inf cosine similarity")
        return {"cos": torch.tensor(observer.total / observer.n, dtype=torch.float64)}

    # ---- per layer ------------------------------------------------------------------------------
    def observer(self, layer_idx: int, pass_name: str, weights: dict[str, Tensor]):
        s, spec = self._shapes, self.knobs.specs[layer_idx]
        if pass_name == "A" and spec.num_heads < s.num_heads:
            return HeadObserver(weights["self_attn.o_proj.weight"], s.num_heads, s.head_dim)
        if pass_name == "B" and spec.intermediate_size < s.intermediate_size:
            return FFNObserver()
        return None

    def decide(self, layer_idx: int, weights: dict[str, Tensor], observer: HeadObserver | None) -> Decision:
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

    def refine(self, layer_idx: int, decision: Decision, observer: FFNObserver | None) -> Decision:
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
