"""Pruned decoder LLM: a Llama-style model whose every layer has its own shapes.

SELF-CONTAINED: imports only ``torch``, ``transformers`` and its siblings
``configuration_streamprune.py`` and ``cache_compat_streamprune.py`` (the transformers-version
shims). All three files are copied into every output folder so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without
``streamprune`` installed; never import ``streamprune`` here.

Per-layer shapes come from ``config.layer_specs`` (see ``configuration_streamprune``).
Parameter names under ``model.layers.{i}.`` equal ``LayerSpec.tensor_shapes()`` exactly
(a test checks it).

KV cache and masks follow ``LlamaModel`` of the installed transformers (the 5.x ``Cache``
API: ``cache=`` / deprecated ``past_key_values=``, ``DynamicCache``, ``DummyLayer``; static
caches are not supported). Tested on transformers 5.24 and 5.17 (the GPU image's): before
5.23 ``DummyLayer`` is defined here, and the mask helpers' cache argument is
``past_key_values`` instead of ``cache``:

- Each layer caches its own keys (B, G_l, T, head_dim) and values (B, G_l, T, v_head_dim)
  in a ``DynamicCache`` (``DynamicLayer`` per layer, ``DynamicSlidingWindowLayer`` for a
  sliding-window layer). A layer whose attention was pruned away has nothing to cache: its
  cache slot is a ``DummyLayer`` (``Cache.get_seq_length()`` then reads the first layer
  that has attention). A model without any attention head runs without a cache.
- Masks come from ``transformers.masking_utils`` (``create_causal_mask``, and
  ``create_sliding_window_causal_mask`` for the layers where the source applies its
  ``sliding_window``: Mistral, Qwen2 with ``use_sliding_window``, Gemma 3's sliding layers), as in
  the source models.
- Attention is SDPA (``transformers.integrations.sdpa_attention``); a value head dim
  smaller than the query/key head dim is zero-padded for prefill only (fused kernels
  want equal head dims), never in the cache.
- With a 2-D ``attention_mask`` and no ``position_ids``, positions are
  ``cumsum(mask) - 1`` (the same as ``generate`` passes), so a left-padded row sees the
  same RoPE positions as unpadded; without a mask, ``arange + past length``.
  ``cache_position`` is not used (transformers 5 models derive it from the cache).
- The decoder layer called standalone (the streaming engine: ``attention_mask=None``,
  no cache) is plain causal attention over its input.
- Block kinds (per layer spec): ``norm_placement`` "pre" (Llama, Qwen2/3, Mistral:
  ``h = x + attn(norm(x)); h + mlp(norm(h))``), "post" (OLMo 2:
  ``h = x + norm(attn(x)); h + norm(mlp(h))``) or "sandwich" (Gemma 3:
  ``h = x + norm(attn(norm(x))); h + norm(mlp(norm(h)))``); ``qk_norm`` "head" (Qwen3, Gemma 3:
  RMSNorm over each head's dims, one weight shared by all heads) or "proj" (OLMo 2: over the
  whole q and the whole k projection), applied to the (possibly low-rank) projection's output,
  before RoPE.
- Model-wide (Gemma 3): RMSNorms that scale by ``1 + weight`` in float32
  (``norm_weight_offset``), the embedding scaled by ``embed_scale``, attention scores by
  ``query_pre_attn_scalar ** -0.5``, and a RoPE per layer type (:class:`RotaryByLayerType`).
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from .cache_compat_streamprune import _CACHE_FIELD, _MASK_CACHE_ARG, DummyLayer, _cache_argument, link_lengths
from .configuration_streamprune import StreamPruneConfig, layer_spec_dict, rope_layer_types  # noqa: F401  (re-exported)


class LowRankLinear(nn.Module):
    """``up(down(x))``: a rank-``rank`` factorisation of ``nn.Linear(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # weight (r, in)
        self.up = nn.Linear(rank, out_features, bias=bias)  # weight (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class BiasOnly(nn.Module):
    """A projection whose input side was pruned away entirely: outputs its ``bias`` (d,)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand(*x.shape[:-1], self.out_features)


def _projection(in_features: int, out_features: int, rank: int | None, bias: bool) -> nn.Module:
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return LowRankLinear(in_features, out_features, rank, bias=bias)


class StreamPruneRMSNorm(nn.Module):
    """RMSNorm: normalise in fp32, cast back, scale (Llama/Qwen/Mistral); with
    ``scale_in_fp32``, scale in fp32, then cast back (OLMo 2); with a ``weight_offset``, scale
    by ``weight_offset + weight`` in fp32, then cast back (Gemma 3: offset 1)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, scale_in_fp32: bool = False, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.scale_in_fp32 = scale_in_fp32
        self.weight_offset = weight_offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.weight_offset:
            return ((self.weight_offset + self.weight.float()) * h).to(input_dtype)
        if self.scale_in_fp32:
            return (self.weight * h).to(input_dtype)
        return self.weight * h.to(input_dtype)


def _rms_norm(config, size: int) -> StreamPruneRMSNorm:
    return StreamPruneRMSNorm(size, eps=config.rms_norm_eps, scale_in_fp32=bool(getattr(config, "norm_scale_in_fp32", False)),
                              weight_offset=float(getattr(config, "norm_weight_offset", 0.0) or 0.0))


class ScaledEmbedding(nn.Embedding):
    """Token embedding whose rows are multiplied by ``embed_scale`` in the weight's dtype (Gemma 3:
    sqrt(hidden_size)); the weight itself is unscaled (it is the tied head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.embed_scale, dtype=self.weight.dtype, device=self.weight.device)


def _rope_config(config, layer_type: str) -> LlamaConfig:
    """A config whose one ``rope_parameters`` dict is ``layer_type``'s (what ``LlamaRotaryEmbedding`` reads)."""
    return LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads, head_dim=config.head_dim,
                       max_position_embeddings=config.max_position_embeddings,
                       rope_parameters=copy.deepcopy(config.rope_parameters[layer_type]))


