"""Layer specs: the shapes of one (possibly pruned) decoder layer, as data.

Every pruning decision becomes a :class:`LayerSpec` the moment it is made. The spec is
what the output ``config.json`` lists per layer, what the journal records, and what the
pruned-model class (``streamprune/modeling/modeling_streamprune.py``) builds from.

Tensor names of a pruned layer (under ``model.layers.{i}.``), PyTorch ``W[out, in]``:

- ``input_layernorm.weight`` (d), ``post_attention_layernorm.weight`` (d)
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

SPEC_VERSION = 1


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

    def __post_init__(self) -> None:
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
        out: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
        }
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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LayerSpec fields {sorted(unknown)} (spec version {SPEC_VERSION})")
        return cls(**d)
