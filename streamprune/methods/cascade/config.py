"""cascade's options: :class:`CascadeConfig`, validated on construction.

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
  (:mod:`streamprune.forks`, :mod:`.search`). ``search_blends`` > 1: then the allocations on
  ``search_blends`` blends of the two curves (OBS's, β = 0, to the KL-scaled, β = 1) are each
  scored whole, by the KL of their pruned model's output, in one more streamed pass, and the
  best is taken (:func:`.search.blended`).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .reconstruct import PRECISIONS, ReconSettings

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
    search_blends: int = 1  # allocations on blends of the OBS and KL-scaled curves scored whole (1: the KL-scaled one alone)
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
        if not is_int(self.search_blends) or self.search_blends < 1:
            raise bad("search_blends", "an int >= 1")
        if isinstance(self.alloc_max_frac, bool) or not isinstance(self.alloc_max_frac, (int, float)) or not 0 < self.alloc_max_frac < 1:
            raise bad("alloc_max_frac", "in (0, 1)")

    def settings(self) -> ReconSettings:
        return ReconSettings(epochs=self.recon_epochs, lr=float(self.recon_lr), batch_tokens=self.recon_batch_tokens,
                             val_rows=self.recon_val_rows, loss=self.recon_loss,
                             schedule=self.recon_schedule, min_gain=float(self.recon_min_gain), precision=self.recon_precision)