class RotaryByLayerType(nn.Module):
    """One rotary embedding per layer type, where the RoPE differs by type (Gemma 3: the local
    base for sliding layers, the global base with its scaling for full ones).

    ``forward(x, position_ids)`` returns the (cos, sin) of every type in :attr:`layer_types`
    order, flattened: ``(cos_0, sin_0, cos_1, sin_1, ...)``; a layer of type ``layer_types[k]``
    takes ``[2k : 2k + 2]`` (:meth:`pair`)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.layer_types = rope_layer_types(config)
        self.rotary = nn.ModuleDict({t: LlamaRotaryEmbedding(config=_rope_config(config, t)) for t in self.layer_types})

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for kind in self.layer_types for t in self.rotary[kind](x, position_ids))

    def pair(self, position_embeddings: tuple, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.layer_types.index(layer_type)
        return position_embeddings[2 * k], position_embeddings[2 * k + 1]


class StreamPruneAttention(nn.Module):
    """GQA attention with per-layer shapes; 0 heads = the block outputs zeros (+ o bias)."""

    is_causal = True  # read by sdpa_attention_forward

    def __init__(self, config: StreamPruneConfig, spec, layer_idx: int | None = None) -> None:
        super().__init__()
        s = layer_spec_dict(spec)
        d = s["hidden_size"]
        self.layer_idx = layer_idx
        self.hidden_size = d
        self.num_kv_heads = s["num_kv_heads"]
        self.heads_per_group = s["heads_per_group"]
        self.num_key_value_groups = self.heads_per_group  # the name sdpa_attention_forward reads
        self.num_heads = self.num_kv_heads * self.heads_per_group
        self.head_dim = s["head_dim"]
        self.v_head_dim = s["v_head_dim"]
        self.scaling = 1.0 / math.sqrt(self.head_dim) if self.head_dim else 1.0
        if getattr(config, "query_pre_attn_scalar", None):  # Gemma 3
            self.scaling = config.query_pre_attn_scalar ** -0.5
        self.sliding_window = config.layer_window(layer_idx) if hasattr(config, "layer_window") else None
        if self.num_heads == 0:
            self.o_proj = BiasOnly(d) if s["o_bias"] else None
            return
        h, g = self.num_heads, self.num_kv_heads
        self.q_proj = _projection(d, h * self.head_dim, s["q_rank"], s["qkv_bias"])
        self.k_proj = _projection(d, g * self.head_dim, s["k_rank"], s["qkv_bias"])
        self.v_proj = _projection(d, g * self.v_head_dim, s["v_rank"], s["qkv_bias"])
        self.o_proj = _projection(h * self.v_head_dim, d, s["o_rank"], s["o_bias"])
        self.qk_norm = s["qk_norm"]
        if self.qk_norm != "none":  # "head": over head_dim, shared by the heads; "proj": over the whole projection
            per_head = self.qk_norm == "head"
            self.q_norm = _rms_norm(config, self.head_dim if per_head else h * self.head_dim)
            self.k_norm = _rms_norm(config, self.head_dim if per_head else g * self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d).

        ``attention_mask``: None (causal over the keys, no padding) or a 4-D mask from
        ``transformers.masking_utils`` (bool keep-mask or additive float), (B, 1, T, kv).
        ``cache``: this layer's keys/values are appended to ``cache.layers[layer_idx]``.
        """
        if self.num_heads == 0:  # nothing to attend with, nothing to cache
            if self.o_proj is None:
                return torch.zeros_like(hidden_states)
            return self.o_proj(hidden_states)
        bsz, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states)  # (B, T, H*hd)
        k = self.k_proj(hidden_states)  # (B, T, G*hd)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, seq_len, self.num_heads, self.head_dim)
        k = k.view(bsz, seq_len, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, G, T, hd)
        v = self.v_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # (B, H, T, hd), (B, G, T, hd)
        if cache is not None:  # (B, G, past + T, hd), (B, G, past + T, v_hd)
            k, v = cache.update(k, v, self.layer_idx)
        pad = self.head_dim - self.v_head_dim
        if pad > 0 and seq_len > 1:  # fused SDPA kernels want equal head dims (6.7x at T 2048 on CPU)
            v = F.pad(v, (0, pad))  # zero value dims produce zero outputs, sliced off below
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)  # (B, T, H, v_hd[+pad])
        out = out[..., : self.v_head_dim].reshape(bsz, seq_len, self.num_heads * self.v_head_dim)
        return self.o_proj(out)


