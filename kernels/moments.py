"""Moment accumulation: Σx², XᵀX, XᵀY, column sums, always in fp32.

Activations arrive as (tokens, d) matrices in bf16/fp16/fp32. Every kernel here walks the
rows in blocks of ``block_rows``, casts *one block* to fp32 and accumulates into fp32
buffers, so an fp32 copy of the whole activation matrix is never formed (peak extra memory
is ``block_rows × d`` fp32 per operand). Inputs with more than two dimensions are read as
(tokens, d) by flattening the leading ones (``(N, T, d)`` hidden states work as is).

The blocks are visited in a fixed order, so results are deterministic on a given device.
On CUDA the fp32 matmuls follow the caller's ``torch.backends.cuda.matmul.allow_tf32``
setting; nothing here changes global torch state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from streamprune.errors import NumericalError

__all__ = ["energy", "colsum", "gram", "cross", "Moments"]

DEFAULT_BLOCK_ROWS = 4096


def _as_rows(x: Tensor, name: str) -> Tensor:
    """View ``x`` as (tokens, d); refuse non-float or 0/1-D input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be (tokens, d) or (..., d), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])  # a view when x is contiguous


def _check_block_rows(block_rows: int) -> None:
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")


def _fp32_blocks(x: Tensor, block_rows: int) -> Iterator[Tensor]:
    """Yield consecutive row blocks of a (tokens, d) tensor, each cast to fp32."""
    for start in range(0, x.shape[0], block_rows):
        yield x[start : start + block_rows].to(torch.float32)  # (≤block_rows, d) fp32


