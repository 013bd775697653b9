"""Pruned decoder LLM: a Llama-style model whose every layer has its own shapes.

SELF-CONTAINED: imports only ``torch``, ``transformers`` and its sibling
``configuration_streamprune.py``. Both files are copied into every output folder so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without
``streamprune`` installed; never import ``streamprune`` here.

Per-layer shapes come from ``config.layer_specs`` (see ``configuration_streamprune``).
Parameter names under ``model.layers.{i}.`` equal ``LayerSpec.tensor_shapes()`` exactly
(a test checks it).

Differences from the source architecture, on purpose:

- No KV cache. ``generate`` always runs with ``use_cache=False`` (each step re-runs the
  whole prefix): fine for evaluation and short samples, slow for long generations.
- Attention is always ``torch.nn.functional.scaled_dot_product_attention`` with a causal
  (+ padding) mask over the full sequence; a source's sliding window (Mistral v0.1,
  Qwen2 with ``use_sliding_window``) is not applied.
- With a 2-D ``attention_mask`` and no ``position_ids``, positions are
  ``cumsum(mask) - 1``, so a left-padded row sees the same RoPE positions as unpadded.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from .configuration_streamprune import StreamPruneConfig, layer_spec_dict  # noqa: F401  (re-exported)


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
    """Llama/Qwen2/Mistral RMSNorm: normalise in fp32, cast back, scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


def build_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """2-D padding mask (batch, seq) of 1/0 -> bool keep-mask (batch, 1, seq, seq), or None.

    None (or a mask without zeros) means plain causal attention. The diagonal is always
    kept so that a padding query attends to itself instead of to nothing (SDPA returns NaN
    for an all-masked row); real queries never see padding keys.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:  # already built
        return attention_mask.bool()
    if attention_mask.shape[-1] != seq_len:
        raise ValueError(f"attention_mask has length {attention_mask.shape[-1]}, inputs have {seq_len}")
    key_keep = attention_mask.bool()  # (B, T)
    if bool(key_keep.all()):
        return None
    device = attention_mask.device
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # (T, T)
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    return (causal & key_keep[:, None, None, :]) | eye  # (B, 1, T, T)


class StreamPruneAttention(nn.Module):
    """GQA attention with per-layer shapes; 0 heads = the block outputs zeros (+ o bias)."""

    def __init__(self, config: StreamPruneConfig, spec, layer_idx: int | None = None) -> None:
        super().__init__()
        s = layer_spec_dict(spec)
        d = s["hidden_size"]
        self.layer_idx = layer_idx
        self.hidden_size = d
        self.num_kv_heads = s["num_kv_heads"]
        self.heads_per_group = s["heads_per_group"]
        self.num_heads = self.num_kv_heads * self.heads_per_group
        self.head_dim = s["head_dim"]
        self.v_head_dim = s["v_head_dim"]
        self.scaling = 1.0 / math.sqrt(self.head_dim) if self.head_dim else 1.0
        if self.num_heads == 0:
            self.o_proj = BiasOnly(d) if s["o_bias"] else None
            return
        h, g = self.num_heads, self.num_kv_heads
        self.q_proj = _projection(d, h * self.head_dim, s["q_rank"], s["qkv_bias"])
        self.k_proj = _projection(d, g * self.head_dim, s["k_rank"], s["qkv_bias"])
        self.v_proj = _projection(d, g * self.v_head_dim, s["v_rank"], s["qkv_bias"])
        self.o_proj = _projection(h * self.v_head_dim, d, s["o_rank"], s["o_bias"])

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d). ``attention_mask``: None, 2-D (B, T) 1/0, or bool (B, 1, T, T)."""
        if self.num_heads == 0:
            if self.o_proj is None:
                return torch.zeros_like(hidden_states)
            return self.o_proj(hidden_states)
        bsz, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, seq_len, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # (B, H, T, hd), (B, G, T, hd)
        if self.heads_per_group > 1:  # query head j uses KV head j // heads_per_group
            k = k.repeat_interleave(self.heads_per_group, dim=1)
            v = v.repeat_interleave(self.heads_per_group, dim=1)
        mask = build_attention_mask(attention_mask, seq_len)
        pad = self.head_dim - self.v_head_dim  # fused SDPA kernels want equal head dims (6.7x at T 2048 on CPU)
        if pad > 0:
            v = F.pad(v, (0, pad))  # zero value dims produce zero outputs, sliced off below
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scaling
        )[..., : self.v_head_dim]  # (B, H, T, v_hd)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.v_head_dim)
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
    """Pre-norm residual block. Usable standalone (the streaming engine builds one at a time)."""

    def __init__(self, config: StreamPruneConfig, spec, layer_idx: int | None = None) -> None:
        super().__init__()
        s = layer_spec_dict(spec)
        d = s["hidden_size"]
        self.layer_idx = layer_idx
        self.input_layernorm = StreamPruneRMSNorm(d, eps=config.rms_norm_eps)
        self.self_attn = StreamPruneAttention(config, s, layer_idx)
        self.post_attention_layernorm = StreamPruneRMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = StreamPruneMLP(config, s)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); ``position_embeddings`` = (cos, sin) from the rotary module."""
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [StreamPruneDecoderLayer(config, config.get_layer_spec(i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = StreamPruneRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,  # use_cache / cache / past_key_values ...: ignored (no KV cache)
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            else:
                position_ids = torch.arange(seq_len, device=inputs_embeds.device)[None]  # (1, T)
        mask = build_attention_mask(attention_mask, seq_len)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, mask)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class StreamPruneForCausalLM(StreamPrunePreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`StreamPruneModel`. No KV cache: see :meth:`generate`."""

    # transformers 5: {target: source}; applied only when config.tie_word_embeddings.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: StreamPruneConfig) -> None:
        super().__init__(config)
        self.model = StreamPruneModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.use_cache = False

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
        **kwargs,  # use_cache / cache / past_key_values ...: ignored (no KV cache)
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab); with ``labels``, loss = mean next-token cross-entropy
        (labels shifted left by one inside, -100 ignored)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V) fp32
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: generate must not build one

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate`` with ``use_cache=False`` forced (this model has no KV
        cache; each step re-runs the whole prefix)."""
        kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


__all__ = [
    "BiasOnly",
    "LowRankLinear",
    "StreamPruneAttention",
    "StreamPruneConfig",
    "StreamPruneDecoderLayer",
    "StreamPruneForCausalLM",
    "StreamPruneMLP",
    "StreamPruneModel",
    "StreamPrunePreTrainedModel",
    "StreamPruneRMSNorm",
    "build_attention_mask",
    "layer_spec_dict",
]
