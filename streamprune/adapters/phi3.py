"""Adapter for Phi-3 and Phi-4 (``model_type: phi3``, transformers' ``Phi3ForCausalLM``).

The block is Llama's (pre-norm RMSNorms, SiLU-gated FFN, no biases, GQA with RoPE) except
that the checkpoint fuses two groups of projections:

- ``self_attn.qkv_proj.weight`` (H*hd + 2*G*hd, d): q rows, then k rows, then v rows;
- ``mlp.gate_up_proj.weight`` (2*f, d): gate rows, then up rows.

:meth:`Phi3Adapter.read_layer` splits them into the Llama names (``q_proj``, ``k_proj``,
``v_proj``, ``gate_proj``, ``up_proj``), so every method, observer tap and the output writer
see a Llama block; the pruned output is streamprune's own (split) format, and its
nemotron-nas export is a plain Llama-block export. A dense layer is transformers'
``LlamaDecoderLayer`` (built from the Phi-3 config's sizes, no biases); the rotary embedding
is transformers' ``Phi3RotaryEmbedding`` (default RoPE or ``longrope``/``su``, the 128k
variants; the pruned output's ``LlamaRotaryEmbedding`` computes the same from the carried
``rope_parameters``). Phi-3's residual dropouts are identity at eval. ``sliding_window``
(Phi-3-mini-4k: 2047) applies to every layer, as ``Phi3Model`` does (the Mistral path).

Refused: ``partial_rotary_factor`` other than 1 (Phi-4-mini: 0.75; RoPE on a part of each
head, which neither the Llama layer nor the pruned-model class computes).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from ..errors import UnsupportedArchitectureError
from .llama import LlamaFamilyAdapter, check_tensor_shapes

QKV = "self_attn.qkv_proj.weight"
GATE_UP = "mlp.gate_up_proj.weight"


class Phi3Adapter(LlamaFamilyAdapter):
    """A dense Phi-3 / Phi-4 checkpoint, read as Llama blocks."""

    model_types = ("phi3",)

    def _check_supported_options(self) -> None:
        super()._check_supported_options()
        rope = self.config.rope_parameters or {}
        factor = rope.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise UnsupportedArchitectureError(
                f"partial_rotary_factor={factor} (RoPE on only part of each head's dims, e.g. Phi-4-mini) is not supported "
                "for phi3 models; supported: 1.0 (Phi-3 mini/small-context/medium, Phi-4)")
        kind = rope.get("rope_type", "default")
        if kind not in ("default", "longrope"):  # Phi3Config itself refuses others
            raise UnsupportedArchitectureError(f"phi3 rope_type {kind!r} is not supported; supported: default, longrope")
        c = self.config
        self._llama = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=self._head_dim(), hidden_act=c.hidden_act,
            rms_norm_eps=c.rms_norm_eps, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            max_position_embeddings=c.max_position_embeddings, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        self._llama._attn_implementation = "sdpa"

    def _head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def _sizes(self) -> tuple[int, int, int]:
        """(query rows, key rows = value rows, FFN width) of a dense layer."""
        c, hd = self.config, self._head_dim()
        return c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size

    def checkpoint_layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        q, kv, f = self._sizes()
        d = self.config.hidden_size
        split = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")
        shapes = {k: v for k, v in super().checkpoint_layer_shapes(i).items() if k not in split}
        return {**shapes, QKV: (q + 2 * kv, d), GATE_UP: (2 * f, d)}

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors under the Llama names: q/k/v and gate/up split out of the fused ones."""
        tensors = self.read_stored_layer(i)
        check_tensor_shapes(self.checkpoint_layer_shapes(i), tensors, f"layer {i} of {self.reader.folder}")
        q, kv, f = self._sizes()
        # clones: each split tensor owns its storage (the writer saves them separately)
        qw, kw, vw = (t.clone() for t in tensors.pop(QKV).split([q, kv, kv], dim=0))
        gate, up = (t.clone() for t in tensors.pop(GATE_UP).split([f, f], dim=0))
        tensors.update({"self_attn.q_proj.weight": qw, "self_attn.k_proj.weight": kw, "self_attn.v_proj.weight": vw,
                        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
        return tensors

    def skeleton(self, i: int) -> nn.Module:
        """A dense layer: transformers' ``LlamaDecoderLayer`` with the Phi-3 sizes (on the meta device)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            return LlamaDecoderLayer(self._llama, layer_idx=i)

    def rotary(self, device) -> nn.Module:
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        return Phi3RotaryEmbedding(config=self.config).to(device)
