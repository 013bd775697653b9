"""Model-level shapes and parameter counting (the ratio contract), from config alone."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import LayerSpec


@dataclass(frozen=True)
class ModelShapes:
    """What every method and the preflight need to know about the dense model."""

    num_layers: int  # L
    hidden_size: int  # d
    intermediate_size: int  # f
    num_heads: int  # H
    num_kv_heads: int  # G
    head_dim: int  # h
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 2048
    qk_norm: str = "none"  # LayerSpec.qk_norm of the dense block
    norm_placement: str = "pre"  # LayerSpec.norm_placement of the dense block

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def dense_spec(self) -> LayerSpec:
        return LayerSpec.dense(
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            qk_norm=self.qk_norm,
            norm_placement=self.norm_placement,
        )

    def outer_params(self) -> int:
        """Embeddings + final norm + lm_head (counted once when tied)."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.hidden_size + (0 if self.tie_word_embeddings else emb)

    def total_params(self, specs: list[LayerSpec] | None = None) -> int:
        """Total parameter count of the model whose layers have ``specs`` (dense if None)."""
        if specs is None:
            return self.outer_params() + self.num_layers * self.dense_spec().num_params()
        if len(specs) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer specs, got {len(specs)}")
        return self.outer_params() + sum(s.num_params() for s in specs)

    def achieved_ratio(self, specs: list[LayerSpec]) -> float:
        """Fraction of the dense total parameter count removed."""
        return 1.0 - self.total_params(specs) / self.total_params()

    def proj_params(self) -> dict[str, int]:
        """Dense parameter count of each projection (weights only) of one layer."""
        spec = self.dense_spec()
        out = {}
        for p in ("q", "k", "v", "o", "gate", "up", "down"):
            m, n = spec.proj_shape(p)
            out[p] = m * n
        return out
