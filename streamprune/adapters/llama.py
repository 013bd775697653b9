"""Adapter for the Llama family: Llama 1/2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2, and the
blocks that differ from it only by their norms: Qwen3 (per-head q/k RMSNorm) and OLMo 2
(post-norms, q/k RMSNorm over the whole projection).

The only module that spells checkpoint paths such as ``model.layers.{i}.self_attn.q_proj``.
A dense layer is the ``transformers`` decoder-layer class itself, built on the meta
device and materialised with ``load_state_dict(assign=True)``: rotary embeddings, GQA
and the attention kernel come from transformers. A pruned layer (from a streamprune
output folder) is the ``StreamPruneDecoderLayer`` of our modeling file.

To add an architecture with the same block structure: add its ``model_type`` to
``LAYER_CLASSES`` below, and to ``BLOCKS`` when its norms differ from Llama's. A different
block structure needs its own adapter file and a line in ``streamprune/adapters/__init__.py``
(and in ``OWN_ADAPTERS`` below, for the list of supported types): e.g. ``phi3.py``, whose
checkpoint fuses q/k/v and gate/up and which splits them into this block's names, or
``gemma3.py`` (sandwich norms, a scaled embedding, a RoPE per layer type).

Position embeddings: the engine computes them once (``adapter.rotary``) and hands them to
every layer: ``(cos, sin)``, or, where the RoPE differs by layer type (Gemma 3), the pairs of
every type flattened, ``(cos_0, sin_0, cos_1, sin_1)``; each :class:`DecoderLayer` takes its
own pair (``rope``).

Sliding-window attention: a layer the source runs with a window (Mistral, Qwen2/3 with
``use_sliding_window``, Phi-3) is called with the window's mask whenever the sequence is
longer than the window (the engine calls layers with ``attention_mask=None``, which SDPA
runs as plain causal attention, ignoring the layer's ``sliding_window``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..storage.checkpoint import CheckpointReader
from ..errors import CheckpointError, UnsupportedArchitectureError
from ..modeling import modeling_streamprune as sp
from ..modeling.configuration_streamprune import source_attention_window
from ..shapes import ModelShapes
from ..spec import LayerSpec

# model_type -> (transformers module, decoder-layer class, rotary class)
LAYER_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
    "olmo2": ("transformers.models.olmo2.modeling_olmo2", "Olmo2DecoderLayer", "Olmo2RotaryEmbedding"),
}


@dataclass(frozen=True)
class Block:
    """How a model type's block differs from Llama's (``LayerSpec.qk_norm`` / ``norm_placement``)."""

    qk_norm: str = "none"
    norm_placement: str = "pre"
    norm_scale_in_fp32: bool = False  # RMSNorm scales before casting back (StreamPruneRMSNorm)
    norm_weight_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma 3: 1)


BLOCKS = {
    "qwen3": Block(qk_norm="head"),
    "olmo2": Block(qk_norm="proj", norm_placement="post", norm_scale_in_fp32=True),
}
# Model types with their own adapter file built on this one (streamprune/adapters/__init__.py).
OWN_ADAPTERS = ("phi3", "gemma3_text", "gemma3")
SUPPORTED = sorted([*LAYER_CLASSES, *OWN_ADAPTERS]) + ["streamprune (a streamprune output)"]

# The outer tensors, by the names the engine and the output use.
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"

# Observer tap name -> module path inside a decoder layer (dense and pruned alike).
TAPS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "mlp": "mlp",
    "layer": "",
}
# Post-norm and sandwich blocks (OLMo 2, Gemma 3): what reaches the residual is the norm of the
# sub-block's output, so the attention and FFN output taps read their output after it:
# (input module, output module). The FFN tap's input is the FFN's own input (Gemma 3: after
# its pre-norm).
POST_NORM_TAPS = {
    **TAPS,
    "o_proj": ("self_attn.o_proj", "post_attention_layernorm"),
    "mlp": ("mlp", "post_feedforward_layernorm"),
}


class DecoderLayer(nn.Module):
    """One decoder layer with the engine's calling convention: ``(hidden, (cos, sin)) -> hidden``."""

    def __init__(self, inner: nn.Module, index: int = -1, taps: dict | None = None, window: int | None = None, rope: int = 0):
        super().__init__()
        self.inner = inner
        self.index = index
        self.taps = TAPS if taps is None else taps
        self.window = window  # the source's sliding window for this layer, or None
        self.rope = rope  # which (cos, sin) pair of the position embeddings this layer takes
        self._mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``position_embeddings``: (cos, sin), or the pairs of every layer type flattened (module docstring)."""
        pair = position_embeddings[2 * self.rope : 2 * self.rope + 2]
        out = self.inner(hidden, position_embeddings=pair, attention_mask=self.window_mask(hidden))
        return out[0] if isinstance(out, tuple) else out

    def window_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """None (causal attention) unless the layer has a window shorter than the sequence: then
        transformers' sliding-window causal mask, (1, 1, T, T) bool, True = attend: query q sees
        keys k with ``q - window < k <= q``."""
        t = hidden.shape[1]
        if self.window is None or t <= self.window:
            return None
        if self._mask is None or self._mask.shape[-1] != t or self._mask.device != hidden.device:
            q = torch.arange(t, device=hidden.device)[:, None]
            k = torch.arange(t, device=hidden.device)[None, :]
            self._mask = ((k <= q) & (k > q - self.window))[None, None]
        return self._mask

    def tap(self, name: str) -> tuple[nn.Module, nn.Module]:
        """(module whose input is the tap's input, module whose output is the tap's output)."""
        path = self.taps[name]
        source, sink = (path, path) if isinstance(path, str) else path
        return self.inner.get_submodule(source), self.inner.get_submodule(sink)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's state under the checkpoint's names (relative to ``model.layers.{i}.``)."""
        return self.inner.state_dict()


