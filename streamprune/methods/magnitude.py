"""``magnitude``: uniform FFN channel pruning by the L2 norm of each channel's weights.

A plumbing floor, not a result: weight-only scores ignore activations (on SmolLM2 they
are worse than random). Channel j = gate row j + up row j + down column j; score =
L2 norm of those weights together. Every layer drops the same number of channels,
chosen so the achieved total reduction is the closest reachable to ``ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import RatioError
from ..shapes import ModelShapes
from ..spec import LayerSpec
from .base import Decision, Method
from .channels import slice_ffn


@dataclass(frozen=True)
class MagnitudeConfig:
    """No knobs: the ratio alone fixes the FFN width."""


def channels_to_prune(shapes: ModelShapes, ratio: float) -> int:
    """Channels removed per layer so the total reduction is closest to ``ratio``."""
    per_channel = 3 * shapes.hidden_size  # gate row + up row + down column
    k = round(ratio * shapes.total_params() / (shapes.num_layers * per_channel))
    if k >= shapes.intermediate_size:
        reachable = shapes.num_layers * (shapes.intermediate_size - 1) * per_channel / shapes.total_params()
        raise RatioError(
            f"--ratio {ratio} is unreachable with method magnitude (FFN channels only): "
            f"at most {reachable:.3f} of the parameters can be removed; lower --ratio or use another --method"
        )
    return k


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(f,) L2 norm of [gate[j,:], up[j,:], down[:,j]] in fp32."""
    g, u, d = gate.float(), up.float(), down.float()
    return (g.square().sum(1) + u.square().sum(1) + d.square().sum(0)).sqrt()


def keep_indices(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Indices of the channels kept (ascending), dropping the ``n_prune`` lowest scores."""
    order = torch.argsort(scores, stable=True)
    return torch.sort(order[n_prune:]).values


class Magnitude(Method):
    name = "magnitude"

    def plan(self, shapes: ModelShapes, survey=None) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1), got {self.ratio}")
        self.n_prune = channels_to_prune(shapes, self.ratio)
        self.spec = replace(shapes.dense_spec(), intermediate_size=shapes.intermediate_size - self.n_prune)

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        return [self.spec] * shapes.num_layers

    def decide(self, layer_idx, weights, observer) -> Decision:
        scores = channel_scores(weights["mlp.gate_proj.weight"], weights["mlp.up_proj.weight"], weights["mlp.down_proj.weight"])
        keep = keep_indices(scores, self.n_prune)
        return Decision(self.spec, slice_ffn(weights, keep), info={"ffn_kept": int(keep.numel())})
