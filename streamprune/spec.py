"""Layer specs: the shapes of one (possibly pruned) decoder layer, as data.

Every pruning decision becomes a :class:`LayerSpec` the moment it is made. The spec is
what the output ``config.json`` lists per layer, what the journal records, and what the
pruned-model class (``streamprune/modeling/modeling_streamprune.py``) builds from.

Tensor names of a pruned layer (under ``model.layers.{i}.``), PyTorch ``W[out, in]``:

- norms, by ``norm_placement``: ``"pre"`` (Llama, Qwen2/3, Mistral: before each sub-block)
  ``input_layernorm.weight`` (d) and ``post_attention_layernorm.weight`` (d, before the MLP);
  ``"post"`` (OLMo 2: on each sub-block's output, before the residual add)
  ``post_attention_layernorm.weight`` (d) and ``post_feedforward_layernorm.weight`` (d);
  ``"sandwich"`` (Gemma 3: both, before each sub-block and on its output)
  ``input_layernorm.weight``, ``post_attention_layernorm.weight``,
  ``pre_feedforward_layernorm.weight`` and ``post_feedforward_layernorm.weight`` (d each)
- q/k RMSNorms between the projection and RoPE, by ``qk_norm`` (only when the layer has
  heads): ``"head"`` (Qwen3: one weight per head dim, shared by all heads)
  ``self_attn.q_norm.weight`` / ``self_attn.k_norm.weight`` (head_dim); ``"proj"`` (OLMo 2:
  over the whole projection) ``self_attn.q_norm.weight`` (num_heads*head_dim) and
  ``self_attn.k_norm.weight`` (num_kv_heads*head_dim); ``"none"``: no tensor
- projection P in {q,k,v,o}: dense ``self_attn.P_proj.weight`` (+ ``.bias``), or, when
  ``P_rank`` is set, a factor pair ``self_attn.P_proj.down.weight`` (r, in) and
  ``self_attn.P_proj.up.weight`` (out, r) (+ ``self_attn.P_proj.up.bias``).
  q: out = num_kv_heads*heads_per_group*head_dim; k: out = num_kv_heads*head_dim;
  v: out = num_kv_heads*v_head_dim; o: in = num_kv_heads*heads_per_group*v_head_dim.
- ``mlp.gate_proj.weight`` / ``mlp.up_proj.weight`` (f_l, d), ``mlp.down_proj.weight``
  (d, f_l) (+ ``mlp.down_proj.bias`` when ``down_bias``)
- LC bypass when ``bypass_rank`` r > 0: ``mlp.bypass.down.weight`` (r, d) and
  ``mlp.bypass.up.weight`` (d, r); the MLP returns ``mlp(x) + up(down(x))``.

The modeling file is self-contained (it travels into every output folder for
``trust_remote_code``) and reads the same fields from ``config.layer_specs``; a test checks
that its modules' state dict equals :meth:`LayerSpec.tensor_shapes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# 2: ``qk_norm`` and ``norm_placement``. A spec dict without them (version 1: every output
# written before) is today's Llama block; ``to_dict`` omits them at those defaults, so
# Llama-family specs serialise exactly as in version 1.
SPEC_VERSION = 2
QK_NORMS = ("none", "head", "proj")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# The RMSNorms of each placement (tensor ``NAME.weight``, (d,)), in the order tensor_shapes lists them.
BLOCK_NORMS = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "post": ("post_feedforward_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}
_V1_DEFAULTS = {"qk_norm": "none", "norm_placement": "pre"}


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one decoder layer. Defaults describe nothing: build with :meth:`dense`."""

    hidden_size: int
    num_kv_heads: int  # KV groups kept (G_l); 0 with heads_per_group 0 = no attention
    heads_per_group: int  # query heads per kept KV group (H_l / G_l)
    head_dim: int  # q/k head dim (RoPE acts on it; never pruned)
    v_head_dim: int  # value head dim (Olica's Fast-OND shrinks it)
    intermediate_size: int  # FFN width f_l (0 = no FFN channels)
    q_rank: int | None = None  # None = dense projection
    k_rank: int | None = None
    v_rank: int | None = None
    o_rank: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    down_bias: bool = False
    bypass_rank: int = 0  # LC low-rank FFN bypass rank (0 = none)
    qk_norm: str = "none"  # RMSNorm on q/k before RoPE: "none", "head" (per head dim), "proj" (whole projection)
    norm_placement: str = "pre"  # "pre": norms before the sub-blocks; "post": on their outputs; "sandwich": both

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"LayerSpec.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"LayerSpec.norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"LayerSpec.{f.name} must be >= 0, got {v}")
        if (self.num_kv_heads == 0) != (self.heads_per_group == 0):
            raise ValueError(
                "LayerSpec: num_kv_heads and heads_per_group must both be 0 or both > 0, "
                f"got {self.num_kv_heads} and {self.heads_per_group}"
            )

    @classmethod
    def dense(
        cls,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str = "none",
        norm_placement: str = "pre",
    ) -> "LayerSpec":
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        return cls(
            hidden_size=hidden_size,
            num_kv_heads=num_kv_heads,
            heads_per_group=num_heads // num_kv_heads,
            head_dim=head_dim,
            v_head_dim=head_dim,
            intermediate_size=intermediate_size,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            norm_placement=norm_placement,
        )

    # ---- derived shapes -------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.heads_per_group

    def proj_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of projection ``name`` in {q, k, v, o, gate, up, down}."""
        d = self.hidden_size
        return {
            "q": (self.num_heads * self.head_dim, d),
            "k": (self.num_kv_heads * self.head_dim, d),
            "v": (self.num_kv_heads * self.v_head_dim, d),
            "o": (d, self.num_heads * self.v_head_dim),
            "gate": (self.intermediate_size, d),
            "up": (self.intermediate_size, d),
            "down": (d, self.intermediate_size),
        }[name]

    def rank(self, name: str) -> int | None:
        return getattr(self, f"{name}_rank", None)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the layer, name (relative to ``model.layers.{i}.``) -> shape."""
        d = self.hidden_size
        out: dict[str, tuple[int, ...]] = {f"{norm}.weight": (d,) for norm in BLOCK_NORMS[self.norm_placement]}
        if self.num_heads and self.qk_norm != "none":
            per_head = self.qk_norm == "head"
            out["self_attn.q_norm.weight"] = (self.head_dim if per_head else self.num_heads * self.head_dim,)
            out["self_attn.k_norm.weight"] = (self.head_dim if per_head else self.num_kv_heads * self.head_dim,)
        if self.num_heads:
            for p in ("q", "k", "v", "o"):
                m, n = self.proj_shape(p)
                prefix = f"self_attn.{p}_proj"
                r = self.rank(p)
                has_bias = self.qkv_bias if p != "o" else self.o_bias
                if r is None:
                    out[f"{prefix}.weight"] = (m, n)
                    if has_bias:
                        out[f"{prefix}.bias"] = (m,)
                else:
                    out[f"{prefix}.down.weight"] = (r, n)
                    out[f"{prefix}.up.weight"] = (m, r)
                    if has_bias:
                        out[f"{prefix}.up.bias"] = (m,)
        elif self.o_bias:
            out["self_attn.o_proj.bias"] = (d,)
        f = self.intermediate_size
        if f:
            out["mlp.gate_proj.weight"] = (f, d)
            out["mlp.up_proj.weight"] = (f, d)
            out["mlp.down_proj.weight"] = (d, f)
        if self.down_bias:
            out["mlp.down_proj.bias"] = (d,)
        if self.bypass_rank:
            out["mlp.bypass.down.weight"] = (self.bypass_rank, d)
            out["mlp.bypass.up.weight"] = (d, self.bypass_rank)
        return out

    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, except the version-2 ones at their defaults (a Llama block's dict is version 1's)."""
        return {k: v for k, v in asdict(self).items() if _V1_DEFAULTS.get(k, object()) != v}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LayerSpec fields {sorted(unknown)} (spec version {SPEC_VERSION})")
        return cls(**d)
