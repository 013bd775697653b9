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

Components (each one ``--option``, for the ablation):

- ``base``: which paper method selects the structure (``olica`` default, ``lorap``,
  ``slimllm``); its knobs keep their defaults, except Olica's Linear Calibration, off by
  default here (``mlp_num=0``): reconstruction subsumes a linear bypass and the bypass's
  parameters buy FFN channels instead. ``base_mlp_num=6`` restores it.
- ``allocation``: ``uniform`` (the base's equal FFN cut per layer), ``measured``: the survey
  measures each layer's error curve of cutting its FFN in the score's order (:mod:`.allocation`)
  and the same total number of channels is handed out where it costs least (``alloc_max_frac``
  caps one layer); or ``obs`` (default): the same, with each layer's curve the greedy OBS cost
  of removing k channels with down_proj refitted (:func:`streamprune.kernels.obs.obs_cost_curve`
  on the survey's Gram) — the curve that matches ``selection=obs``; or ``search``: the ``obs``
  curves rescaled to the KL divergence of the model's next-token distribution from the dense
  one's, measured by forking the survey's dense stream at each layer with a few candidate cuts
  (``search_levels`` FFN cuts; in the servable structure also the attention removed) over
  ``search_rows`` held-apart windows, every fork carried through the dense layers after it
  (:mod:`streamprune.forks`, :mod:`.search`).
- ``selection``: ``obs`` (default) or ``score`` (the base's channel score picks each layer's
  FFN channels). ``obs``: Optimal Brain Surgeon (:mod:`streamprune.kernels.obs`) on down_proj with the Gram of
  its input on the pruned stream, weighted per token like the reconstruction loss — channels
  leave one at a time (``obs_block`` at a time) by least exact cost, and down_proj's kept
  columns absorb what they can (a ridge toward the current weights, ``obs_damp``). Base olica
  without LC only.
- ``attn_scale``: the share of Olica's attention cut (sr_allocation's s_qk, s_vo) that is
  taken; the FFNs take the rest of the same total (0 = attention dense, 1 = the paper's split,
  above 1 = more from attention). Measured on the demo model (RESULTS "cascade").
- ``recon`` (default on), ``recon_epochs``, ``recon_lr``, ``recon_batch_tokens``,
  ``recon_val_rows``, ``recon_schedule`` (``cosine`` decay to 0 over the epochs, the default,
  or ``constant``), ``recon_min_gain`` (a layer stops after an epoch that lowers its held-out error by
  less than this fraction of its start), ``recon_loss`` (``rms`` = error after the next RMSNorm, or ``mse``),
  ``recon_precision`` (``auto``: the training steps in bfloat16 under autocast where the device
  multiplies it natively, else float32; ``bfloat16``; ``float32``),
  ``recon_target``: ``dense_layer`` (default: the dense layer on the same pruned input, each
  layer undoes its own pruning) or ``dense_stream`` (the dense model's own hidden states
  leaving the layer, streamed by the engine next to the pruned ones, so every layer also
  corrects the error its pruned input already carries).
- ``structure``: ``streamprune`` (default: the base's attention cut — low-rank Q/K, value-dim
  cuts — with the FFN as above) or ``servable``: the shapes every inference engine stores
  (:mod:`.servable`, the nemotron-nas format): attention kept whole or removed, FFN widths a
  multiple of ``ffn_multiple`` (256), chosen by measured costs (``allocation=obs``) or cut
  alike in every layer (``allocation=uniform``); OBS selection and reconstruction as ever.
  ``--format nemotron-nas`` on ``prune`` turns it on.
- ``decide_on``: ``reconstructed`` (default: each decision sees the reconstructed stream) or
  ``unreconstructed`` (the engine streams the pruned model before reconstruction as well, and
  the base method decides on it: the decisions of ``recon=false``, reconstruction on top).

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
from dataclasses import asdict, dataclass

import torch

from ...errors import RatioError
from ...kernels.obs import obs_cost_curve
from ...shapes import ModelShapes
from ...spec import LayerSpec
from ..base import Decision, LayerData, Method
from .allocation import allocate, prefix_errors
from .observers import AllocationObserver
from .reconstruct import PRECISIONS, ReconSettings, reconstruct_layer
from .selection import OBS_DTYPE, obs_ffn_given, obs_flop, obs_greedy_flop, obs_select_ffn, obs_workspace_bytes
from ...forks import LOGIT_BUDGET
from .search import fork_count, fork_flop, fork_levels, kl_scaled
from .servable import ServableLayer, uniform_plan
from .servable import allocate as allocate_servable

CASCADE_CONFIG_VERSION = 3  # 2: dense targets computed once per chunk (was: per pass over the train/val split); 3: fused Adam, OBS in float32 at every width, bfloat16 training steps (auto)
BASES = ("olica", "lorap", "slimllm")
ALLOCATIONS = ("uniform", "measured", "obs", "search")


@dataclass(frozen=True)
class CascadeConfig:
    base: str = "olica"
    base_mlp_num: int = 0  # Olica's Linear Calibration layers (Olica's own default: 6)
    recon: bool = True
    # At equal Adam steps two passes over the data do what four did, at half the FLOPs; one pass
    # loses 5 %. Whole WikiText-2 @128 at 20 % (RESULTS "cascade"): 2 epochs of 512-token batches
    # 95.31, 4 of 1024 (the same 112 steps) 95.65, 1 of 256 (112 steps) 100.25, 1 of 128 (224) 100.37.
    # At 30-50 % the 4 x 1024 setting is 1.5-4.5 % better (slower): recon_epochs=4, recon_batch_tokens=1024.
    recon_epochs: int = 2
    recon_lr: float = 2e-5
    recon_batch_tokens: int = 512  # tokens per Adam step (whole sequences, at least one)
    recon_val_rows: int = 32
    recon_loss: str = "rms"
    # Learning rate over the epochs: "cosine" (decays to 0) or "constant". At a constant 2e-5 the
    # second epoch raised the held-out error of 3 of the first 10 layers (e.g. layer 7: 0.89 ->
    # 1.15 of its start); whole WikiText-2 @128 at 20 % (RESULTS "cascade", what was tried): 95.11
    # with cosine, 97.73 constant (bfloat16 steps both).
    recon_schedule: str = "cosine"
    recon_min_gain: float = 0.0  # stop a layer after an epoch that gains less than this fraction of its start
    # The training steps' matmuls: "auto" (bfloat16 under autocast where the device multiplies it
    # natively: CUDA with bf16, a CPU with AMX; else float32), "bfloat16" or "float32". Weights,
    # Adam and every held-out measurement stay float32 (RESULTS "cascade", what was tried).
    recon_precision: str = "auto"
    # What a pruned layer is fitted to: "dense_layer" (the dense layer applied to the same
    # pruned input) or "dense_stream" (the dense model's own hidden states leaving the layer,
    # so each layer also corrects the error the layers before it left in its input; measured
    # no better on the demo model: 111.64 vs 111.02, RESULTS "cascade").
    recon_target: str = "dense_layer"
    # What each layer's decision (the base method's passes A/B) sees: the "reconstructed" pruned
    # stream, or the "unreconstructed" one (the pruned model as the base method alone would
    # build it, streamed by the engine next to the reconstructed one): the same decisions as
    # with recon=false, reconstruction on top.
    decide_on: str = "reconstructed"
    # Per-layer FFN counts from error curves: "obs" (greedy OBS costs, the curve selection=obs
    # follows), "measured" (the score's order); or "uniform". Whole WikiText-2 @128 at 20 %
    # (RESULTS "cascade"): 97.40 with obs, 103.09 with measured.
    allocation: str = "obs"
    alloc_max_frac: float = 0.8  # at most this fraction of a layer's FFN channels may go
    # allocation="search": candidates per layer (FFN cuts at j/search_levels of the cap, j = 1..n;
    # in the servable structure also the attention removed) forked in the survey and scored by
    # the KL of the model's next-token distribution on search_rows held-apart windows (:mod:`.search`).
    search_rows: int = 8
    search_levels: int = 3
    attn_scale: float = 1.0  # fraction of Olica's attention cut kept (0: attention dense, the FFNs take it all)
    # Which FFN channels go: "obs" (exact OBS cost + down_proj refit; base olica without LC) or
    # "score" (the base's). Whole WikiText-2 @128 at 50 % (RESULTS "cascade"): 270.88 with obs, 337.81 with score.
    selection: str = "obs"
    obs_damp: float = 0.01  # OBS: λ = obs_damp · mean diag of the Gram (ridge toward the current weights)
    obs_block: int = 1  # OBS: channels removed per step (1: exact greedy; more: fewer, larger steps)
    # "streamprune" (the base's attention cut) or "servable" (attention kept whole or removed, FFN
    # widths multiples of ffn_multiple: what the nemotron-nas format stores, see .servable).
    structure: str = "streamprune"
    ffn_multiple: int = 256

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"CascadeConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.base not in BASES:
            raise bad("base", f"one of {BASES}")
        if not is_int(self.base_mlp_num) or self.base_mlp_num < 0:
            raise bad("base_mlp_num", "an int >= 0")
        if not isinstance(self.recon, bool):
            raise bad("recon", "a bool")
        if not is_int(self.recon_epochs) or self.recon_epochs < 0:
            raise bad("recon_epochs", "an int >= 0")
        if isinstance(self.recon_lr, bool) or not isinstance(self.recon_lr, (int, float)) or not 0 < self.recon_lr < math.inf:
            raise bad("recon_lr", "a positive number")
        if not is_int(self.recon_batch_tokens) or self.recon_batch_tokens < 1:
            raise bad("recon_batch_tokens", "an int >= 1")
        if not is_int(self.recon_val_rows) or self.recon_val_rows < 0:
            raise bad("recon_val_rows", "an int >= 0")
        if self.recon_target not in ("dense_stream", "dense_layer"):
            raise bad("recon_target", "'dense_stream' or 'dense_layer'")
        if isinstance(self.recon_min_gain, bool) or not isinstance(self.recon_min_gain, (int, float)) or not 0 <= self.recon_min_gain < 1:
            raise bad("recon_min_gain", "in [0, 1)")
        if self.recon_precision not in PRECISIONS:
            raise bad("recon_precision", f"one of {PRECISIONS}")
        if self.recon_schedule not in ("constant", "cosine"):
            raise bad("recon_schedule", "'constant' or 'cosine'")
        if self.decide_on not in ("reconstructed", "unreconstructed"):
            raise bad("decide_on", "'reconstructed' or 'unreconstructed'")
        if self.recon_loss not in ("rms", "mse"):
            raise bad("recon_loss", "'rms' or 'mse'")
        if self.allocation not in ALLOCATIONS:
            raise bad("allocation", "one of " + ", ".join(repr(a) for a in ALLOCATIONS))
        if self.allocation != "uniform" and self.base != "olica":
            raise bad("allocation", "'uniform' with base lorap/slimllm (measured allocation needs base olica)")
        if isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)) or not 0 <= self.attn_scale <= 2:
            raise bad("attn_scale", "in [0, 2]")
        if self.attn_scale != 1 and self.base != "olica":
            raise bad("attn_scale", "1 with base lorap/slimllm (the attention/FFN split is Olica's)")
        if self.selection not in ("score", "obs"):
            raise bad("selection", "'score' or 'obs'")
        if self.selection == "obs" and (self.base != "olica" or self.base_mlp_num != 0):
            raise bad("selection", "'score' unless base=olica with base_mlp_num=0 (OBS replaces the base's FFN choice, which "
                                   "LC's bypass is fitted to): add --option selection=score")
        if isinstance(self.obs_damp, bool) or not isinstance(self.obs_damp, (int, float)) or not 0 < self.obs_damp < math.inf:
            raise bad("obs_damp", "a positive number")
        if not is_int(self.obs_block) or self.obs_block < 1:
            raise bad("obs_block", "an int >= 1")
        if self.structure not in ("streamprune", "servable"):
            raise bad("structure", "'streamprune' or 'servable'")
        if not is_int(self.ffn_multiple) or self.ffn_multiple < 1:
            raise bad("ffn_multiple", "an int >= 1")
        if self.structure == "servable" and (self.allocation == "measured" or self.selection != "obs"):
            raise bad("structure", "'streamprune' unless allocation is 'obs', 'search' or 'uniform' and selection is 'obs' "
                                   "(the servable structure's costs and channels are OBS's)")
        if self.allocation == "search" and self.selection != "obs":
            raise bad("allocation", "'obs' or 'measured' with selection='score' (the search's candidates are OBS's cuts)")
        if not is_int(self.search_rows) or self.search_rows < 1:
            raise bad("search_rows", "an int >= 1")
        if not is_int(self.search_levels) or self.search_levels < 1:
            raise bad("search_levels", "an int >= 1")
        if isinstance(self.alloc_max_frac, bool) or not isinstance(self.alloc_max_frac, (int, float)) or not 0 < self.alloc_max_frac < 1:
            raise bad("alloc_max_frac", "in (0, 1)")

    def settings(self) -> ReconSettings:
        return ReconSettings(epochs=self.recon_epochs, lr=float(self.recon_lr), batch_tokens=self.recon_batch_tokens,
                             val_rows=self.recon_val_rows, loss=self.recon_loss,
                             schedule=self.recon_schedule, min_gain=float(self.recon_min_gain), precision=self.recon_precision)


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
        self.shapes: ModelShapes | None = None

    def plan(self, shapes: ModelShapes, survey=None) -> None:
        self.shapes = shapes
        if self.servable:
            return self._plan_servable(shapes, survey)
        self.base.plan(shapes, survey)
        if self.measured and survey is not None:
            self._allocate(shapes, [self._curve(s) for s in survey])

    def _curve(self, result: dict) -> torch.Tensor:
        """A layer's FFN cost curve: the survey's, rescaled to KL units by its forks with ``allocation="search"``."""
        if not self.needs_forks:
            return result["ffn_curve"]
        ks, kls = result["fork_ffn"].tolist(), result["fork_kl"].tolist()
        ffn = [(k, kl) for k, kl in zip(ks, kls) if k >= 0]
        return kl_scaled(result["ffn_curve"], [k for k, _ in ffn], [kl for _, kl in ffn])

    def _attn_cost(self, result: dict) -> float:
        """A layer's price of removing attention: its fork's KL with ``allocation="search"``, else the output size."""
        if self.needs_forks:
            attn = [kl for k, kl in zip(result["fork_ffn"].tolist(), result["fork_kl"].tolist()) if k < 0]
            return attn[0] if attn else float("inf")  # layer 0 keeps its attention: no fork
        return float(result["attn_cost"][0])

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
        down = weights["mlp.down_proj.weight"]
        spec = self._servable_spec(self.shapes, layer)
        tensors = {k: weights[k] for k in spec.tensor_shapes() if k in weights and not k.startswith("mlp.")}
        if spec.o_bias and "self_attn.o_proj.bias" not in tensors:
            tensors["self_attn.o_proj.bias"] = torch.zeros(down.shape[0], dtype=down.dtype, device=down.device)
        tensors.update({k: v.to(down.dtype) for k, v in ffn.items()})
        return Decision(spec, tensors, {})

    def _allocate(self, shapes: ModelShapes, curves) -> None:
        """Replace the base's uniform FFN count by per-layer counts with the same total."""
        from dataclasses import replace

        knobs = self.base.knobs
        counts = allocate(curves, knobs.n_ffn_pruned * shapes.num_layers, self._alloc_cap(shapes.intermediate_size))
        self.base.knobs = replace(knobs, ffn_pruned_per_layer=tuple(counts))

    def _plan_servable(self, shapes: ModelShapes, survey) -> None:
        """Per-layer (attention kept?, FFN width) removing ``ratio`` of the parameters (±1 move):
        measured (:func:`.servable.allocate`) once the survey is in, uniform before it / with
        ``allocation=uniform``. Parameters are counted as the specs store them (a zero o_proj
        bias beside q/k/v biases included)."""
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1), got {self.ratio}")
        f, m = shapes.intermediate_size, self.config.ffn_multiple
        if f % m or f < 2 * m:
            raise RatioError(f"the servable structure needs the FFN width ({f}) to be a multiple of --option ffn_multiple={m}, "
                             "at least two of them: pick an ffn_multiple that divides it")
        kept = [ServableLayer(True, f)] * shapes.num_layers
        per_channel = 3 * shapes.hidden_size
        attn_params = self._servable_spec(shapes, ServableLayer(True, f)).num_params() - self._servable_spec(shapes, ServableLayer(False, f)).num_params()
        baseline = shapes.total_params([self._servable_spec(shapes, s) for s in kept])  # may exceed dense by the zero o biases
        target = round(baseline - (1 - self.ratio) * shapes.total_params())
        if survey is None or not self.measured:
            self.layers = uniform_plan(shapes.num_layers, f, m, per_channel, target)
        else:
            try:
                self.layers = allocate_servable([self._curve(s) for s in survey], [self._attn_cost(s) for s in survey], f, m,
                                                per_channel, attn_params, target)
            except ValueError as e:
                raise RatioError(f"--ratio {self.ratio}: {e}; lower --ratio") from None
        self.specs = [self._servable_spec(shapes, layer) for layer in self.layers]

    def _servable_spec(self, shapes: ModelShapes, layer: ServableLayer) -> LayerSpec:
        from dataclasses import replace

        dense = shapes.dense_spec()
        if layer.attention:  # q/k/v biases travel with an o_proj bias (zero) in the format
            return replace(dense, intermediate_size=layer.ffn, o_bias=dense.o_bias or dense.qkv_bias)
        return replace(dense, num_kv_heads=0, heads_per_group=0, qkv_bias=False, o_bias=False, intermediate_size=layer.ffn)

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
                             ("structure", "streamprune"), ("ffn_multiple", 256), ("search_rows", 8), ("search_levels", 3)):
            if options[key] == default:  # added later: runs at their defaults keep their fingerprints
                del options[key]
        return {"method": self.name, "ratio": self.ratio, "config_version": self.config_version,
                **options, "base_config": self.base.config_dict()}
