"""Adapters for Gemma 3: text models (``model_type: gemma3_text``, transformers' ``Gemma3ForCausalLM``:
Gemma 3 270M / 1B) and the text decoder of image-text checkpoints (``model_type: gemma3``,
``Gemma3ForConditionalGeneration``: Gemma 3 4B / 12B / 27B), pruned into a text-only model.

The block is Llama's (GQA with RoPE, a gated FFN, no biases) with different norms and a few
model-wide constants, all of which the pruned model carries (``streamprune/modeling``):

- sandwich norms (``LayerSpec.norm_placement = "sandwich"``): ``input_layernorm`` before the
  attention and ``post_attention_layernorm`` on its output, ``pre_feedforward_layernorm`` before
  the FFN and ``post_feedforward_layernorm`` on its output, each output norm before the residual
  add; per-head q/k RMSNorms before RoPE (``qk_norm = "head"``, as Qwen3); every RMSNorm scales
  by ``1 + weight`` in float32 (``norm_weight_offset``, ``norm_scale_in_fp32``);
- a GeGLU FFN (``hidden_activation``: gelu_pytorch_tanh, carried as ``hidden_act``), attention
  scores scaled by ``query_pre_attn_scalar ** -0.5``, ``head_dim`` independent of hidden / heads;
- the embedding's rows multiplied by sqrt(hidden_size) in the weight's dtype (``embed_scale``;
  the engine's embedding step applies it, the tied head uses the weight unscaled);
- sliding-window and full-attention layers (``layer_types``; the engine passes the window's mask
  when the sequence is longer than ``sliding_window``), each type with its own RoPE
  (``rope_parameters`` per layer type: the local base for sliding layers, the global base with
  its scaling, e.g. linear x8, for full ones).

A dense layer is transformers' ``Gemma3DecoderLayer``; the rotary is transformers'
``Gemma3RotaryEmbedding`` behind :class:`LayerTypeRotary` (the engine's calling convention: every
type's (cos, sin) at once, each layer taking its own pair). The observers' ``o_proj`` and ``mlp``
taps read the attention and FFN outputs after their post-norms (``POST_NORM_TAPS``, as OLMo 2),
where they meet the residual; the FFN tap's input is the FFN's own (after its pre-norm).

An image-text checkpoint (:class:`Gemma3ImageTextAdapter`) stores its decoder as
``language_model.model.layers.{i}.*`` (with ``language_model.model.embed_tokens`` and
``language_model.model.norm``) next to ``vision_tower.*`` and ``multi_modal_projector.*``, and
its decoder's config as ``text_config``: the adapter reads only the decoder, under the text
model's names, so the output is a text-only model (the vision tower and projector are left out
and not counted in the ratio).

Refused in one line: ``attn_logit_softcapping`` (Gemma 2: SDPA has no score soft-capping),
``final_logit_softcapping`` (Gemma 2: the streamed evaluation and the search's head have no
logit soft-capping) and ``use_bidirectional_attention`` (EmbeddingGemma: not a causal LM).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..modeling.configuration_streamprune import rope_layer_types, source_attention_window
from .llama import EMBED, HEAD, NORM, Block, LlamaFamilyAdapter


class LayerTypeRotary(nn.Module):
    """``Gemma3RotaryEmbedding`` called the engine's way: ``(x, position_ids)`` -> the (cos, sin) of
    every layer type in ``layer_types`` order, flattened (``adapters/llama.py``, position embeddings)."""

    def __init__(self, inner: nn.Module, layer_types: tuple[str, ...]):
        super().__init__()
        self.inner = inner
        self.layer_types = layer_types

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for kind in self.layer_types for t in self.inner(x, position_ids, kind))


class Gemma3Adapter(LlamaFamilyAdapter):
    """A dense Gemma 3 text checkpoint (transformers' own decoder layer and rotary)."""

    model_types = ("gemma3_text",)
    block = Block(qk_norm="head", norm_placement="sandwich", norm_scale_in_fp32=True, norm_weight_offset=1.0)

    def _load_config(self):
        """transformers' ``Gemma3TextConfig`` plus the model-wide fields the pruned model reads
        (``StreamPruneConfig.from_source`` carries them)."""
        cfg = self._text_config(super()._load_config())
        cfg._attn_implementation = "sdpa"
        cfg.hidden_act = cfg.hidden_activation
        cfg.embed_scale = cfg.hidden_size ** 0.5  # Gemma3TextModel's Gemma3TextScaledWordEmbedding
        cfg.norm_weight_offset = 1.0  # Gemma3RMSNorm: (1 + weight) in float32
        cfg.norm_scale_in_fp32 = True
        return cfg

    def _text_config(self, cfg):
        """The decoder's config within the parsed config.json."""
        return cfg

    def _check_supported_options(self) -> None:
        super()._check_supported_options()
        c = self.config
        for name, why in (("attn_logit_softcapping", "SDPA attention has no score soft-capping"),
                          ("final_logit_softcapping", "the streamed evaluation and the search's head have no logit soft-capping")):
            if getattr(c, name, None) is not None:
                raise UnsupportedArchitectureError(f"{name}={getattr(c, name)} (Gemma 2 style) is not supported for {self.model_type} models "
                                                   f"({why}); supported: null, as in Gemma 3")
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError("use_bidirectional_attention=True (EmbeddingGemma: an encoder, not a causal LM) is not "
                                               "supported; supported: false, as in Gemma 3")
        try:
            source_attention_window(c)
        except ValueError as e:
            raise UnsupportedArchitectureError(f"{self.model_type} {e}") from e

    def skeleton(self, i: int) -> nn.Module:
        """A dense layer: transformers' ``Gemma3DecoderLayer`` (on the meta device)."""
        from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

        with torch.device("meta"):
            return Gemma3DecoderLayer(self.config, layer_idx=i)

    def rotary(self, device) -> nn.Module:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        return LayerTypeRotary(Gemma3RotaryEmbedding(config=self.config), rope_layer_types(self.config)).to(device)


class Gemma3ImageTextAdapter(Gemma3Adapter):
    """The text decoder of a Gemma 3 image-text checkpoint (``model_type: gemma3``), read under the text model's names."""

    model_types = ("gemma3",)
    layers_prefix = "language_model.model.layers."
    outer_names = {EMBED: "language_model.model.embed_tokens.weight", NORM: "language_model.model.norm.weight",
                   HEAD: "language_model.lm_head.weight"}

    def _config_values(self) -> dict:
        """``text_config`` over ``Gemma3TextConfig``'s defaults (the Hub's image-text configs list only
        what differs from them), as transformers parses it."""
        from transformers import Gemma3TextConfig

        return {**Gemma3TextConfig().to_dict(), **(self.reader.config_dict.get("text_config") or {})}

    def _text_config(self, cfg):
        return cfg.text_config
