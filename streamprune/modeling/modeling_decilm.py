"""Nemotron-NAS / DeciLM decoder LLM for ``transformers`` (``DeciLMForCausalLM``).

SELF-CONTAINED: imports only ``torch``, ``transformers`` and its siblings
``configuration_decilm.py`` and ``cache_compat_streamprune.py`` (the transformers-version
shims), which travel with it into every nemotron-nas folder streamprune writes, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without
streamprune installed; never import ``streamprune`` here. Written for streamprune (not
NVIDIA's file), in the structure of vLLM's ``nemotron_nas.py``:

- Layer ``i`` reads ``config.block_configs[i]``. Attention kept: ``input_layernorm`` +
  ``self_attn`` (``num_attention_heads`` query heads, ``heads // n_heads_in_group`` KV
  heads, q/k/v/o biased when ``attention_bias``). FFN kept: ``post_attention_layernorm`` +
  ``mlp`` (width from ``ffn_mult``). A no-op sub-block has no module, no norm, no tensor.
- KV cache (the approach of ``modeling_streamprune.py``): each attention layer caches its
  own KV heads in a ``DynamicCache`` ``DynamicLayer``; a layer without attention gets a
  ``DummyLayer`` slot and caches nothing. Masks from ``transformers.masking_utils``;
  attention through ``ALL_ATTENTION_FUNCTIONS`` (SDPA by default) or Llama's eager.
- With a 2-D ``attention_mask`` and no ``position_ids``, positions are
  ``cumsum(mask) - 1`` (left padding sees the unpadded positions), else
  ``arange + past length``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .cache_compat_streamprune import _CACHE_FIELD, _MASK_CACHE_ARG, DummyLayer, _cache_argument, link_lengths
from .configuration_decilm import DeciLMConfig


class DeciLMAttention(nn.Module):
    """GQA attention with this layer's KV head count."""

    is_causal = True  # read by the attention functions

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        s = config.layer_shapes(layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = s["num_heads"], s["num_kv_heads"], s["head_dim"]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # the name the attention functions read
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = 0.0
        d, bias = config.hidden_size, bool(config.attention_bias)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); ``attention_mask`` a 4-D mask from masking_utils or None."""
        bsz, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = self.v_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:  # (B, G, past + T, hd)
            k, v = cache.update(k, v, self.layer_idx)
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)  # (B, T, H, hd)
        return self.o_proj(out.reshape(bsz, seq_len, self.num_heads * self.head_dim))


class DeciLMMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` of this layer's width."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.layer_shapes(layer_idx)["intermediate_size"], bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm residual block whose attention and FFN are each present or absent (no-op)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        s = config.layer_shapes(layer_idx)
        self.layer_idx = layer_idx
        self.has_attention = s["num_heads"] > 0
        self.has_mlp = s["intermediate_size"] > 0
        if self.has_attention:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, layer_idx)
        if self.has_mlp:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, layer_idx)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d). Standalone (the streaming evaluator): ``attention_mask=None``
        and no cache = plain causal attention over the input."""
        if self.has_attention:
            hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config: DeciLMConfig
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class DeciLMModel(DeciLMPreTrainedModel):
    """Embeddings, per-block decoder layers, final norm, rotary embedding."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        if len(config.block_configs) != config.num_hidden_layers:
            raise ValueError(f"config has {len(config.block_configs)} block_configs but num_hidden_layers {config.num_hidden_layers}")
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    @property
    def has_attention(self) -> bool:
        return any(layer.has_attention for layer in self.layers)

    def fit_cache(self, cache: Cache) -> None:
        """One ``DynamicCache`` slot per layer: ``DummyLayer`` where the layer has no
        attention, ``DynamicLayer`` where an empty slot of another kind sits. Other caches
        are left as they are."""
        if not isinstance(cache, DynamicCache):
            return
        for i, layer in enumerate(self.layers):
            cls = DynamicLayer if layer.has_attention else DummyLayer
            if i == len(cache.layers):
                cache.layers.append(cls())
            elif type(cache.layers[i]) is not cls and (cls is DummyLayer or cache.layers[i].get_seq_length() == 0):
                cache.layers[i] = cls()
        link_lengths(cache)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, output_hidden_states=None,
                cache: Cache | None = None, use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``attention_mask``: 2-D (B, past + T) 1/0 padding mask or None. ``cache`` (or the
        deprecated ``past_key_values``): a ``Cache`` to extend; with ``use_cache`` and none,
        a new ``DynamicCache`` is made and returned."""
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not self.has_attention:
            cache = None
        elif use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            self.fit_cache(cache)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # (B, T)
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device)[None]  # (1, T)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE_ARG: cache})
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, mask, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                                       **{_CACHE_FIELD: cache})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`DeciLMModel`; ``generate`` uses a ``DynamicCache``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # applied when tie_word_embeddings

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, inputs_embeds=None, output_hidden_states=None,
                cache: Cache | None = None, use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) (the last ``logits_to_keep`` positions when > 0); with
        ``labels``, loss = mean next-token cross-entropy (shifted inside, -100 ignored)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, cache=_cache_argument(cache, kwargs), use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V) fp32
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate`` with a ``DynamicCache`` (none when no layer attends)."""
        if not self.model.has_attention:
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


__all__ = ["DeciLMAttention", "DeciLMConfig", "DeciLMDecoderLayer", "DeciLMForCausalLM", "DeciLMMLP", "DeciLMModel", "DeciLMPreTrainedModel"]
