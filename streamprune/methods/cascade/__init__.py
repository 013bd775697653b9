"""``cascade``: streamprune's own method — a paper method's attention cut, OBS selection of the
FFN channels with an exact down_proj update, measured per-layer allocation, then block-wise
reconstruction of every pruned layer by gradient on the streamed calibration activations.

Why: a least-squares refit of ``o_proj``/``down_proj`` alone gains little on SwiGLU models
(issue 8: the kept channels cannot stand in for the dropped ones *linearly*). Fitting every
kept weight of the pruned layer — Q/K factors, V/O, gate/up/down, norms — to the dense
layer's output on the same (pruned-stream) input is the non-linear version of that refit
(see :mod:`.reconstruct`). It runs layer by layer inside the streaming loop, between the
decision and the propagation, so layer ``i + 1`` sees the reconstructed layer ``i``'s
output: errors are corrected where they arise, never the whole model in memory.

Its options, one component each (for the ablation), are :class:`.config.CascadeConfig`'s.

Contracts: the structure, hence the achieved ratio and the layer specs, is exactly the base
method's (±1 pp); reconstruction changes values, never shapes. Deterministic (seeded by the
layer index, fixed data order): a resumed run is byte-identical on one device type, and a
crash inside reconstruction just redoes that layer. Statistics and factorisations are the
base method's; reconstruction adds Adam's state for one pruned layer (fp32: weights,
gradients and two moments, 16 bytes per parameter; autocast's bf16 weight copies, 2 more) and
one batch's activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch

from ...errors import RatioError
from ...kernels.obs import obs_cost_curve
from ...shapes import ModelShapes
from ...spec import LayerSpec
from ..base import Decision, LayerData, Method
from .allocation import allocate, prefix_errors
from .observers import AllocationObserver
from .config import ALLOCATIONS, BASES, CASCADE_CONFIG_VERSION, CascadeConfig  # noqa: F401  (the package's API)
from .reconstruct import reconstruct_layer
from .selection import OBS_DTYPE, obs_ffn_given, obs_flop, obs_greedy_flop, obs_select_ffn, obs_workspace_bytes
from ...forks import LOGIT_BUDGET
from .search import blend_betas, blended, fork_count, fork_flop, fork_levels, kl_scaled, scoring_flop
from . import servable
from .servable import ServableLayer

def recon_workspace_bytes(shapes: ModelShapes, layer_params: int, batch_tokens: int) -> int:
    """Adam state for ``layer_params`` (fp32 weights, gradients, two moments: 16 B each) + the
    bfloat16 copies autocast makes of them for a step (2 B each; none in float32, so an upper
    bound there) + ~(12 d + 6 f) fp32 activations per token (attention and SwiGLU intermediates
    saved for backward, their gradients; bfloat16 under autocast: an upper bound)."""
    return 18 * layer_params + batch_tokens * (12 * shapes.hidden_size + 6 * shapes.intermediate_size) * 4


def build_base(config: CascadeConfig, ratio: float) -> Method:
    from .. import build_method

    options = {"mlp_num": config.base_mlp_num} if config.base == "olica" else {}
    return build_method(config.base, ratio, options)


class Cascade(Method):
    """Selection by ``config.base``; every pass and decision is the base's, then ``reconstruct``."""

    name = "cascade"
    config_version = CASCADE_CONFIG_VERSION
    servable_options = {"structure": "servable"}

    def __init__(self, config: CascadeConfig, ratio: float):
        super().__init__(config, ratio)
        self.base = build_base(config, ratio)
        if config.base == "olica":
            self.base.attn_scale = float(config.attn_scale)
        self.measured = config.allocation != "uniform"
        self.servable = config.structure == "servable"
        self.needs_survey = self.base.needs_survey or self.measured
        self.needs_pass_b = self.base.needs_pass_b
        self.pass_b_layer = self.base.pass_b_layer
        if self.servable:  # the base method decides nothing: no survey or pass B of its own
            self.needs_survey, self.needs_pass_b = self.measured, False
        self.layers: list[ServableLayer] = []  # structure="servable": the plan, and its specs
        self.specs: list[LayerSpec] = []
        self.needs_reconstruction = config.recon and config.recon_epochs > 0
        self.needs_dense_stream = self.needs_reconstruction and config.recon_target == "dense_stream"
        self.needs_decision_stream = self.needs_reconstruction and config.decide_on == "unreconstructed"
        self.needs_forks = config.allocation == "search"
        self.fork_rows = config.search_rows
        self.needs_scoring = self.needs_forks and config.search_blends > 1
        self.population_bound = config.search_blends if self.needs_scoring else 0
        self.plans: list = []  # needs_scoring: the population (per-layer FFN counts, or servable layers), distinct
        self.orders: list[torch.Tensor] = []  # each layer's greedy OBS order (the survey's)
        self.shapes: ModelShapes | None = None

    def plan(self, shapes: ModelShapes, survey=None) -> None:
        self.shapes = shapes
        if self.servable:
            self._plan_servable(shapes, survey)
        else:
            self.base.plan(shapes, survey)
            if self.measured and survey is not None:
                self._allocate(shapes, [self._curve(s) for s in survey])
        if self.needs_scoring and survey is not None:
            self.orders = [s["ffn_order"] for s in survey]
            self.plans = []
            for beta in blend_betas(self.config.search_blends):
                plan = self._blend_plan(shapes, survey, beta)
                if plan not in self.plans:
                    self.plans.append(plan)

    def _blend_plan(self, shapes: ModelShapes, survey, beta: float) -> list:
        """The allocation on the blend ``beta`` of the OBS and KL-scaled curves (:func:`.search.blended`)."""
        curves = [self._curve(s, beta) for s in survey]
        if self.servable:
            try:
                return servable.plan(shapes, self.ratio, self.config.ffn_multiple, curves, [self._attn_cost(s, beta) for s in survey])
            except ValueError as e:
                raise RatioError(f"--ratio {self.ratio}: {e}; lower --ratio") from None
        return allocate(curves, self.base.knobs.n_ffn_pruned * shapes.num_layers, self._alloc_cap(shapes.intermediate_size))

    def _curve(self, result: dict, beta: float = 1.0) -> torch.Tensor:
        """A layer's FFN cost curve: the survey's, rescaled to KL units by its forks with
        ``allocation="search"`` (``beta`` < 1: a blend of the two, :func:`.search.blended`)."""
        if not self.needs_forks:
            return result["ffn_curve"]
        ks, kls = result["fork_ffn"].tolist(), result["fork_kl"].tolist()
        ffn = [(k, kl) for k, kl in zip(ks, kls) if k >= 0]
        return blended(result["ffn_curve"], kl_scaled(result["ffn_curve"], [k for k, _ in ffn], [kl for _, kl in ffn]), beta)

    def _attn_cost(self, result: dict, beta: float = 1.0) -> float:
        """A layer's price of removing attention: its fork's KL with ``allocation="search"`` (``beta`` < 1:
        ``a · (KL / a)^β`` with ``a`` the attention output's size), else the output size."""
        if self.needs_forks:
            attn = [kl for k, kl in zip(result["fork_ffn"].tolist(), result["fork_kl"].tolist()) if k < 0]
            if not attn:
                return float("inf")  # layer 0 keeps its attention: no fork
            a = float(result["attn_cost"][0])
            return attn[0] if beta == 1.0 or a <= 0 else a * (attn[0] / a) ** beta
        return float(result["attn_cost"][0])

    # ---- the scoring pass (search_blends > 1): the population of allocations scored whole --------
    def population(self) -> int:
        return len(self.plans)

    def scoring_observer(self, layer_idx, weights):
        """OBS's Gram, and (streamprune structure) the base's pass-A statistics for its attention cut."""
        base = None if self.servable else self.base.observer(layer_idx, "A", weights)
        return AllocationObserver(base, weights["mlp.down_proj.weight"].shape[1])

    def member_layers(self, layer_idx, weights, observer) -> list[Decision]:
        """Layer ``layer_idx`` as each allocation cuts it, the structure the output will have short of
        reconstruction: the FFN without its first ``k`` channels of the survey's greedy OBS order
        (down_proj refitted), with the base's attention cut decided on the dense calibration stream
        (servable: the attention kept whole or removed). Scored without the attention cut, the
        allocations rank unlike their outputs at large cuts (RESULTS, "Choosing the structure by the output")."""
        f = weights["mlp.down_proj.weight"].shape[1]
        attention = None
        if not self.servable:
            base = self.base.decide(layer_idx, weights, observer.base)
            attention = (base.spec, {k: v for k, v in base.tensors.items() if not k.startswith("mlp.")})
        out = []
        for plan in self.plans:
            layer = plan[layer_idx] if self.servable else ServableLayer(True, f - plan[layer_idx])
            k = f - layer.ffn
            ffn = obs_ffn_given(weights, observer.gram, self.orders[layer_idx][:k], float(self.config.obs_damp)) if k else \
                {n: weights[n] for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
            if attention is None:
                out.append(self._whole_attention_decision(layer_idx, weights, layer, ffn))
            else:
                spec, tensors = attention
                dtype = next(iter(tensors.values())).dtype
                out.append(Decision(replace(spec, intermediate_size=layer.ffn), {**tensors, **{n: v.to(dtype) for n, v in ffn.items()}}, {}))
        return out

    def choose(self, shapes: ModelShapes, kls: list[float]) -> None:
        """Take the allocation of least KL (ties: the earlier, nearer the KL-scaled one)."""
        if len(kls) != len(self.plans):
            raise ValueError(f"{len(kls)} scores for a population of {len(self.plans)}")
        best = self.plans[min(range(len(kls)), key=lambda j: (kls[j], j))]
        if self.servable:
            self.layers = list(best)
            self.specs = [servable.layer_spec(shapes, layer) for layer in self.layers]
        else:
            self.base.knobs = replace(self.base.knobs, ffn_pruned_per_layer=tuple(best))

    def fork_candidates(self, layer_idx: int, weights: dict, observer, result: dict):
        """The search's candidate cuts of layer ``layer_idx`` (dense attention), in ``result["fork_ffn"]``'s
        order: the FFN without the first ``k`` channels of the survey's greedy OBS order (down_proj
        refitted), for each ``k``; ``k = -1``: the attention removed (servable structure)."""
        f = weights["mlp.down_proj.weight"].shape[1]
        for k in result["fork_ffn"].tolist():
            if k < 0:
                layer = ServableLayer(False, f)
                ffn = {n: weights[n] for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
            else:
                layer = ServableLayer(True, f - k)
                ffn = obs_ffn_given(weights, observer.gram, result["ffn_order"][:k], float(self.config.obs_damp))
            yield self._whole_attention_decision(layer_idx, weights, layer, ffn)

    def _whole_attention_decision(self, layer_idx: int, weights: dict, layer: ServableLayer, ffn: dict) -> Decision:
        """Attention copied whole (``layer.attention``) or dropped, with the given FFN tensors."""
        spec = servable.layer_spec(self.shapes, layer)
        return Decision(spec, servable.layer_tensors(weights, spec, ffn), {})

    def _allocate(self, shapes: ModelShapes, curves) -> None:
        """Replace the base's uniform FFN count by per-layer counts with the same total."""
        knobs = self.base.knobs
        counts = allocate(curves, knobs.n_ffn_pruned * shapes.num_layers, self._alloc_cap(shapes.intermediate_size))
        self.base.knobs = replace(knobs, ffn_pruned_per_layer=tuple(counts))

    def _plan_servable(self, shapes: ModelShapes, survey) -> None:
        """The servable plan (:func:`.servable.plan`): measured once the survey is in, uniform
        before it and with ``allocation=uniform``."""
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1), got {self.ratio}")
        try:
            servable.check_width(shapes.intermediate_size, self.config.ffn_multiple)
        except ValueError as e:
            raise RatioError(str(e)) from None
        measured = survey is not None and self.measured
        try:
            self.layers = servable.plan(shapes, self.ratio, self.config.ffn_multiple,
                                        [self._curve(s) for s in survey] if measured else None,
                                        [self._attn_cost(s) for s in survey] if measured else None)
        except ValueError as e:
            raise RatioError(f"--ratio {self.ratio}: {e}; lower --ratio") from None
        self.specs = [servable.layer_spec(shapes, layer) for layer in self.layers]

    def _alloc_cap(self, f: int) -> int:
        """The most FFN channels one layer may give up (``alloc_max_frac``; Olica's kept 1 % and one more stay)."""
        if self.servable:  # servable: down to one multiple
            return f - self.config.ffn_multiple
        # From the config, not the plan: the survey (which needs this) may come before plan().
        n_least = math.floor(self.base.config.keep_least_frac * f)  # = Olica's plan (budget.ffn_counts)
        return min(int(self.config.alloc_max_frac * f), f - n_least - 1)

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        if self.servable:
            return list(self.specs)
        return self.base.planned_specs(shapes)

    def survey_observer(self, layer_idx, weights):
        base = self.base.survey_observer(layer_idx, weights) if self.base.needs_survey and not self.servable else None
        if not self.measured:
            return base
        obs = AllocationObserver(base, weights["mlp.down_proj.weight"].shape[1], attention=self.servable)
        obs.weights = {k: weights[k] for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
        return obs

    def survey_result(self, layer_idx, observer):
        if not self.measured:
            return self.base.survey_result(layer_idx, observer)
        out = self.base.survey_result(layer_idx, observer.base) if observer.base is not None else {}
        if self.servable:
            out["attn_cost"] = observer.attn.reshape(1).float().cpu()
        from ..channels import ffn_channel_scores

        w = observer.weights
        if self.config.allocation in ("obs", "search"):
            cap = self._alloc_cap(w["mlp.down_proj.weight"].shape[1])
            curve, order = obs_cost_curve(w["mlp.down_proj.weight"], observer.gram, cap, damp=float(self.config.obs_damp),
                                          block=self.config.obs_block, dtype=OBS_DTYPE, with_order=True)
            out = {**out, "ffn_curve": curve.float().cpu()}
            if self.needs_forks:
                multiple = self.config.ffn_multiple if self.servable else self.config.obs_block
                ks = fork_levels(cap, self.config.search_levels, multiple) + ([-1] if self.servable and layer_idx > 0 else [])
                out.update(ffn_order=order.cpu(), fork_ffn=torch.tensor(ks, dtype=torch.int64))
            return out
        scores = ffn_channel_scores(w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"], observer.ex, observer.eh)
        order = torch.argsort(scores, stable=True)
        n_least = math.floor(self.base.config.keep_least_frac * order.numel())  # Olica keeps its least important 1 %: skip them
        curve = prefix_errors(w["mlp.down_proj.weight"], observer.gram, order[n_least:])
        return {**out, "ffn_curve": curve.float().cpu()}

    def observer(self, layer_idx, pass_name, weights):
        if self.servable:  # OBS's Gram alone
            return AllocationObserver(None, weights["mlp.down_proj.weight"].shape[1]) if pass_name == "A" else None
        base = self.base.observer(layer_idx, pass_name, weights)
        if pass_name != "A" or self.config.selection != "obs":
            return base
        return AllocationObserver(base, weights["mlp.down_proj.weight"].shape[1])  # + the weighted down_proj-input Gram

    def decide(self, layer_idx, weights, observer) -> Decision:
        if self.servable:
            return self._decide_servable(layer_idx, weights, observer)
        if self.config.selection != "obs":
            return self.base.decide(layer_idx, weights, observer)
        decision = self.base.decide(layer_idx, weights, observer.base)  # attention as the base; FFN replaced below
        n_prune = weights["mlp.down_proj.weight"].shape[1] - decision.spec.intermediate_size
        ffn, info = obs_select_ffn(weights, observer.gram, n_prune, float(self.config.obs_damp), self.config.obs_block)
        tensors = {**decision.tensors, **{k: v.to(decision.tensors[k].dtype) for k, v in ffn.items()}}
        obs = Decision(decision.spec, tensors, {**decision.info, **info})
        obs.validate(layer_idx)
        return obs

    def _decide_servable(self, layer_idx, weights, observer) -> Decision:
        """Attention copied whole (or dropped), the planned FFN width chosen by OBS."""
        layer = self.layers[layer_idx]
        f = weights["mlp.down_proj.weight"].shape[1]
        ffn, info = obs_select_ffn(weights, observer.gram, f - layer.ffn, float(self.config.obs_damp), self.config.obs_block)
        decision = self._whole_attention_decision(layer_idx, weights, layer, ffn)
        decision = Decision(decision.spec, decision.tensors, {**info, "attention": layer.attention, "ffn_kept": layer.ffn})
        decision.validate(layer_idx)
        return decision

    def refine(self, layer_idx, decision, observer) -> Decision:
        if self.servable:
            return decision
        return self.base.refine(layer_idx, decision, observer)

    def reconstruct(self, layer_idx: int, decision: Decision, data: LayerData) -> Decision:
        pruned = data.build(decision.spec, {k: v.float() for k, v in decision.tensors.items()}, torch.float32)
        result = reconstruct_layer(pruned, data.dense, data.chunks, data.pe, data.rows, self.config.settings(), seed=layer_idx,
                                   row_offset=data.row_offset, ranks=data.ranks)
        tensors = {k: result.state[k].to(v.dtype).contiguous() for k, v in decision.tensors.items()}
        info = {**decision.info, "recon_val_before": round(result.val_before, 6), "recon_val_after": round(result.val_after, 6),
                "recon_best_epoch": result.best_epoch, "recon_steps": result.steps, "recon_precision": result.precision,
                "recon_history": [round(v, 6) for v in result.history]}  # held-out loss before epoch 1 and after each
        refined = Decision(decision.spec, tensors, info)
        refined.validate(layer_idx)
        return refined

    def workspace_bytes(self, shapes: ModelShapes) -> int:
        """The larger of the base's statistics/factorisation workspace and reconstruction's
        (they are never alive together): Adam on the largest planned layer (fp32 weights,
        gradients, two moments, autocast's bf16 copies: 18 B/param) + one batch's activations kept for backward."""
        base = 0 if self.servable else self.base.workspace_bytes(shapes)
        if "obs" in (self.config.selection, self.config.allocation) or self.needs_forks:  # OBS (decision, or the survey's curve): never alive with other scratch
            base = max(base, obs_workspace_bytes(shapes))
        if self.needs_forks:  # the head's fp32 logits of a fork chunk and the reference's (streamprune.forks)
            base = max(base, LOGIT_BUDGET)
        if not self.needs_reconstruction:
            return base
        largest = max(s.num_params() for s in self.planned_specs(shapes))
        return max(base, recon_workspace_bytes(shapes, largest, self.config.recon_batch_tokens))

    def extra_flop(self, shapes: ModelShapes, specs: list[LayerSpec], nsamples: int, seqlen: int) -> float:
        """Reconstruction (matmul FLOPs): the dense target once per calibration token (2
        FLOP/param: the dense stream's own step, or the dense layer on the un-reconstructed
        input; none with the default target and order, where pass A's outputs are the targets); per epoch, training tokens through the pruned layer forward and backward
        (6 FLOP/param); held-out tokens forward through it before the first epoch and after each
        (every epoch: an upper bound when ``recon_min_gain`` stops layers early). With
        ``selection="obs"``, each layer's OBS arithmetic as well (:func:`.selection.obs_flop`); with
        ``allocation="obs"``, the survey's greedy OBS curve per layer (up to the cap, no final solve)."""
        cfg = self.config
        f = shapes.intermediate_size
        obs = sum(obs_flop(shapes, f - s.intermediate_size) for s in specs) if cfg.selection == "obs" else 0.0
        if cfg.allocation in ("obs", "search"):
            obs += len(specs) * obs_greedy_flop(shapes, self._alloc_cap(f))
        obs += self.fork_flop(shapes, seqlen)
        if self.needs_scoring:
            obs += scoring_flop(shapes, self.fork_rows * seqlen, nsamples * seqlen, self.config.search_blends)
        if not self.needs_reconstruction:
            return obs
        n_val = min(cfg.recon_val_rows, nsamples // 4)
        train, val = (nsamples - n_val) * seqlen, n_val * seqlen
        dense = shapes.dense_spec().num_params() if self.needs_dense_stream or self.needs_decision_stream else 0
        return obs + float(sum(nsamples * seqlen * 2 * dense + cfg.recon_epochs * train * 6 * s.num_params()
                         + (cfg.recon_epochs + 1) * val * 2 * s.num_params() for s in specs))

    def fork_count(self, shapes: ModelShapes) -> int:
        """How many forks the search spawns (:func:`.search.fork_count`)."""
        if not self.needs_forks:
            return 0
        multiple = self.config.ffn_multiple if self.servable else self.config.obs_block
        return fork_count(shapes.num_layers, self._alloc_cap(shapes.intermediate_size), self.config.search_levels, multiple,
                          attention=self.servable)

    def fork_flop(self, shapes: ModelShapes, seqlen: int) -> float:
        return fork_flop(shapes, self.fork_rows * seqlen, self.fork_count(shapes)) if self.needs_forks else 0.0

    def host_workspace_bytes(self, shapes: ModelShapes, nsamples: int, seqlen: int) -> int:
        """``recon_target="dense_layer"``: the dense layer's outputs on the calibration set, kept
        on the host across epochs (at most fp32)."""
        keeps = self.needs_reconstruction and not self.needs_dense_stream  # the dense stream is read from disk instead
        return nsamples * seqlen * shapes.hidden_size * 4 if keeps else 0

    def config_dict(self) -> dict:
        options = asdict(self.config)
        for key, default in (("attn_scale", 1.0), ("recon_min_gain", 0.0),
                             ("decide_on", "reconstructed"), ("selection", "score"), ("obs_damp", 0.01), ("obs_block", 1),
                             ("structure", "streamprune"), ("ffn_multiple", 256), ("search_rows", 8), ("search_levels", 3), ("search_blends", 1)):
            if options[key] == default:  # added later: runs at their defaults keep their fingerprints
                del options[key]
        return {"method": self.name, "ratio": self.ratio, "config_version": self.config_version,
                **options, "base_config": self.base.config_dict()}
