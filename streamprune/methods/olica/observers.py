"""What Olica measures, pass by pass: the observers the engine feeds.

Olica (He & Lin, ICML 2025, arXiv 2506.08436); the numerics that consume these statistics
are in :mod:`streamprune.methods.olica`. Each observer receives ``update(tap, x_in, y_out)``
with (tokens, features) tensors in the activation dtype, one chunk at a time (see
:mod:`streamprune.methods.base`), and accumulates in fp32 on the activations' device.

- :class:`SurveyObserver`: survey (dense model, dense stream). Moments of (MLP input, MLP
  output) for the linearity score that picks the LC layers; o_proj output energy for the
  Fast-OND rotation (official ``fast_OND``).
- :class:`PassAObserver`: pass A (dense layer, sequentially pruned stream). Input energies
  of v_proj (= q/k input), gate_proj and down_proj; per-head Grams of the o_proj input.
- :class:`LCObserver`: pass B on LC layers (the dense layer again). Moments of X (MLP input)
  and E = dense − pruned FFN output, formed as ``H[:, pruned] · W_down[:, pruned]ᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.moments import Moments, energy

_BLOCK = 4096  # tokens cast to fp32 at a time


class SurveyObserver:
    """Dense model: moments of (MLP input, MLP output) and the o_proj output energy.

    ``moments=False``: the o_proj energy only (no Linear Calibration layer to choose, so the
    linearity score's two d × d moments per token would go unused)."""

    taps = frozenset({"mlp", "o_proj"})
    summed = ("mlp", "eo")  # sums over tokens (all-reduced across ranks)

    def __init__(self, d: int, moments: bool = True):
        self.d = d
        self.moments = moments
        self.mlp: Moments | None = None  # X = MLP input (t, d), Y = MLP output (t, d)
        self.eo: Tensor | None = None  # (d,) Σ y² of the o_proj output

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if tap == "mlp" and self.moments:
            if self.mlp is None:
                self.mlp = Moments(self.d, self.d, device=x_in.device)
            self.mlp.update(x_in, y_out)
        elif tap == "o_proj":
            e = energy(y_out)
            self.eo = e if self.eo is None else self.eo + e


class PassAObserver:
    """Dense layer, pruned stream: input energies and per-head Grams of the o_proj input.

    ``e[tap]`` (features,) for v_proj, gate_proj, down_proj; ``o_grams`` (H, h, h) with
    ``o_grams[q] = A_qᵀ A_q`` for head q's slice A_q (t, h) of the o_proj input.
    """

    taps = frozenset({"v_proj", "o_proj", "gate_proj", "down_proj"})
    summed = ("e", "o_grams")

    def __init__(self, num_heads: int, head_dim: int):
        self.H, self.h = num_heads, head_dim
        self.e: dict[str, Tensor] = {}
        self.o_grams: Tensor | None = None  # (H, h, h) fp32

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if tap == "o_proj":
            if self.o_grams is None:
                self.o_grams = torch.zeros(self.H, self.h, self.h, dtype=torch.float32, device=x_in.device)
            for i in range(0, x_in.shape[0], _BLOCK):
                a = x_in[i:i + _BLOCK].float().reshape(-1, self.H, self.h).transpose(0, 1)  # (H, t, h)
                self.o_grams.baddbmm_(a.transpose(1, 2), a)
        else:
            e = energy(x_in)
            self.e[tap] = e if tap not in self.e else self.e[tap] + e


class LCObserver:
    """Pass B on the dense layer: moments of X (MLP input) and E = H[:, pruned]·Wdown[:, pruned]ᵀ.

    E equals dense − pruned FFN output exactly (the kept channels cancel), needs no
    knowledge of the activation function and has no cancellation error. The two taps of
    one chunk arrive in either order; the pair is folded in once both are seen.
    """

    taps = frozenset({"down_proj", "mlp"})
    summed = ("moments",)  # pruned / down_pruned are inputs; _x / _e are per-chunk scratch

    def __init__(self, d: int, pruned: Tensor, down_pruned: Tensor):
        self.pruned, self.down_pruned = pruned, down_pruned  # (p,) channel indices, (d, p)
        self.moments: Moments | None = None
        self._x: Tensor | None = None  # (t, d) MLP input of the current chunk
        self._e: Tensor | None = None  # (t, d) fp32 residual of the current chunk
        self.d = d

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if tap == "down_proj":  # x_in: dense intermediate activation H (tokens, f)
            w = self.down_pruned.float().T  # (p, d)
            hp = x_in[:, self.pruned.to(x_in.device)]
            self._e = torch.cat([hp[i:i + _BLOCK].float() @ w for i in range(0, hp.shape[0], _BLOCK)])
        else:
            self._x = x_in
        if self._x is not None and self._e is not None:  # both taps of one chunk seen
            assert self._x.shape[0] == self._e.shape[0], "mlp and down_proj taps out of step"
            if self.moments is None:
                self.moments = Moments(self.d, self.d, device=self._x.device)
            self.moments.update(self._x, self._e)
            self._x = self._e = None
