"""``magnitude``: uniform FFN channel pruning by the L2 norm of each channel's weights.

A plumbing floor, not a result: weight-only scores ignore activations (on SmolLM2 they
are worse than random). Channel j = gate row j + up row j + down column j; score =
L2 norm of those weights together. Every layer drops the same number of channels,
chosen so the achieved total reduction is the closest reachable to ``ratio``. With
``ffn_multiple=m`` (the servable structure of ``--format nemotron-nas``: m = 256) the widths
are multiples of m and the layers drop multiples as evenly as the count allows (the last
layers one more), so the ratio still lands within one step of a layer.
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
    """The ratio alone fixes the FFN widths; ``ffn_multiple`` (1: any width) rounds them."""

    ffn_multiple: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.ffn_multiple, bool) or not isinstance(self.ffn_multiple, int) or self.ffn_multiple < 1:
            raise ValueError(f"MagnitudeConfig.ffn_multiple must be an int >= 1, got {self.ffn_multiple!r}")


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


def multiples_to_prune(shapes: ModelShapes, ratio: float, multiple: int) -> list[int]:
    """Channels removed per layer, each a multiple of ``multiple``, spread as evenly as the
    total allows (the last layers one more), the total reduction closest to ``ratio``."""
    f, L = shapes.intermediate_size, shapes.num_layers
    if f % multiple or f < 2 * multiple:
        raise RatioError(f"--option ffn_multiple={multiple} must divide the FFN width {f} at least twice")
    steps = round(ratio * shapes.total_params() / (multiple * 3 * shapes.hidden_size))
    if steps > L * (f // multiple - 1):
        raise RatioError(f"--ratio {ratio} is unreachable with method magnitude and FFN widths in multiples of {multiple}; lower --ratio")
    base, extra = divmod(steps, L)
    return [(base + (i >= L - extra)) * multiple for i in range(L)]


class Magnitude(Method):
    name = "magnitude"
    servable_options = {"ffn_multiple": 256}

    def plan(self, shapes: ModelShapes, survey=None) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RatioError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.config.ffn_multiple == 1:
            self.n_prune = [channels_to_prune(shapes, self.ratio)] * shapes.num_layers
        else:
            self.n_prune = multiples_to_prune(shapes, self.ratio, self.config.ffn_multiple)
        self.specs = [replace(shapes.dense_spec(), intermediate_size=shapes.intermediate_size - n) for n in self.n_prune]

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        return list(self.specs)

    def decide(self, layer_idx, weights, observer) -> Decision:
        scores = channel_scores(weights["mlp.gate_proj.weight"], weights["mlp.up_proj.weight"], weights["mlp.down_proj.weight"])
        keep = keep_indices(scores, self.n_prune[layer_idx])
        return Decision(self.specs[layer_idx], slice_ffn(weights, keep), info={"ffn_kept": int(keep.numel())})

    def workspace_bytes(self, shapes: ModelShapes) -> int:
        """No factorisation: the squares of the largest FFN matrix in fp32 while scoring."""
        return 4 * shapes.hidden_size * shapes.intermediate_size

    def config_dict(self) -> dict:
        out = super().config_dict()
        if out.get("ffn_multiple") == 1:  # the default: fingerprints of runs before the option stay as they were
            del out["ffn_multiple"]
        return out