class StreamPruneMLP(nn.Module):
    """``down(act(gate(x)) * up(x)) + bypass(x)``; width 0 keeps only down bias / bypass."""

    def __init__(self, config: StreamPruneConfig, spec) -> None:
        super().__init__()
        s = layer_spec_dict(spec)
        d, f = s["hidden_size"], s["intermediate_size"]
        self.hidden_size, self.intermediate_size = d, f
        if f:
            self.gate_proj = nn.Linear(d, f, bias=False)
            self.up_proj = nn.Linear(d, f, bias=False)
            self.down_proj = nn.Linear(f, d, bias=s["down_bias"])
            self.act_fn = ACT2FN[config.hidden_act]
        else:
            self.down_proj = BiasOnly(d) if s["down_bias"] else None
        r = s["bypass_rank"]
        self.bypass = LowRankLinear(d, d, r, bias=False) if r else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intermediate_size:
            out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        elif self.down_proj is not None:
            out = self.down_proj(x)
        else:
            out = torch.zeros_like(x)
        if self.bypass is not None:
            out = out + self.bypass(x)
        return out


class StreamPruneDecoderLayer(nn.Module):
    """Residual block with pre-, post- or sandwich norms (``norm_placement``). Usable standalone
    (the streaming engine builds one at a time)."""

    def __init__(self, config: StreamPruneConfig, spec, layer_idx: int | None = None) -> None:
        super().__init__()
        s = layer_spec_dict(spec)
        d = s["hidden_size"]
        self.layer_idx = layer_idx
        self.placement = s["norm_placement"]
        self.post_norms = self.placement == "post"
        if self.placement in ("pre", "sandwich"):
            self.input_layernorm = _rms_norm(config, d)
        self.self_attn = StreamPruneAttention(config, s, layer_idx)
        self.post_attention_layernorm = _rms_norm(config, d)  # "pre": the MLP's input norm; else the attention output's
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = _rms_norm(config, d)
        self.mlp = StreamPruneMLP(config, s)
        if self.placement in ("post", "sandwich"):
            self.post_feedforward_layernorm = _rms_norm(config, d)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); ``position_embeddings`` = (cos, sin) from the rotary module."""
        if self.post_norms:
            h = hidden_states + self.post_attention_layernorm(self.self_attn(hidden_states, position_embeddings, attention_mask, cache))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        if self.placement == "sandwich":
            attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
            h = hidden_states + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
        h = hidden_states + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class StreamPrunePreTrainedModel(PreTrainedModel):
    config: StreamPruneConfig
    config_class = StreamPruneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["StreamPruneDecoderLayer"]
    _supports_sdpa = True  # attention is always SDPA; accept attn_implementation="sdpa"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BiasOnly):
            # torch.nn.init is guarded by transformers during init: loaded values are kept.
            torch.nn.init.zeros_(module.bias)


class StreamPruneModel(StreamPrunePreTrainedModel):
    """Embeddings, per-spec decoder layers, final norm, rotary embedding."""

    def __init__(self, config: StreamPruneConfig) -> None:
        super().__init__(config)
        config.check_layer_specs()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        if getattr(config, "embed_scale", None) is not None:
            self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx, config.embed_scale)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [StreamPruneDecoderLayer(config, config.get_layer_spec(i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = _rms_norm(config, config.hidden_size)
        if rope_layer_types(config) is not None:
            self.rotary_emb = RotaryByLayerType(config)
        else:
            self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    @property
    def has_attention(self) -> bool:
        """Whether any layer kept an attention head (else there is nothing to cache)."""
        return any(layer.self_attn.num_heads for layer in self.layers)

    def _cache_layer_kind(self, i: int) -> tuple[type, dict]:
        """The cache-layer class (and its arguments) that fits decoder layer ``i``."""
        attn = self.layers[i].self_attn
        if attn.num_heads == 0:
            return DummyLayer, {}
        if attn.sliding_window is not None:
            return DynamicSlidingWindowLayer, {"sliding_window": attn.sliding_window}
        return DynamicLayer, {}

    def fit_cache(self, cache: Cache) -> None:
        """Give a ``DynamicCache`` one layer per decoder layer, of the kind that layer needs.

        Slots of layers without attention become ``DummyLayer`` (whatever they held: those
        layers store nothing); empty slots of another kind (a ``DynamicCache()`` built
        without this config) are replaced by the right kind. Other caches are left as is.
        """
        if not isinstance(cache, DynamicCache):
            return
        for i in range(len(self.layers)):
            cls, kwargs = self._cache_layer_kind(i)
            if i == len(cache.layers):
                cache.layers.append(cls(**kwargs))
                continue
            have = cache.layers[i]
            if type(have) is not cls and (cls is DummyLayer or have.get_seq_length() == 0):
                cache.layers[i] = cls(**kwargs)
        link_lengths(cache)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``attention_mask``: 2-D (B, past + T) 1/0 padding mask, or None. ``cache``: a
        ``Cache`` to extend (``past_key_values=`` is accepted too); with ``use_cache`` (default
        ``config.use_cache``) and no cache, a new ``DynamicCache`` is made and returned."""
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not self.has_attention:
            cache = None  # no layer attends to the past: nothing to cache
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
        mask_args = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )
        kinds = set(self.config.layer_types)
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_causal_mask(**mask_args)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        by_type = isinstance(self.rotary_emb, RotaryByLayerType)
        all_hidden = [] if output_hidden_states else None
        for layer, kind in zip(self.layers, self.config.layer_types):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            pe = self.rotary_emb.pair(position_embeddings, kind) if by_type else position_embeddings
            hidden_states = layer(hidden_states, pe, masks[kind], cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: cache},
        )


