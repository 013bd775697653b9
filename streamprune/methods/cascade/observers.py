"""What cascade measures in the survey on top of its base method (dense model, dense stream).

:class:`AllocationObserver` forwards every tap the base's survey observer wants and adds, per
chunk: the MLP-input and down_proj-input energies (the base's channel score on the dense
stream) and the down_proj-input Gram weighted per token by ``1 / ms(y_t)`` of the layer output
(see :mod:`.allocation`). Hooks fire inside-out, so a chunk's down_proj input is held until the
layer's own output (tap ``layer``) arrives; fp32 accumulation on the activations' device.
The same observer serves ``selection="obs"`` in pass A (pruned stream): its Gram is the
Hessian OBS removes down_proj's input columns with (:mod:`.selection`). With ``attention=True``
(``structure="servable"``) it also sums the attention output's size in the same units,
``Σ_t ‖o_t‖² / ms(y_t)`` (``attn``): the error of removing the layer's attention (:mod:`.servable`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.moments import energy

_BLOCK = 4096  # tokens at a time for the weighted Gram


class AllocationObserver:
    summed = ("base", "eh", "ex", "gram", "attn")  # all-reduced across ranks under torchrun (streamprune.distributed)

    def __init__(self, base, f: int, attention: bool = False):
        self.base = base
        own = {"gate_proj", "down_proj", "layer"} | ({"o_proj"} if attention else set())
        self.taps = frozenset(own) | (base.taps if base is not None else frozenset())
        self.attention = attention
        self.f = f
        self.ex: Tensor | None = None  # (d,) Σ x² of the MLP input
        self.eh: Tensor | None = None  # (f,) Σ h² of the down_proj input
        self.gram: Tensor | None = None  # (f, f) Σ_t h_t h_tᵀ / ms(y_t)
        self.attn: Tensor | None = None  # () Σ_t ‖o_t‖² / ms(y_t) of the attention output (attention=True)
        self._h: Tensor | None = None
        self._o: Tensor | None = None

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if self.base is not None and tap in self.base.taps:
            self.base.update(tap, x_in, y_out)
        if tap == "gate_proj":
            e = energy(x_in)
            self.ex = e if self.ex is None else self.ex + e
        elif tap == "down_proj":
            e = energy(x_in)
            self.eh = e if self.eh is None else self.eh + e
            self._h = x_in
        elif tap == "o_proj" and self.attention:
            self._o = y_out
        elif tap == "layer":
            h, self._h = self._h, None
            o, self._o = self._o, None
            if self.gram is None:
                self.gram = torch.zeros(self.f, self.f, dtype=torch.float32, device=h.device)
            if self.attention and self.attn is None:
                self.attn = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], _BLOCK):
                w = torch.rsqrt(y_out[i : i + _BLOCK].float().pow(2).mean(-1, keepdim=True) + 1e-6)  # 1 / rms(y_t)
                hw = h[i : i + _BLOCK].float() * w
                self.gram.addmm_(hw.T, hw)
                if self.attention:
                    self.attn += (o[i : i + _BLOCK].float() * w).pow(2).sum()