def energy(x: Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
    """Per-column energy ``Σ_rows x²`` of ``x`` (tokens, d) → (d,) fp32."""
    _check_block_rows(block_rows)
    x = _as_rows(x, "x")
    out = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for b in _fp32_blocks(x, block_rows):
        out += b.square().sum(dim=0)
    return out


def colsum(x: Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
    """Per-column sum ``Σ_rows x`` of ``x`` (tokens, d) → (d,) fp32."""
    _check_block_rows(block_rows)
    x = _as_rows(x, "x")
    out = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for b in _fp32_blocks(x, block_rows):
        out += b.sum(dim=0)
    return out


def gram(x: Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
    """Gram matrix ``xᵀx`` of ``x`` (tokens, d) → (d, d) fp32."""
    _check_block_rows(block_rows)
    x = _as_rows(x, "x")
    d = x.shape[1]
    out = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    for b in _fp32_blocks(x, block_rows):
        out.addmm_(b.T, b)
    return out


def cross(x: Tensor, y: Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
    """Cross moment ``xᵀy`` of ``x`` (tokens, dx) and ``y`` (tokens, dy) → (dx, dy) fp32."""
    _check_block_rows(block_rows)
    x = _as_rows(x, "x")
    y = _as_rows(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], block_rows):
        bx = x[start : start + block_rows].to(torch.float32)  # (rows, dx) fp32
        by = y[start : start + block_rows].to(torch.float32)  # (rows, dy) fp32
        out.addmm_(bx.T, by)
    return out


@dataclass
class Moments:
    """Running fp32 moments of an input ``x`` (and optionally an output ``y``), chunk by chunk.

    The only stateful object in ``streamprune.kernels``: feed it calibration chunks with
    :meth:`update` (one pass over each chunk computes every moment) and read the buffers.

    Buffers (fp32, on ``device``; ``None`` when not requested):
      ``n`` rows seen (int); ``sx`` (dx,) Σx; ``sxx_diag`` (dx,) Σx²; ``xtx`` (dx, dx) XᵀX
      (if ``want_gram``); with ``dim_y``: ``sy`` (dy,) Σy; ``syy_diag`` (dy,) Σy²;
      ``xty`` (dx, dy) XᵀY (if ``want_cross``).
    """

    dim_x: int
    dim_y: int | None = None
    device: torch.device | str = "cpu"
    want_cross: bool = True
    want_gram: bool = True
    block_rows: int = DEFAULT_BLOCK_ROWS
    # Sums over rows (all-reduced across ranks by streamprune.distributed); the rest is config.
    summed: ClassVar[tuple[str, ...]] = ("n", "sx", "sxx_diag", "xtx", "sy", "syy_diag", "xty")
    n: int = field(default=0, init=False)
    sx: Tensor = field(init=False, repr=False)
    sxx_diag: Tensor = field(init=False, repr=False)
    xtx: Tensor | None = field(default=None, init=False, repr=False)
    sy: Tensor | None = field(default=None, init=False, repr=False)
    syy_diag: Tensor | None = field(default=None, init=False, repr=False)
    xty: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dim_x < 1 or (self.dim_y is not None and self.dim_y < 1):
            raise ValueError(f"Moments dims must be >= 1, got dim_x={self.dim_x}, dim_y={self.dim_y}")
        _check_block_rows(self.block_rows)
        self.device = torch.device(self.device)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.sx = torch.zeros(self.dim_x, **f32)
        self.sxx_diag = torch.zeros(self.dim_x, **f32)
        if self.want_gram:
            self.xtx = torch.zeros(self.dim_x, self.dim_x, **f32)
        if self.dim_y is not None:
            self.sy = torch.zeros(self.dim_y, **f32)
            self.syy_diag = torch.zeros(self.dim_y, **f32)
            if self.want_cross:
                self.xty = torch.zeros(self.dim_x, self.dim_y, **f32)

    def update(self, x: Tensor, y: Tensor | None = None) -> None:
        """Accumulate one chunk: ``x`` (rows, dim_x) and, iff ``dim_y`` is set, ``y`` (rows, dim_y)."""
        x = _as_rows(x, "x")
        if x.shape[1] != self.dim_x:
            raise ValueError(f"x has {x.shape[1]} columns, Moments expects dim_x={self.dim_x}")
        if (y is None) != (self.dim_y is None):
            raise ValueError(
                "Moments(dim_y=...) needs y on every update and Moments without dim_y takes no y; "
                f"got dim_y={self.dim_y}, y={'None' if y is None else tuple(y.shape)}"
            )
        if y is not None:
            y = _as_rows(y, "y")
            if y.shape != (x.shape[0], self.dim_y):
                raise ValueError(f"y must be ({x.shape[0]}, {self.dim_y}) to match x, got {tuple(y.shape)}")
        for start in range(0, x.shape[0], self.block_rows):
            bx = x[start : start + self.block_rows].to(torch.float32)  # (rows, dx) fp32
            self.sx += bx.sum(dim=0)
            self.sxx_diag += bx.square().sum(dim=0)
            if self.xtx is not None:
                self.xtx.addmm_(bx.T, bx)
            if y is not None:
                by = y[start : start + self.block_rows].to(torch.float32)  # (rows, dy) fp32
                self.sy += by.sum(dim=0)
                self.syy_diag += by.square().sum(dim=0)
                if self.xty is not None:
                    self.xty.addmm_(bx.T, by)
        self.n += int(x.shape[0])

    def merge(self, other: Moments) -> Moments:
        """Add ``other``'s moments into this one (same dims and options); returns ``self``."""
        same = (self.dim_x, self.dim_y, self.xtx is None, self.xty is None) == (
            other.dim_x, other.dim_y, other.xtx is None, other.xty is None,
        )
        if not same:
            raise ValueError(f"cannot merge Moments with different dims/options: {self} vs {other}")
        for name in ("sx", "sxx_diag", "xtx", "sy", "syy_diag", "xty"):
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name).to(mine.device)
        self.n += other.n
        return self

    def check_finite(self, what: str = "statistics") -> None:
        """Raise :class:`NumericalError` if any buffer holds NaN/Inf (one device sync)."""
        bad = [
            name
            for name in ("sx", "sxx_diag", "xtx", "sy", "syy_diag", "xty")
            if getattr(self, name) is not None and not bool(torch.isfinite(getattr(self, name)).all())
        ]
        if bad:
            raise NumericalError(
                f"NaN/Inf in {what} ({', '.join(bad)}) after {self.n} rows; the activations overflowed "
                "or the model produced NaNs. Run in a wider dtype (--dtype float32 / bfloat16) or check "
                "the calibration data."
            )
