"""Configuration of the pruned decoder LLM (``model_type: streamprune``).

SELF-CONTAINED: imports only ``transformers``. Copied into every output folder next to
``modeling_streamprune.py`` (which imports it relatively, as Hugging Face remote code
does); never import ``streamprune`` here.

Per-layer shapes come from ``config.layer_specs``: one dict per layer with exactly the
fields of ``streamprune.spec.LayerSpec`` (hidden_size, num_kv_heads, heads_per_group,
head_dim, v_head_dim, intermediate_size, q_rank, k_rank, v_rank, o_rank, qkv_bias, o_bias,
down_bias, bypass_rank, qk_norm, norm_placement). A dict without ``qk_norm`` /
``norm_placement`` (every output written before they existed) is a Llama block: no q/k
norm, norms before the sub-blocks; ``config.json`` lists them only where they differ.

``norm_scale_in_fp32``: the RMSNorms multiply by their weight before casting back to the
activation dtype (OLMo 2, Gemma 3) instead of after (Llama, Qwen2/3, Mistral); equal in float32.
``norm_weight_offset``: the RMSNorms scale by ``offset + weight`` (Gemma 3: 1, in float32), 0 elsewhere.
``embed_scale``: the input embedding's rows are multiplied by it, in the weight's dtype (Gemma 3:
sqrt(hidden_size)); the tied head uses the weight unscaled. None: no scale.
``query_pre_attn_scalar``: attention scores are scaled by its inverse square root (Gemma 3)
instead of head_dim's. None: head_dim's.

The attention window is the source's: ``layer_types[i]`` is ``"sliding_attention"``
where the source architecture applies ``sliding_window`` to layer ``i`` (Mistral: every
layer when ``sliding_window`` is set; Qwen2: its own ``layer_types``, i.e. layers from
``max_window_layers`` on when ``use_sliding_window``; Gemma 3: its own ``layer_types``),
else ``"full_attention"``.

RoPE: ``rope_parameters`` is one dict (every layer alike), or, as the source has it, one dict
per layer type (Gemma 3: the local base for sliding layers, the global base and its scaling
for full ones): :func:`rope_layer_types` names them.
"""

import copy

from transformers import LlamaConfig

# LayerSpec fields (streamprune/spec.py): required ones, then optional ones with defaults.
_REQUIRED_SPEC_FIELDS = (
    "hidden_size",
    "num_kv_heads",
    "heads_per_group",
    "head_dim",
    "v_head_dim",
    "intermediate_size",
)
_OPTIONAL_SPEC_FIELDS = {
    "q_rank": None,
    "k_rank": None,
    "v_rank": None,
    "o_rank": None,
    "qkv_bias": False,
    "o_bias": False,
    "down_bias": False,
    "bypass_rank": 0,
    "qk_norm": "none",
    "norm_placement": "pre",
}
# Written to config.json only where they differ from these (outputs of Llama-family sources
# keep the layer_specs they always had).
_OMITTED_AT_DEFAULT = {"qk_norm": "none", "norm_placement": "pre"}
# Source model types whose RMSNorm scales by its weight in float32 before casting back.
_NORM_SCALE_IN_FP32 = ("olmo2",)
# Model-wide fields the source config may carry (an adapter sets them on the config it reads:
# streamprune/adapters/gemma3.py), with their values for a Llama block.
_MODEL_WIDE_FIELDS = {"norm_weight_offset": 0.0, "embed_scale": None, "query_pre_attn_scalar": None}

# Source-config attributes carried over by StreamPruneConfig.from_source.
_CARRIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
)

_WINDOW_LAYER_TYPES = ("full_attention", "sliding_attention")


def source_attention_window(source_config) -> tuple[int | None, list[str] | None]:
    """``(sliding_window, layer_types)`` of a source config, as its architecture applies them.

    ``(None, None)`` when no layer uses a window (Llama; Mistral with ``sliding_window``
    null; Qwen2 without ``use_sliding_window``, whose config already nulls the window).
    Raises ``ValueError`` on a layer type other than full / sliding attention.
    """
    window = getattr(source_config, "sliding_window", None)
    if window is None:
        return None, None
    n = source_config.num_hidden_layers
    layer_types = getattr(source_config, "layer_types", None)
    if layer_types is None:  # Mistral: the window applies to every layer
        layer_types = ["sliding_attention"] * n
    layer_types = list(layer_types)
    bad = sorted(set(layer_types) - set(_WINDOW_LAYER_TYPES))
    if bad:
        raise ValueError(f"source layer_types {bad} are not supported (only {list(_WINDOW_LAYER_TYPES)})")
    if "sliding_attention" not in layer_types:
        return None, None
    return int(window), layer_types


def rope_layer_types(config) -> tuple[str, ...] | None:
    """The layer types ``config.rope_parameters`` is keyed by (sorted), or None when it is one
    dict for every layer. Each layer takes the RoPE of its ``layer_types`` entry."""
    rope = getattr(config, "rope_parameters", None) or {}
    present = set(getattr(config, "layer_types", None) or ())
    kinds = tuple(sorted(k for k in rope if k in present and isinstance(rope[k], dict)))
    return kinds or None


