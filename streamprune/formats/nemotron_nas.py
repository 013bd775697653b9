"""The nemotron-nas (DeciLM) output format: a pruned model that serving engines load natively.

NVIDIA's Nemotron-NAS checkpoints (``model_type: nemotron-nas``, ``DeciLMForCausalLM``)
give every layer its own structure through ``config.block_configs``; vLLM and SGLang
(``models/nemotron_nas.py``), TensorRT-LLM and mlx-lm (``models/nemotron-nas.py``) load
them, llama.cpp converts them to GGUF (``DeciModel``). What they read, and so what a
streamprune model must be to be written here (:func:`check_fits`):

- attention, where kept: all ``num_attention_heads`` query heads of ``head_dim = hidden /
  heads``, ``heads / n_heads_in_group`` KV heads, dense q/k/v/o; ``attention_bias`` biases
  q, k, v and o of every attention layer (a Qwen2 source has q/k/v bias only: a zero o bias
  is written);
- FFN width ``_ffn_mult_to_intermediate_size(ffn_mult, hidden)`` = ``int(2*m*hidden/3)``
  rounded up to a multiple of 256 (so a width must be a multiple of 256);
  :func:`ffn_mult_for` picks ``m`` so that vLLM's float expression, and mlx-lm's
  ``round(m, 6)`` of it, give the width exactly;
- a no-op sub-block has no tensors and no norm; layer 0 keeps attention (vLLM's first
  layer opens the residual stream, mlx-lm builds its mask from layer 0's cache);
- llama.cpp's DECI graph ``continue``s past a layer whose FFN width is 0, dropping that
  layer's attention output (and, in the last layer, the output-row selection): such a
  layer is written with a zero FFN of width 256 (counted in the parameters).

The folder carries its own ``configuration_decilm.py`` + ``modeling_decilm.py`` (+ the
cache shim), with ``auto_map``, for ``transformers`` (no native class) and vLLM's
``--trust-remote-code`` config loading. See ``streamprune/modeling/modeling_decilm.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..storage import atomic
from ..errors import ConfigError, OutputError
from ..modeling import DECILM_AUTO_MAP, DECILM_FILES
from ..modeling.configuration_decilm import ffn_mult_to_intermediate_size
from ..spec import LayerSpec

FORMAT = "nemotron-nas"
FFN_MULTIPLE = 256
ZERO_FFN_WIDTH = 256  # the width of the zero FFN written for llama.cpp (see module docstring)
SERVABLE_HINT = "prune with a method that produces the servable structure: --method cascade --option structure=servable"


def intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """FFN width the engines compute from ``ffn_mult`` (vLLM's ``_ffn_mult_to_intermediate_size``)."""
    return ffn_mult_to_intermediate_size(ffn_mult, hidden_size)


def ffn_mult_for(width: int, hidden_size: int) -> float:
    """The ``ffn_mult`` that gives FFN width ``width`` (> 0, a multiple of 256) in every
    engine: ``intermediate_size(m)`` and ``intermediate_size(round(m, 6))`` (mlx-lm rounds)
    both equal ``width``. Prefers ``3*width/(2*hidden)`` to 6 decimals (as NVIDIA's
    configs read); falls back to the middle of the interval that rounds up to ``width``."""
    if width <= 0 or width % FFN_MULTIPLE:
        raise ValueError(f"FFN width {width} is not a positive multiple of {FFN_MULTIPLE}")
    for target in (width, width - FFN_MULTIPLE / 2):
        m = round(3 * target / (2 * hidden_size), 6)
        if intermediate_size(m, hidden_size) == width and intermediate_size(round(m, 6), hidden_size) == width:
            return float(m)
    raise AssertionError(f"no 6-decimal ffn_mult gives width {width} at hidden {hidden_size}")  # hidden > ~10^8


def _get(cfg, name: str, default=None):
    """A field of a config given as a dict (config.json) or a transformers config object."""
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _head_dim(cfg) -> int:
    return _get(cfg, "head_dim") or _get(cfg, "hidden_size") // _get(cfg, "num_attention_heads")


def check_block(spec: LayerSpec) -> None:
    """Raise :class:`~streamprune.errors.ConfigError` (one line) if the block kind has norms the
    nemotron-nas schema has no place for: q/k norms (Qwen3, OLMo 2), post-norms (OLMo 2)."""
    if spec.qk_norm != "none":
        where = "each head's" if spec.qk_norm == "head" else "the whole projection's"
        raise ConfigError(f"qk_norm={spec.qk_norm!r} (an RMSNorm over {where} queries and keys before RoPE) has no place in "
                          "nemotron-nas (DeciLM blocks have none): use --format streamprune")
    if spec.norm_placement != "pre":
        raise ConfigError(f"norm_placement={spec.norm_placement!r} (norms on the attention and FFN outputs) has no place in "
                          "nemotron-nas (DeciLM blocks normalise their inputs): use --format streamprune")


def check_fits(specs: list[LayerSpec], source_cfg) -> None:
    """Raise :class:`~streamprune.errors.ConfigError` (one line: the first layer and field
    that does not fit, what to do) unless every layer of ``specs`` can be written as
    nemotron-nas. ``source_cfg``: the model's config (dict or transformers config)."""
    for spec in specs[:1]:  # the block kind is the model's
        check_block(spec)
    d, heads = _get(source_cfg, "hidden_size"), _get(source_cfg, "num_attention_heads")
    hd = _head_dim(source_cfg)
    if d % heads or hd != d // heads:
        raise ConfigError(f"head_dim={hd} (nemotron-nas engines use hidden_size/num_attention_heads = {d}/{heads}); this model cannot be written as nemotron-nas")
    if _get(source_cfg, "sliding_window") is not None:
        raise ConfigError(f"sliding_window={_get(source_cfg, 'sliding_window')} (nemotron-nas has no sliding-window attention); this model cannot be written as nemotron-nas")
    if not specs:
        raise ConfigError("the model has no layers")
    low_rank = "low-rank factors cannot be stored in nemotron-nas"
    for i, s in enumerate(specs):
        def bad(field: str, why: str, fix: str = SERVABLE_HINT) -> ConfigError:
            return ConfigError(f"layer {i}: {field}={getattr(s, field)} ({why}; {fix})")

        if s.hidden_size != d:
            raise bad("hidden_size", f"the model's hidden_size is {d}", "the layer spec is inconsistent")
        if s.num_heads:
            for p in ("q", "k", "v", "o"):
                if s.rank(p) is not None:
                    raise bad(f"{p}_rank", low_rank)
            if s.num_heads != heads:
                raise bad("num_kv_heads", f"{s.num_kv_heads} KV groups x {s.heads_per_group} heads = {s.num_heads} query heads; nemotron-nas keeps all {heads} query heads of a layer that has attention")
            if s.head_dim != hd:
                raise bad("head_dim", f"nemotron-nas head_dim is {hd}")
            if s.v_head_dim != hd:
                raise bad("v_head_dim", f"nemotron-nas value heads have head_dim {hd}")
        else:
            if i == 0:
                raise bad("num_kv_heads", "vLLM and mlx-lm need attention in layer 0")
            if s.o_bias:
                raise bad("o_bias", "an o_proj bias without attention cannot be stored in nemotron-nas")
        if s.intermediate_size % FFN_MULTIPLE:
            raise bad("intermediate_size", f"nemotron-nas FFN widths are multiples of {FFN_MULTIPLE}")
        if s.down_bias:
            raise bad("down_bias", "a down_proj bias cannot be stored in nemotron-nas (mlp_bias would bias gate and up too)")
        if s.bypass_rank:
            raise bad("bypass_rank", f"the LC bypass is a {low_rank}")


def written_widths(specs: list[LayerSpec]) -> list[int]:
    """The FFN width written per layer: the spec's, or :data:`ZERO_FFN_WIDTH` (zeros) for a
    layer that keeps attention without FFN, and for a last layer that keeps neither
    (llama.cpp's graph, module docstring)."""
    out = []
    for i, s in enumerate(specs):
        needs_ffn = s.intermediate_size == 0 and (s.num_heads > 0 or i == len(specs) - 1)
        out.append(ZERO_FFN_WIDTH if needs_ffn else s.intermediate_size)
    return out


def attention_bias(specs: list[LayerSpec]) -> bool:
    """Whether the folder's ``attention_bias`` is set (any attention layer has a bias)."""
    return any(s.num_heads and (s.qkv_bias or s.o_bias) for s in specs)


def block_configs(specs: list[LayerSpec], hidden_size: int) -> list[dict]:
    """One ``block_configs`` entry per layer (the written widths of :func:`written_widths`)."""
    out = []
    for s, width in zip(specs, written_widths(specs)):
        out.append({
            "attention": {"n_heads_in_group": s.heads_per_group if s.num_heads else None, "no_op": not s.num_heads, "replace_with_linear": False},
            "ffn": {"ffn_mult": ffn_mult_for(width, hidden_size) if width else None, "no_op": not width, "replace_with_linear": False},
        })
    return out


def _rope(source_cfg) -> tuple[dict, float, dict | None]:
    """(rope_parameters, rope_theta, rope_scaling) from either form in the source config."""
    params = _get(source_cfg, "rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    if not params:
        scaling = _get(source_cfg, "rope_scaling") or {}
        params = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), **scaling, "rope_theta": _get(source_cfg, "rope_theta", 10000.0)}
        params.pop("type", None)
    params = dict(params)
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = _get(source_cfg, "rope_theta", 10000.0)
    scaling = None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return params, float(params["rope_theta"]), scaling


