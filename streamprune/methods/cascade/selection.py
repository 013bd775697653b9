"""OBS selection of a layer's FFN channels (``selection="obs"``).

The base method scores channels one by one and slices; here the channels leave by their
exact Optimal Brain Surgeon cost on down_proj (:func:`streamprune.kernels.obs_remove_columns`),
and down_proj's kept columns are refitted to absorb what they can, in the units of the
reconstruction loss: the Gram of the down_proj input ``h`` on the pruned stream is weighted
per token by ``1 / ms(y_t)`` of the layer's output (the error as the next RMSNorm sees it,
accumulated by :class:`.observers.AllocationObserver` in pass A). Channel ``j`` is the group
{gate row j, up row j, down column j}: gate and up lose the same rows.

Pure functions on tensors; the arithmetic is float32 (``OBS_DTYPE``) at every width: on the
demo model's real Grams (layers 2, 15, 28; 16k C4 tokens) float32 chose exactly the channels
float64 did, its greedy cost curve was within 4e-7 of float64's, and it ran 1.6 × faster on the
CPU; on a GPU float64 is 2-64 × slower still, and at 70B float32 halves the f × f inverse
(3.3 GB at f = 28672). The kept weights are solved once from the damped Gram
(:func:`streamprune.kernels.obs.ls_kept_weights`), so rounding in the downdates can only
change which channels go, never accumulate in the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.obs import FLUSH, obs_remove_columns, obs_remove_given
from ...shapes import ModelShapes

OBS_DTYPE = torch.float32


def obs_select_ffn(weights: dict[str, Tensor], gram: Tensor, n_prune: int, damp: float, block: int) -> tuple[dict[str, Tensor], dict]:
    """(gate/up/down tensors of the kept channels, info) for removing ``n_prune`` channels.

    weights: the dense layer's tensors (``mlp.{gate,up,down}_proj.weight``); gram: (f, f)."""
    gate, up, down = (weights[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    kept, down_kept, cost = obs_remove_columns(down, gram, n_prune, damp=damp, block=block, dtype=OBS_DTYPE)
    g = gram.to(OBS_DTYPE)
    w = down.to(g.device, g.dtype)
    energy = float(((w @ g) * w).sum())  # Σ_t ‖W h_t‖² / ms(y_t): the FFN output's own size, same units as cost
    tensors = {"mlp.gate_proj.weight": gate[kept].contiguous(), "mlp.up_proj.weight": up[kept].contiguous(),
               "mlp.down_proj.weight": down_kept.contiguous()}
    return tensors, {"selection": "obs", "obs_cost_ratio": float(f"{cost / energy:.6g}") if energy > 0 else 0.0}


def obs_ffn_given(weights: dict[str, Tensor], gram: Tensor, removed: Tensor, damp: float) -> dict[str, Tensor]:
    """gate/up/down of the FFN without the channels ``removed`` (e.g. a prefix of the survey's
    greedy OBS order), down_proj's kept columns solved as :func:`obs_select_ffn` does."""
    gate, up, down = (weights[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    kept, down_kept = obs_remove_given(down, gram, removed, damp=damp, dtype=OBS_DTYPE)
    return {"mlp.gate_proj.weight": gate[kept].contiguous(), "mlp.up_proj.weight": up[kept].contiguous(),
            "mlp.down_proj.weight": down_kept.contiguous()}


def obs_workspace_bytes(shapes: ModelShapes) -> int:
    """Device memory at OBS's peak: the fp32 Gram (the observer's), its damped copy, a Cholesky
    factor and the inverse in the arithmetic dtype, three out × f copies of down_proj, and the
    deferred downdates' buffers (FLUSH + 1 pending columns: two rows of f and one of d each)."""
    f, d = shapes.intermediate_size, shapes.hidden_size
    s = OBS_DTYPE.itemsize
    return 4 * f * f + 3 * f * f * s + 3 * d * f * s + (FLUSH + 1) * (2 * f + d) * s


def obs_greedy_flop(shapes: ModelShapes, n_remove: int) -> float:
    """Arithmetic of the greedy OBS steps on one layer's down_proj (also the survey's
    ``allocation="obs"`` curve): the inverse (Cholesky f³/3 + inverse 2f³/3), then per removed
    channel its share of the deferred downdates of the inverse (2f²) and of down_proj (2df), the
    pass over down_proj that updates the column norms (2df) and the pending corrections
    (~2 · FLUSH · f; :func:`streamprune.kernels.obs._greedy`)."""
    f, d = shapes.intermediate_size, shapes.hidden_size
    return float(f ** 3 + n_remove * (2 * f * f + 4 * d * f + 2 * FLUSH * f))


def obs_flop(shapes: ModelShapes, n_prune: int) -> float:
    """Arithmetic of one layer's OBS selection: the greedy steps (:func:`obs_greedy_flop`), then
    the final solve on the kept columns (Cholesky k³/3 + 2dfk for the right-hand side + 2dk² for the solves)."""
    f, d = shapes.intermediate_size, shapes.hidden_size
    k = f - n_prune
    return obs_greedy_flop(shapes, n_prune) + float(k ** 3 / 3 + 2 * d * f * k + 2 * d * k * k)