def compact_spec_dict(spec) -> dict:
    """:func:`layer_spec_dict` without the fields that sit at their version-1 defaults."""
    return {k: v for k, v in layer_spec_dict(spec).items() if _OMITTED_AT_DEFAULT.get(k, object()) != v}


def layer_spec_dict(spec) -> dict:
    """Normalise a layer spec (dict, or an object with ``to_dict()`` such as LayerSpec).

    Returns a new dict with every LayerSpec field; raises ``ValueError`` on an unknown or a
    missing required field.
    """
    d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    unknown = set(d) - set(_REQUIRED_SPEC_FIELDS) - set(_OPTIONAL_SPEC_FIELDS)
    if unknown:
        raise ValueError(f"layer spec has unknown fields {sorted(unknown)}: {d}")
    missing = [k for k in _REQUIRED_SPEC_FIELDS if k not in d]
    if missing:
        raise ValueError(f"layer spec lacks required fields {missing}: {d}")
    for k, v in _OPTIONAL_SPEC_FIELDS.items():
        d.setdefault(k, v)
    return d


class StreamPruneConfig(LlamaConfig):
    """Llama config + per-layer shapes.

    The inherited Llama fields (num_attention_heads, num_key_value_heads, intermediate_size)
    keep the *source* model's values; the truth per layer is ``layer_specs``. ``head_dim``,
    ``rope_parameters``, ``rms_norm_eps``, ``hidden_act``, vocab and embedding tying are
    the source's and are used as is. ``layer_specs=None`` means dense Llama layers.
    ``sliding_window`` / ``layer_types``: the source's attention window (module docstring);
    ``layer_types`` defaults to full attention everywhere.
    """

    model_type = "streamprune"

    layer_specs: list[dict] | None = None
    source_model_type: str = "llama"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    norm_scale_in_fp32: bool = False
    norm_weight_offset: float = 0.0
    embed_scale: float | None = None
    query_pre_attn_scalar: float | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    @classmethod
    def from_source(cls, source_config, layer_specs, **overrides) -> "StreamPruneConfig":
        """Build from a transformers source config (Llama / Qwen2 / Mistral ...) and specs.

        ``layer_specs``: one LayerSpec or dict per layer. ``overrides`` win over the source.
        """
        kwargs = {}
        for name in _CARRIED_FIELDS:
            if hasattr(source_config, name):
                kwargs[name] = copy.deepcopy(getattr(source_config, name))
        dtype = getattr(source_config, "dtype", None)
        if dtype is not None:
            kwargs["dtype"] = str(dtype).removeprefix("torch.")
        kwargs["source_model_type"] = getattr(source_config, "model_type", "llama")
        kwargs["norm_scale_in_fp32"] = bool(getattr(source_config, "norm_scale_in_fp32", kwargs["source_model_type"] in _NORM_SCALE_IN_FP32))
        for name, default in _MODEL_WIDE_FIELDS.items():
            value = getattr(source_config, name, default)
            kwargs[name] = default if value is None else float(value)
        kwargs["sliding_window"], kwargs["layer_types"] = source_attention_window(source_config)
        kwargs["layer_specs"] = [compact_spec_dict(s) for s in layer_specs]
        kwargs["num_hidden_layers"] = len(kwargs["layer_specs"])
        if kwargs["layer_types"] is not None and len(kwargs["layer_types"]) != kwargs["num_hidden_layers"]:
            raise ValueError(
                f"source has {len(kwargs['layer_types'])} layer_types but {kwargs['num_hidden_layers']} layer specs"
            )
        kwargs["use_cache"] = True
        kwargs.update(overrides)
        config = cls(**kwargs)
        config.check_layer_specs()
        return config

    def get_layer_spec(self, layer_idx: int) -> dict:
        """The spec dict of layer ``layer_idx`` (a dense Llama layer when layer_specs is None)."""
        if self.layer_specs is None:
            return {
                "hidden_size": self.hidden_size,
                "num_kv_heads": self.num_key_value_heads,
                "heads_per_group": self.num_attention_heads // self.num_key_value_heads,
                "head_dim": self.head_dim,
                "v_head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size,
                **_OPTIONAL_SPEC_FIELDS,
                "qkv_bias": bool(self.attention_bias),
                "o_bias": bool(self.attention_bias),
            }
        return layer_spec_dict(self.layer_specs[layer_idx])

    def layer_window(self, layer_idx: int | None) -> int | None:
        """The sliding window layer ``layer_idx`` applies, or None (full causal attention)."""
        if layer_idx is None or self.sliding_window is None or self.layer_types is None:
            return None
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def check_layer_specs(self) -> None:
        """Raise ``ValueError`` if layer_specs disagree with the model-wide fields."""
        if self.layer_specs is None:
            return
        if len(self.layer_specs) != self.num_hidden_layers:
            raise ValueError(
                f"config.layer_specs has {len(self.layer_specs)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i in range(self.num_hidden_layers):
            s = self.get_layer_spec(i)
            if s["hidden_size"] != self.hidden_size:
                raise ValueError(f"layer {i}: spec hidden_size {s['hidden_size']} != config {self.hidden_size}")
            if s["num_kv_heads"] and s["head_dim"] != self.head_dim:
                raise ValueError(
                    f"layer {i}: spec head_dim {s['head_dim']} != config head_dim {self.head_dim} "
                    "(RoPE acts on it; it is never pruned)"
                )
