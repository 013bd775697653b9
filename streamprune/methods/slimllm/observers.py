"""What SlimLLM measures, pass by pass: the observers the engine feeds.

SlimLLM (Guo et al., ICML 2025, arXiv 2505.22689); the numerics that consume these statistics
are in :mod:`streamprune.methods.slimllm.heads` and :mod:`streamprune.methods.slimllm`. Each
observer receives ``update(tap, x_in, y_out)`` with (tokens, features) tensors in the activation
dtype, one chunk at a time (see :mod:`streamprune.methods.base`), and accumulates on the
activations' device.

- :class:`SurveyObserver`: survey (dense model, dense stream). Σ over tokens of
  cos(layer output, layer input), float64 (note 10).
- :class:`HeadObserver`: pass A (dense layer, pruned stream; layers that lose heads).
  ``M[c,i,j] = Σ_t T_i[t,c]·T_j[t,c]`` (d, H, H) and ``S[i,c] = Σ_t T_i[t,c]`` (H, d),
  ``T_i = A_i Wo_iᵀ``, fp32, one row block of one chunk at a time.
- :class:`FFNObserver`: pass B (the layer with its attention pruned; layers that lose FFN
  channels). Gram ``HᵀH`` (f, f) and ``ΣH`` of the down_proj input, MLP-input energy,
  down_proj-output moments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import NumericalError
from ...kernels.moments import Moments, energy
from .heads import HeadMoments

BLOCK_ELEMS = 1 << 24  # fp32 elements of one temporary block: head outputs (H, rows, d) here
_BLOCK = 4096  # tokens cast to fp32 at a time


class SurveyObserver:
    """Σ over tokens of cos(layer output, layer input), float64."""

    taps = frozenset({"layer"})
    summed = ("total", "n")  # sums over tokens (all-reduced across ranks)

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        for i in range(0, x_in.shape[0], _BLOCK):
            cos = F.cosine_similarity(y_out[i:i + _BLOCK].float(), x_in[i:i + _BLOCK].float(), dim=-1)
            self.total += float(cos.double().sum())
        self.n += x_in.shape[0]


class HeadObserver:
    """Pass A: ``M`` (d, H, H) and ``S`` (H, d) of ``T_i = A_i Wo_iᵀ``, fp32, a row block at a time."""

    taps = frozenset({"o_proj"})
    summed = ("M", "S", "n")  # wo (weights), H, h, rows are inputs

    def __init__(self, wo: Tensor, num_heads: int, head_dim: int):
        d = wo.shape[0]
        self.H, self.h = num_heads, head_dim
        self.wo = wo.float().reshape(d, num_heads, head_dim).permute(1, 2, 0).contiguous()  # (H, h, d)
        self.M = torch.zeros(d, num_heads, num_heads, device=wo.device)
        self.S = torch.zeros(num_heads, d, device=wo.device)
        self.n, self.rows = 0, max(1, BLOCK_ELEMS // (num_heads * d))

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        for i in range(0, x_in.shape[0], self.rows):
            a = x_in[i:i + self.rows].float().reshape(-1, self.H, self.h).transpose(0, 1)  # (H, t, h)
            T = torch.bmm(a, self.wo)  # (H, t, d) head contributions
            Tc = T.permute(2, 0, 1).contiguous()  # (d, H, t): a strided bmm is ~5x slower on CPU
            self.M.baddbmm_(Tc, Tc.transpose(1, 2))
            self.S += T.sum(1)
        self.n += x_in.shape[0]

    def moments(self) -> HeadMoments:
        if not (torch.isfinite(self.M).all() and torch.isfinite(self.S).all()):
            raise NumericalError("NaN/Inf in slimllm head statistics; run with --dtype float32 or check the data")
        return HeadMoments(self.n, self.M, self.S)


class FFNObserver:
    """Pass B (attention already pruned): H moments with Gram, MLP-input energy, y moments."""

    taps = frozenset({"mlp", "down_proj"})
    summed = ("h", "y", "ex")

    def __init__(self) -> None:
        self.h: Moments | None = None  # down_proj input H: n, sx = ΣH, sxx_diag, xtx = HᵀH
        self.y: Moments | None = None  # down_proj output: sx, xtx
        self.ex: Tensor | None = None

    def update(self, tap: str, x_in: Tensor, y_out: Tensor) -> None:
        if tap == "mlp":
            e = energy(x_in)
            self.ex = e if self.ex is None else self.ex + e
            return
        if self.h is None:
            self.h = Moments(x_in.shape[1], device=x_in.device)
            self.y = Moments(y_out.shape[1], device=y_out.device)
        self.h.update(x_in)
        self.y.update(y_out)

    def y_cov(self) -> Tensor:
        return self.y.xtx - torch.outer(self.y.sx, self.y.sx) / self.y.n