def config_dict(source_cfg, specs: list[LayerSpec], dtype: str, tie_word_embeddings: bool | None = None) -> dict:
    """The nemotron-nas ``config.json`` for a model of ``specs`` from ``source_cfg`` (dict
    or transformers config): Llama-3-era keys at the top level and transformers 5's
    ``rope_parameters``, ``block_configs``, ``auto_map``. ``dtype``: e.g. ``"bfloat16"``."""
    check_fits(specs, source_cfg)
    d, heads = _get(source_cfg, "hidden_size"), _get(source_cfg, "num_attention_heads")
    rope_parameters, rope_theta, rope_scaling = _rope(source_cfg)
    widths = written_widths(specs)
    tie = bool(_get(source_cfg, "tie_word_embeddings", False)) if tie_word_embeddings is None else tie_word_embeddings
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": FORMAT,
        "auto_map": dict(DECILM_AUTO_MAP),
        "block_configs": block_configs(specs, d),
        "hidden_size": d,
        "num_attention_heads": heads,
        "num_key_value_heads": _get(source_cfg, "num_key_value_heads") or heads,
        "head_dim": _head_dim(source_cfg),
        "num_hidden_layers": len(specs),
        "intermediate_size": max(widths) or _get(source_cfg, "intermediate_size"),  # informational: block_configs rule
        "vocab_size": _get(source_cfg, "vocab_size"),
        "max_position_embeddings": _get(source_cfg, "max_position_embeddings"),
        "hidden_act": _get(source_cfg, "hidden_act", "silu"),
        "rms_norm_eps": _get(source_cfg, "rms_norm_eps"),
        "initializer_range": _get(source_cfg, "initializer_range", 0.02),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": attention_bias(specs),
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": _get(source_cfg, "bos_token_id"),
        "eos_token_id": _get(source_cfg, "eos_token_id"),
        "pad_token_id": _get(source_cfg, "pad_token_id"),
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def write_config(folder: str | Path, source_cfg, specs: list[LayerSpec], dtype: str, tie_word_embeddings: bool | None = None) -> dict:
    """Write ``config.json`` (:func:`config_dict`) and the remote-code files into ``folder``
    (atomically, file by file); returns the config dict."""
    folder = Path(folder)
    cfg = config_dict(source_cfg, specs, dtype, tie_word_embeddings)
    atomic.write_bytes(folder / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    for f in DECILM_FILES:
        atomic.write_bytes(folder / f.name, f.read_bytes())
    return cfg


def layer_tensors(spec: LayerSpec, tensors: dict[str, torch.Tensor], width: int, with_bias: bool) -> dict[str, torch.Tensor]:
    """A fitting layer's tensors (names relative to ``model.layers.{i}.``, as in
    :meth:`LayerSpec.tensor_shapes`) -> its nemotron-nas tensors: no norm or weight of a
    no-op sub-block, zero biases where ``with_bias`` (``attention_bias``) and the spec has
    none, a zero FFN of ``width`` where the spec has none."""
    out: dict[str, torch.Tensor] = {}
    ref = next(iter(tensors.values())) if tensors else torch.zeros(0)
    d = spec.hidden_size
    if spec.num_heads:
        out["input_layernorm.weight"] = tensors["input_layernorm.weight"]
        for p in ("q", "k", "v", "o"):
            w = tensors[f"self_attn.{p}_proj.weight"]
            out[f"self_attn.{p}_proj.weight"] = w
            if with_bias:
                out[f"self_attn.{p}_proj.bias"] = tensors.get(f"self_attn.{p}_proj.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    if width:
        out["post_attention_layernorm.weight"] = tensors.get("post_attention_layernorm.weight", torch.ones(d, dtype=ref.dtype))
        if spec.intermediate_size:
            for p in ("gate", "up", "down"):
                out[f"mlp.{p}_proj.weight"] = tensors[f"mlp.{p}_proj.weight"]
        else:  # the zero FFN llama.cpp needs: act(0) * 0 = 0
            out["mlp.gate_proj.weight"] = torch.zeros(width, d, dtype=ref.dtype)
            out["mlp.up_proj.weight"] = torch.zeros(width, d, dtype=ref.dtype)
            out["mlp.down_proj.weight"] = torch.zeros(d, width, dtype=ref.dtype)
    return out


def _staging_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-export-{os.getpid()}")


def export(in_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> dict:
    """Convert the model folder ``in_dir`` (a streamprune output, a dense Llama-family
    checkpoint, or a nemotron-nas folder; safetensors only, never unpickled) into a
    nemotron-nas folder ``out_dir``, one layer in memory at a time.

    Refuses a model that does not fit (:func:`check_fits`) before writing anything, and an
    existing non-empty ``out_dir``. Writes one safetensors file per layer (none for a layer
    without tensors) + ``model-outer.safetensors`` + the index, config, remote-code,
    tokenizer and generation files into a temp folder beside ``out_dir``, renamed into place
    at the end. ``dtype`` (e.g. ``"bfloat16"``): cast the weights; default: keep them.
    Returns ``{"out", "format", "params", "files", "bytes", "layers"}``.
    """
    from ..adapters import open_model
    from ..storage.writer import OUTER_FILE, TOKENIZER_FILES, layer_file

    in_dir, out = Path(in_dir), Path(out_dir).resolve()
    adapter = open_model(in_dir)
    specs, source = adapter.specs, adapter.reader.config_dict
    check_fits(specs, source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output folder {str(out)!r} exists and is not empty; choose another OUT or remove it")
    cast = getattr(torch, dtype) if dtype else None
    if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
        raise ConfigError(f"--dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    widths, bias = written_widths(specs), attention_bias(specs)
    staging = _staging_for(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        params = nbytes = 0  # parameters, tensor bytes (the index's total_size)
        out_dtype = None
        for i, spec in enumerate(specs):
            tensors = layer_tensors(spec, adapter.read_layer(i), widths[i], bias)
            if cast is not None:
                tensors = {k: v.to(cast) for k, v in tensors.items()}
            if not tensors:
                continue
            named = {f"model.layers.{i}.{k}": v for k, v in sorted(tensors.items())}
            atomic.write_safetensors(staging / layer_file(i), named, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(named, layer_file(i)))
            params += sum(v.numel() for v in named.values())
            nbytes += sum(v.numel() * v.element_size() for v in named.values())
            out_dtype = out_dtype or next(iter(named.values())).dtype
            del tensors, named
        outer = {k: (v.to(cast) if cast is not None else v) for k, v in adapter.read_outer().items()}
        atomic.write_safetensors(staging / OUTER_FILE, outer, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(outer, OUTER_FILE))
        params += sum(v.numel() for v in outer.values())
        nbytes += sum(v.numel() * v.element_size() for v in outer.values())
        out_dtype = out_dtype or next(iter(outer.values())).dtype
        del outer
        atomic.write_json(staging / "model.safetensors.index.json",
                          {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))})
        write_config(staging, source, specs, str(out_dtype).removeprefix("torch."), tie_word_embeddings=adapter.tied)
        for name in TOKENIZER_FILES:
            if (in_dir / name).is_file():
                atomic.write_bytes(staging / name, (in_dir / name).read_bytes())
        files = sorted(p.name for p in staging.iterdir())
        if out.exists():
            out.rmdir()  # empty (checked above)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": str(out), "format": FORMAT, "params": int(params), "files": len(files),
            "bytes": int(sum((out / f).stat().st_size for f in files)), "layers": len(specs)}

