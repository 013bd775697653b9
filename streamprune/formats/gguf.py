"""A llama.cpp ``deci`` GGUF from a nemotron-nas folder, written one tensor at a time.

llama.cpp's ``deci`` architecture (``src/models/deci.cpp``) is the runtime for NVIDIA's
Nemotron-NAS (DeciLM) models: every layer has its own query-head, KV-head and FFN width,
given as the per-layer arrays ``deci.attention.head_count``, ``deci.attention.head_count_kv``
and ``deci.feed_forward_length``. A layer with ``head_count == 0`` has no attention (its
input goes straight to the FFN), one with ``feed_forward_length == 0`` no FFN. This module
writes the metadata that llama.cpp's converter (``conversion/deci.py``, ``DeciModel``)
writes for a ``block_configs`` model, with the tensor types of ``ModelBase.prepare_tensors``:

- norms, biases and every 1-D tensor stay F32; the other weights get the file type; a
  Q8_0 weight whose rows are not a multiple of 32 falls back to F16 (as the converter's
  ``QuantError`` branch does);
- ``q_proj``/``k_proj`` weights and biases are permuted from Hugging Face's rotate-half
  order to llama.cpp's pairwise RoPE order (``DeciModel.permute``).

Two places where this writer departs from the converter, both because llama.cpp's graph
needs it:

- a layer that keeps attention but drops the FFN gets a zero FFN of width 256 (ones for
  its norm, zeros for gate/up/down: it adds exactly 0). ``deci.cpp``'s ``if (n_ff == 0)
  continue;`` skips the ``inpL = cur`` that carries the attention output to the next layer,
  so an attention-only layer would be silently dropped (it is right only for layers with
  neither part, the Ultra-253B "dummy" layers);
- layer 0 must keep attention: llama.cpp reads the head size from ``n_head(0)``.

A 70B never has to fit in RAM: the tensor infos are planned from the safetensors headers,
the header is written, then each tensor is read, converted and appended, and freed.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from safetensors import safe_open

from streamprune.storage.atomic import replacing
from streamprune.errors import CheckpointError, ConfigError
from streamprune.formats.gguf_vocab import add_vocab

# --type → (general.file_type, type of the weights that are not kept in F32)
GGUF_TYPES: dict[str, tuple[LlamaFileType, Q]] = {
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
ZERO_FFN_WIDTH = 256  # see the module docstring; a multiple of 256 keeps k-quants possible
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_FFN = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass(frozen=True)
class DeciBlock:
    """One layer as llama.cpp sees it. ``zero_ffn``: the FFN is absent in the folder and
    written as zeros of width ``n_ff`` (attention kept, FFN dropped)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    zero_ffn: bool = False


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """DeciLM's ``_ffn_mult_to_intermediate_size``: int(2 m h / 3) rounded up to 256."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def deci_blocks(config: dict) -> list[DeciBlock]:
    """The per-layer head counts and FFN widths of a nemotron-nas config (``block_configs``),
    or of a plain dense Llama/Qwen2/Mistral config (every layer alike)."""
    heads = config["num_attention_heads"]
    if "block_configs" not in config:
        kv = config.get("num_key_value_heads") or heads
        return [DeciBlock(heads, kv, config["intermediate_size"]) for _ in range(config["num_hidden_layers"])]
    blocks = []
    for i, bc in enumerate(config["block_configs"]):
        attn, ffn = bc["attention"], bc["ffn"]
        if attn.get("replace_with_linear") or ffn.get("replace_with_linear"):
            raise ConfigError(f"layer {i}: replace_with_linear blocks are not supported by the GGUF export")
        if attn.get("no_op") or attn.get("n_heads_in_group") is None:
            n_head = n_kv = 0
        else:
            n_head, n_kv = heads, heads // attn["n_heads_in_group"]
        n_ff = 0 if ffn.get("no_op") or ffn.get("ffn_mult") is None else ffn_width(ffn["ffn_mult"], config["hidden_size"])
        zero = n_ff == 0 and n_head > 0
        blocks.append(DeciBlock(n_head, n_kv, ZERO_FFN_WIDTH if zero else n_ff, zero))
    if len(blocks) != config["num_hidden_layers"]:
        raise ConfigError(f"config.json has {len(blocks)} block_configs for num_hidden_layers={config['num_hidden_layers']}")
    if blocks and blocks[0].n_head == 0:
        raise ConfigError("layer 0 has no attention: llama.cpp's deci reads the head size from layer 0; keep its attention")
    return blocks


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head * d, ...) rows from rotate-half order to pairwise order (``DeciModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple[int, ...], weight_type: Q) -> Q:
    """The GGUF type of one tensor under ``weight_type`` (``prepare_tensors``' rules)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if shape[-1] % block:
        return Q.F16
    return weight_type


def llama3_rope_factors(config: dict, rope: dict) -> np.ndarray:
    """``rope_freqs.weight`` for rope_type llama3 (``DeciModel.generate_extra_tensors``)."""
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor: from ``source`` (an HF name) or ``fill`` ("zeros", "ones", an array)."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: Q
    source: str | None = None
    permute_heads: int = 0
    fill: object = None


def _rope_parameters(config: dict) -> dict:
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _plan(config: dict, blocks: list[DeciBlock], shapes: dict[str, tuple[int, ...]], weight_type: Q) -> list[_Planned]:
    """Every GGUF tensor in file order, checked against the folder's tensor shapes."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    plan: list[_Planned] = []
    used: set[str] = set()

    def take(src: str, dst: str, expect: tuple[int, ...], permute: int = 0) -> None:
        if src not in shapes:
            raise CheckpointError(f"{src} is missing from the folder's index (config.json's block_configs say it exists)")
        if tuple(shapes[src]) != expect:
            raise CheckpointError(f"{src} has shape {tuple(shapes[src])}, config.json says {expect}")
        used.add(src)
        plan.append(_Planned(dst, expect, tensor_type(dst, expect, weight_type), source=src, permute_heads=permute))

    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) == "llama3":
        factors = llama3_rope_factors(config, rope)
        plan.append(_Planned("rope_freqs.weight", factors.shape, Q.F32, fill=factors))
    take("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))
    for i, b in enumerate(blocks):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        if b.n_head:
            take(p + "input_layernorm.weight", g + "attn_norm.weight", (hidden,))
            rows = {"q_proj": b.n_head * head_dim, "k_proj": b.n_head_kv * head_dim, "v_proj": b.n_head_kv * head_dim}
            perm = {"q_proj": b.n_head, "k_proj": b.n_head_kv}
            for hf, gg in _ATTN.items():
                w_shape = (hidden, b.n_head * head_dim) if hf == "o_proj" else (rows[hf], hidden)
                take(p + f"self_attn.{hf}.weight", g + f"{gg}.weight", w_shape, perm.get(hf, 0))
                if p + f"self_attn.{hf}.bias" in shapes:
                    take(p + f"self_attn.{hf}.bias", g + f"{gg}.bias", (w_shape[0],), perm.get(hf, 0))
        if b.zero_ffn:
            plan.append(_Planned(g + "ffn_norm.weight", (hidden,), Q.F32, fill="ones"))
            for gg, shape in (("ffn_gate", (b.n_ff, hidden)), ("ffn_up", (b.n_ff, hidden)), ("ffn_down", (hidden, b.n_ff))):
                plan.append(_Planned(g + f"{gg}.weight", shape, tensor_type(g + f"{gg}.weight", shape, weight_type), fill="zeros"))
        elif b.n_ff:
            take(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", (hidden,))
            for hf, gg in _FFN.items():
                shape = (hidden, b.n_ff) if hf == "down_proj" else (b.n_ff, hidden)
                take(p + f"mlp.{hf}.weight", g + f"{gg}.weight", shape)
                if p + f"mlp.{hf}.bias" in shapes:
                    take(p + f"mlp.{hf}.bias", g + f"{gg}.bias", (shape[0],))
    take("model.norm.weight", "output_norm.weight", (hidden,))
    if "lm_head.weight" in shapes and not config.get("tie_word_embeddings", False):
        take("lm_head.weight", "output.weight", (vocab, hidden))
    left = sorted(set(shapes) - used - {"lm_head.weight"})
    left = [n for n in left if not n.endswith("rotary_emb.inv_freq")]
    if left:
        raise CheckpointError(f"tensors the GGUF export does not know where to put: {left[:5]}{' ...' if len(left) > 5 else ''}")
    return plan


def _metadata(writer: gguf.GGUFWriter, folder: Path, config: dict, blocks: list[DeciBlock], ftype: LlamaFileType) -> None:
    """The keys ``DeciModel.set_gguf_parameters`` writes for a ``block_configs`` model."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_name(folder.name)
    writer.add_type("model")
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF export (default, linear and llama3 are)")
    writer.add_head_count_kv([b.n_head_kv for b in blocks])
    writer.add_head_count([b.n_head for b in blocks])
    writer.add_feed_forward_length([b.n_ff for b in blocks])
    writer.add_block_count(len(blocks))
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes from the safetensors headers (no data read) and the shard of each."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    else:
        raise CheckpointError(f"{folder} has neither model.safetensors.index.json nor model.safetensors")
    shapes = {}
    for shard in sorted(set(where.values())):
        with safe_open(folder / shard, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes, where


def _data(t: _Planned, folder: Path, where: dict[str, str], handles: dict) -> np.ndarray:
    """One tensor's bytes as GGUF stores them (converted, permuted, quantized)."""
    if isinstance(t.fill, np.ndarray):
        arr = t.fill
    elif t.fill is not None:
        arr = (np.ones if t.fill == "ones" else np.zeros)(t.shape, dtype=np.float32)
    else:
        shard = where[t.source]
        if shard not in handles:
            handles[shard] = safe_open(folder / shard, framework="pt")
        arr = handles[shard].get_tensor(t.source).to(torch.float32).numpy()
        if t.permute_heads:
            arr = permute_rope(arr, t.permute_heads)
    return gguf.quants.quantize(np.ascontiguousarray(arr), t.qtype)


def write_gguf(folder: str | Path, out_file: str | Path, type: str = "f16", progress: bool = True) -> dict:
    """Write ``folder`` (nemotron-nas, or a dense Llama/Qwen2/Mistral safetensors folder with
    a tokenizer.json) as a llama.cpp ``deci`` GGUF at ``out_file``, atomically.

    ``type``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (norms, biases and 1-D tensors stay F32).
    Returns ``{"path", "bytes", "type", "n_tensors"}``.
    """
    folder, out_file = Path(folder), Path(out_file)
    if type not in GGUF_TYPES:
        raise ConfigError(f"--type {type!r}: choose one of {', '.join(GGUF_TYPES)}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing; give a nemotron-nas folder (streamprune export IN OUT --format nemotron-nas)")
    config = json.loads(cfg_path.read_text())
    model_type = config.get("model_type")
    if model_type not in ("nemotron-nas", "llama", "qwen2", "mistral"):
        raise ConfigError(
            f"{folder} is a {model_type!r} folder; the GGUF export reads nemotron-nas folders "
            "(convert a streamprune output with `streamprune export IN --gguf FILE`, which goes through nemotron-nas)"
        )
    ftype, weight_type = GGUF_TYPES[type]
    blocks = deci_blocks(config)
    shapes, where = _shapes(folder)
    plan = _plan(config, blocks, shapes, weight_type)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI])
    _metadata(writer, folder, config, blocks, ftype)
    add_vocab(writer, folder, config["vocab_size"])
    for t in plan:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))  # F32/F16 too: blocks of 1
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    handles: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc=f"gguf {type}", unit="tensor")
    with replacing(out_file) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(_data(t, folder, where, handles))
            if bar is not None:
                bar.update(1)
        writer.close()
    if bar is not None:
        bar.close()
    return {"path": str(out_file), "bytes": out_file.stat().st_size, "type": type, "n_tensors": len(plan)}


def export_gguf(src: str | Path, out_file: str | Path, type: str = "f16", progress: bool = True) -> dict:
    """``streamprune export SRC --gguf OUT_FILE``: a nemotron-nas (or dense Llama) folder is
    written directly; a streamprune output folder goes through
    ``streamprune.formats.nemotron_nas.export`` into a temp folder beside ``out_file`` first
    (it needs that much free disk: the model once more at its stored precision)."""
    src, out_file = Path(src), Path(out_file)
    cfg = src / "config.json"
    model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    if model_type != "streamprune":
        return write_gguf(src, out_file, type, progress)
    try:
        from streamprune.formats.nemotron_nas import export as nas_export
    except ImportError as e:
        raise ConfigError(f"{src} is a streamprune folder and this install has no nemotron-nas export to convert it first") from e
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=f".{out_file.name}.nas-") as tmp:
        nas = Path(tmp) / "nemotron-nas"
        nas_export(src, nas)
        info = write_gguf(nas, out_file, type, progress)
    return {**info, "via": "nemotron-nas"}