class LlamaFamilyAdapter:
    """Reads and builds layers of a dense Llama-family checkpoint (or a streamprune output)."""

    block = Block()
    model_types = (*LAYER_CLASSES, "streamprune")  # the model types this class reads
    layers_prefix = "model.layers."  # where the checkpoint stores decoder layer i: f"{layers_prefix}{i}."
    outer_names = {EMBED: EMBED, NORM: NORM, HEAD: HEAD}  # the outer tensors' names in the checkpoint

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        model_type = reader.config_dict["model_type"]
        if model_type not in self.model_types:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
            )
        self.model_type = model_type
        self.block = BLOCKS.get(model_type, type(self).block)
        check_config_values(self._config_values(), reader.folder / "config.json", dense=model_type != "streamprune")
        self.config = self._load_config()
        self.pruned = model_type == "streamprune"
        if self.pruned:
            self.specs = [LayerSpec.from_dict(d) for d in self.config.layer_specs]
            self.block = Block(self.specs[0].qk_norm, self.specs[0].norm_placement, bool(self.config.norm_scale_in_fp32),
                               float(self.config.norm_weight_offset or 0.0))
        else:
            self._check_supported_options()
            self.specs = [self.shapes().dense_spec()] * self.config.num_hidden_layers
        self._check_checkpoint_matches_config()

    def _config_values(self) -> dict:
        """The config.json values of the decoder (checked before transformers parses them)."""
        return self.reader.config_dict

    def _load_config(self) -> PretrainedConfig:
        if self.model_type == "streamprune":
            cfg = sp.StreamPruneConfig.from_pretrained(self.reader.folder)
        else:
            try:
                cfg = AutoConfig.from_pretrained(self.reader.folder, trust_remote_code=False)
            except Exception as e:  # ValueError, TypeError, KeyError and huggingface_hub's strict-dataclass errors
                reason = " ".join(str(e).split())  # one line
                raise CheckpointError(f"{self.reader.folder}/config.json cannot be parsed by transformers ({reason}); fix the file") from e
        cfg._attn_implementation = "sdpa"  # attention_mask=None + sdpa => causal, no mask tensor
        return cfg

    def _check_supported_options(self) -> None:
        cfg = self.config
        if getattr(cfg, "mlp_bias", False):
            raise UnsupportedArchitectureError("mlp_bias=True (biased gate/up/down) is not supported by the Llama adapter")

    def _check_checkpoint_matches_config(self) -> None:
        """From the shard headers alone (no tensor data): the layers present, layer 0's tensor
        shapes and the outer tensors must be what config.json describes; else the run would
        fail after its run directory was made (or, for the vocabulary, not at all)."""
        folder = self.reader.folder
        present = set()
        for name in self.reader.weight_map:
            rest = name[len(self.layers_prefix):] if name.startswith(self.layers_prefix) else ""
            part = rest.split(".")[0] if "." in rest else ""
            if part.isdigit():
                present.add(int(part))
        n = self.config.num_hidden_layers
        if present != self.layers_with_tensors():
            have = f"layers 0-{max(present)} ({len(present)} layers)" if present and present == set(range(len(present))) else f"{len(present)} layers {sorted(present)[:6]}"
            raise CheckpointError(f"{folder}/config.json says num_hidden_layers={n} but the checkpoint has tensors for {have}: fix num_hidden_layers or re-download")
        shapes = {n[len(self.layer_prefix(0)):]: self.reader.shape(n) for n in self.reader.names_with_prefix(self.layer_prefix(0))}
        expected = self.checkpoint_layer_shapes(0)
        c = self.config
        described = (f"hidden_size {c.hidden_size}, num_attention_heads {c.num_attention_heads}, num_key_value_heads "
                     f"{getattr(c, 'num_key_value_heads', None)}, head_dim {getattr(c, 'head_dim', None)}, intermediate_size {c.intermediate_size}")
        for name in sorted(set(shapes) & set(expected)):
            if shapes[name] != expected[name]:
                raise CheckpointError(
                    f"layer 0 tensor {name!r} has shape {shapes[name]}, expected {expected[name]} from "
                    f"{folder}/config.json ({described}): the checkpoint and its config disagree; fix config.json or re-download"
                )
        d, v = c.hidden_size, c.vocab_size
        for name, want in ((EMBED, (v, d)), (NORM, (d,)), (HEAD, (v, d))):
            name = self.outer_names[name]
            if self.reader.has(name) and self.reader.shape(name) != want:
                raise CheckpointError(
                    f"{name} has shape {self.reader.shape(name)} but {folder}/config.json (vocab_size {v}, hidden_size {d}) "
                    f"implies {want}: fix vocab_size / hidden_size in config.json"
                )

    def checkpoint_layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's tensor shapes under the checkpoint's own names (relative to ``model.layers.{i}.``)."""
        return {k: tuple(v.shape) for k, v in self.skeleton(i).state_dict().items()}

    def layers_with_tensors(self) -> set[int]:
        """Indices of the layers the checkpoint must hold tensors for (every layer here)."""
        return set(range(self.config.num_hidden_layers))

    # ---- shapes -----------------------------------------------------------------------
    def shapes(self) -> ModelShapes:
        c = self.config
        heads = c.num_attention_heads
        qkv_bias = self.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        return ModelShapes(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=self.model_type != "qwen2" and bool(getattr(c, "attention_bias", False)),
            max_position_embeddings=getattr(c, "max_position_embeddings", 2048),
            qk_norm=self.block.qk_norm,
            norm_placement=self.block.norm_placement,
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def embed_scale(self) -> float | None:
        """What the input embedding's rows are multiplied by (Gemma 3: sqrt(hidden_size)), or None."""
        return getattr(self.config, "embed_scale", None)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or not self.reader.has(self.outer_names[HEAD])

    # ---- reading ----------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}{i}."

    def read_stored_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors as the checkpoint stores them, named relative to ``model.layers.{i}.``."""
        prefix = self.layer_prefix(i)
        names = self.reader.names_with_prefix(prefix)
        if not names:
            raise CheckpointError(f"no tensors for layer {i} ({prefix}*) in {self.reader.folder}")
        return {n[len(prefix):]: t for n, t in self.reader.read(names).items()}

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors, named relative to ``model.layers.{i}.``."""
        tensors = self.read_stored_layer(i)
        check_tensors(self.skeleton(i), tensors, f"layer {i} of {self.reader.folder}")
        return tensors

    def read_outer(self) -> dict[str, torch.Tensor]:
        """Embedding, final norm and (if untied) lm_head."""
        names = [EMBED, NORM] + ([] if self.tied else [HEAD])
        stored = self.reader.read([self.outer_names[n] for n in names])
        return {n: stored[self.outer_names[n]] for n in names}

    # ---- building ---------------------------------------------------------------------
    def skeleton(self, i: int) -> nn.Module:
        """Layer i on the meta device (no memory)."""
        with torch.device("meta"):
            if self.pruned:
                return sp.StreamPruneDecoderLayer(self.config, self.specs[i].to_dict(), i)
            module_name, cls_name, _ = LAYER_CLASSES[self.model_type]
            cls = getattr(importlib.import_module(module_name), cls_name)
            return cls(self.config, layer_idx=i)

    def build_layer(self, i: int, tensors: dict[str, torch.Tensor], device, dtype) -> DecoderLayer:
        """Materialise layer i from its tensors on ``device`` in ``dtype``."""
        layer = self.skeleton(i)
        check_tensors(layer, tensors, f"layer {i}")
        state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        return self.wrap(layer, i, self.specs[i])

    def wrap(self, inner: nn.Module, i: int, spec: LayerSpec) -> DecoderLayer:
        """Layer ``i`` (a transformers or a pruned decoder layer of ``spec``'s block) with the engine's calling convention."""
        return DecoderLayer(inner, i, self.taps(spec), self.window(i), self.rope_slot(i)).eval()

    def rope_slot(self, i: int) -> int:
        """Which (cos, sin) pair of :meth:`rotary`'s output layer ``i`` takes (0 unless the RoPE differs by layer type)."""
        kinds = sp.rope_layer_types(self.config)
        return 0 if kinds is None else kinds.index(self.config.layer_types[i])

    def window(self, i: int) -> int | None:
        """The sliding window the source applies in layer i, or None (full causal attention)."""
        if self.pruned:
            return self.config.layer_window(i) if hasattr(self.config, "layer_window") else None
        window, layer_types = source_attention_window(self.config)
        return window if layer_types is not None and layer_types[i] == "sliding_attention" else None

    @staticmethod
    def taps(spec: LayerSpec) -> dict:
        """The observer taps of a layer of ``spec``'s block kind."""
        return POST_NORM_TAPS if spec.norm_placement in ("post", "sandwich") else TAPS

    def final_norm(self, device, dtype) -> nn.Module:
        """The model's final RMSNorm (its weight still to be loaded), as the architecture computes it."""
        return sp.StreamPruneRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps, scale_in_fp32=self.block.norm_scale_in_fp32,
                                     weight_offset=self.block.norm_weight_offset).to(device, dtype)

    def build_pruned_layer(self, i: int, spec: LayerSpec, tensors: dict[str, torch.Tensor], device, dtype) -> DecoderLayer:
        """A pruned layer (our modeling class) from a decision's spec and tensors."""
        with torch.device("meta"):
            layer = sp.StreamPruneDecoderLayer(self.config, spec.to_dict(), i)
        check_tensors(layer, tensors, f"pruned layer {i}")
        state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        return self.wrap(layer, i, spec)

    def rotary(self, device) -> nn.Module:
        """``(x, position_ids) -> (cos, sin)``, or every layer type's pair flattened (module docstring)."""
        if self.pruned and sp.rope_layer_types(self.config) is not None:
            return sp.RotaryByLayerType(self.config).to(device)
        if self.pruned:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as cls
        else:
            module_name, _, rot_name = LAYER_CLASSES[self.model_type]
            cls = getattr(importlib.import_module(module_name), rot_name)
        return cls(config=self.config).to(device)


_POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL_POSITIVE = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def check_config_values(cfg: dict, path, dense: bool = True) -> None:
    """The raw config.json values the Llama family needs: positive integer sizes, heads that
    divide, a RoPE base. Checked before transformers parses them (its errors are tracebacks
    or, for a missing ``rope_theta``, a silent default of 10000)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _POSITIVE + _OPTIONAL_POSITIVE:
        if key not in cfg or (cfg[key] is None and key in _OPTIONAL_POSITIVE):
            if key in _POSITIVE:
                raise CheckpointError(f"{path} has no {key!r}; a Llama-family config needs it (see the model's original config.json)")
            continue
        if not is_int(cfg[key]) or cfg[key] <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {cfg[key]!r}; fix config.json")
    heads, d = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise CheckpointError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} (grouped-query attention needs whole groups); fix config.json")
    if cfg.get("head_dim") is None and d % heads:
        raise CheckpointError(f"{path}: num_attention_heads {heads} does not divide hidden_size {d} and there is no head_dim; fix config.json")
    eps = cfg.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise CheckpointError(f"{path}: rms_norm_eps must be a positive number, got {eps!r}; fix config.json")
    if not dense:
        return
    rope = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(rope, dict):
        theta = rope.get("rope_theta")
    per_type = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []  # Gemma 3: one per layer type
    for theta in [theta] if theta is not None or not per_type else [v.get("rope_theta") for v in per_type]:
        if theta is None:
            raise CheckpointError(
                f"{path} has no rope_theta (nor rope_parameters.rope_theta): transformers would silently assume a default, "
                "which is wrong for most recent models; add the model's value (see its original config.json)"
            )
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise CheckpointError(f"{path}: rope_theta must be a positive number, got {theta!r}; fix config.json")


def check_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Names, shapes and dtypes of ``tensors`` must match ``module``'s state dict."""
    check_tensor_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()}, tensors, where)


def check_tensor_shapes(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Names and shapes of ``tensors`` must be ``expected``'s; floating-point dtypes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: missing tensors {missing[:4]}, unexpected tensors {extra[:4]}")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected[name]}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
