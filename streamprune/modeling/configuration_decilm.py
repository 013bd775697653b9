"""Configuration of a Nemotron-NAS / DeciLM checkpoint (``model_type: nemotron-nas``).

SELF-CONTAINED: imports only ``transformers``. Copied into every nemotron-nas folder that
streamprune writes, next to ``modeling_decilm.py``; never import ``streamprune`` here.
Written for streamprune (not NVIDIA's file); it reads the same ``config.json`` as the
serving engines (vLLM/SGLang ``nemotron_nas.py``, mlx-lm ``nemotron-nas.py``, llama.cpp's
``DeciModel`` converter).

``block_configs``: one entry per layer,
``{"attention": {"n_heads_in_group": g | null, "no_op": bool, "replace_with_linear": false},
"ffn": {"ffn_mult": m | null, "no_op": bool, "replace_with_linear": false}}``. After
loading, entries give attribute access as vLLM reads them
(``config.block_configs[i].attention.n_heads_in_group``, ``.ffn.ffn_mult``, ``.no_op``)
and stay plain dicts for JSON.

A layer keeping attention has ``num_attention_heads`` query heads and
``num_attention_heads // n_heads_in_group`` KV heads, of ``head_dim`` (= hidden /
heads); its FFN width is :func:`ffn_mult_to_intermediate_size` (vLLM's
``_ffn_mult_to_intermediate_size``). ``attention_bias`` biases q, k, v and o of every
attention layer; ``mlp_bias`` gate, up and down of every FFN.
"""

from transformers import LlamaConfig


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """FFN width of a block: ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of
    256, exactly as vLLM, mlx-lm and llama.cpp compute it."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


class SubblockConfig(dict):
    """A dict (serialises as JSON) whose keys also read as attributes; a missing key raises
    ``AttributeError`` (vLLM tests ``hasattr(block.ffn, "ffn_mult")``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        import copy

        return type(self)({k: copy.deepcopy(v, memo) for k, v in self.items()})


def block_config(entry) -> SubblockConfig:
    """One ``block_configs`` entry (dict or SubblockConfig) with attribute access, the
    ``attention`` and ``ffn`` sub-dicts included; defaults as the engines read them."""
    attention = SubblockConfig({"n_heads_in_group": None, "no_op": False, "replace_with_linear": False, **dict(entry["attention"])})
    ffn = SubblockConfig({"ffn_mult": None, "no_op": False, "replace_with_linear": False, **dict(entry["ffn"])})
    return SubblockConfig({**dict(entry), "attention": attention, "ffn": ffn})


class DeciLMConfig(LlamaConfig):
    """Llama config + ``block_configs``. ``num_key_value_heads`` / ``intermediate_size`` are
    informational (the source model's); the truth per layer is ``block_configs``."""

    model_type = "nemotron-nas"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        if self.block_configs is None:  # a plain Llama: every layer dense
            g = self.num_attention_heads // (self.num_key_value_heads or self.num_attention_heads)
            mult = 3 * self.intermediate_size / (2 * self.hidden_size)
            self.block_configs = [{"attention": {"n_heads_in_group": g}, "ffn": {"ffn_mult": mult}}] * self.num_hidden_layers
        self.block_configs = [block_config(b) for b in self.block_configs]
        super().__post_init__(**kwargs)

    def layer_shapes(self, layer_idx: int) -> dict:
        """``{"num_heads", "num_kv_heads", "head_dim", "intermediate_size"}`` of layer
        ``layer_idx`` (0 heads / width 0 for a no-op sub-block). Raises ``ValueError`` on
        what this modeling file cannot run (``replace_with_linear``)."""
        b = self.block_configs[layer_idx]
        if b.attention.replace_with_linear or b.ffn.replace_with_linear:
            raise ValueError(f"layer {layer_idx}: replace_with_linear sub-blocks are not supported by this modeling file")
        heads = kv = 0
        if not b.attention.no_op:
            g = b.attention.n_heads_in_group
            if not g or self.num_attention_heads % g:
                raise ValueError(f"layer {layer_idx}: n_heads_in_group {g} does not divide num_attention_heads {self.num_attention_heads}")
            heads, kv = self.num_attention_heads, self.num_attention_heads // g
        width = 0 if b.ffn.no_op else ffn_mult_to_intermediate_size(b.ffn.ffn_mult, self.hidden_size)
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        return {"num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim, "intermediate_size": width}