class StreamPruneForCausalLM(StreamPrunePreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`StreamPruneModel`; ``generate`` uses a ``DynamicCache``."""

    # transformers 5: {target: source}; applied only when config.tie_word_embeddings.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: StreamPruneConfig) -> None:
        super().__init__(config)
        self.model = StreamPruneModel(config)
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) (only the last ``logits_to_keep`` positions when > 0, as
        ``generate`` asks); with ``labels``, loss = mean next-token cross-entropy (labels
        shifted left by one inside, -100 ignored). Cache arguments: see :class:`StreamPruneModel`."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            cache=_cache_argument(cache, kwargs),
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V) fp32
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; with a ``DynamicCache`` unless ``use_cache=False``
        (or the model kept no attention head: then each step re-runs the prefix, which
        costs no attention)."""
        if not self.model.has_attention:
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


__all__ = [
    "BiasOnly",
    "LowRankLinear",
    "RotaryByLayerType",
    "ScaledEmbedding",
    "StreamPruneAttention",
    "StreamPruneConfig",
    "StreamPruneDecoderLayer",
    "StreamPruneForCausalLM",
    "StreamPruneMLP",
    "StreamPruneModel",
    "StreamPrunePreTrainedModel",
    "StreamPruneRMSNorm",
    "layer_spec_dict",
]
