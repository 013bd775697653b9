"""Write a random Llama-family checkpoint with the exact shapes of a named model (a script).

    python benchmarks/make_synthetic.py --config llama-2-70b --layers 4 --out /data/syn70b
    python benchmarks/make_synthetic.py --config smollm2 --layers 4 --out /tmp/syn-smol
    python benchmarks/make_synthetic.py --config custom --hidden 512 --intermediate 1408 \\
        --heads 8 --kv-heads 2 --layers 8 --vocab 4096 --out /tmp/syn-custom

The folder is what ``streamprune prune`` reads: ``model.safetensors.index.json`` + one
shard per decoder layer + one shard for embeddings / final norm / lm_head, ``config.json``
(``LlamaConfig``) and a tokenizer. Weights are N(0, 1/in_features) (so a layer neither
blows up nor vanishes the residual stream), norms are 1. They are generated and written
**one layer at a time**: peak memory is one layer (+ one row block of fp32 scratch),
never the model. Each tensor has its own seeded generator (seed, tensor name), so layer
``i`` has the same bytes whatever ``--layers`` is.

The tokenizer is a small byte-level BPE trained in-process on the bundled WikiText-2 text
(``--tokenizer-vocab``, default 512): it can encode any calibration text, and the config's
``vocab_size`` (``--vocab``, default the named model's) must be at least its size. Shrinking
``--vocab`` saves disk (Llama-3's 128256 × 4096 embedding is 1 GiB in bf16) without
changing a decoder layer; rows past the tokenizer's size are never looked up.

Prints one JSON line last (folder, shapes, bytes written, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

# Shapes of the real models (from their Hugging Face config.json files).
PRESETS: dict[str, dict] = {
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        num_hidden_layers=80, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, head_dim=128,
                        vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        num_hidden_layers=40, tie_word_embeddings=False),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       num_hidden_layers=32, tie_word_embeddings=False),
    # Llama-3.1-8B: the llama3 rope scaling (factor 8 over an 8192 original context).
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192},
                       num_hidden_layers=32, tie_word_embeddings=False),
    # SmolLM2-135M.
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    num_hidden_layers=30, tie_word_embeddings=True),
    # Starting point for --config custom; every field can be overridden by a flag.
    "custom": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, head_dim=None,
                   vocab_size=4096, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                   num_hidden_layers=8, tie_word_embeddings=False),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Rows of one tensor generated at a time (fp32 scratch = BLOCK_ELEMENTS * 4 bytes).
BLOCK_ELEMENTS = 1 << 24
DATA = Path(__file__).resolve().parents[1] / "streamprune" / "data" / "wikitext2" / "test.txt"


def model_config(name: str, **overrides) -> dict:
    """The preset's fields with the non-None ``overrides`` applied; head_dim defaults to d / H."""
    if name not in PRESETS:
        raise SystemExit(f"unknown --config {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if cfg["head_dim"] is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise SystemExit(f"--heads {cfg['num_attention_heads']} must be a multiple of --kv-heads {cfg['num_key_value_heads']}")
    return cfg


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name (relative to ``model.layers.{i}.``) -> shape, HF Llama layout (out, in)."""
    d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }


def outer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    v, d = cfg["vocab_size"], cfg["hidden_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, gen_device: str = "cpu") -> torch.Tensor:
    """Norm vectors are ones; matrices N(0, 1/in) from a generator seeded by (seed, name),
    filled in row blocks so the fp32 scratch stays small whatever the target dtype.

    ``gen_device="cuda"`` draws the blocks on the GPU (CPU ``randn`` is one thread: ~1 min
    for four 70B layers) and copies them to the host; other numbers than on the CPU, but
    the same on every run and whatever the depth."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    rows, cols = shape
    out = torch.empty(shape, dtype=dtype)
    gen = torch.Generator(device=gen_device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    step = max(1, BLOCK_ELEMENTS // cols)
    std = 1.0 / math.sqrt(cols)
    for r in range(0, rows, step):
        block = torch.randn(min(step, rows - r), cols, generator=gen, device=gen_device)  # (rows', in) fp32
        out[r : r + block.shape[0]] = block.mul_(std).to(dtype).cpu()
    return out


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the bundled WikiText-2 text (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = DATA.read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def write_config(folder: Path, cfg: dict, dtype: torch.dtype, eos_id: int) -> None:
    from transformers import LlamaConfig

    fields = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    if "rope_scaling" in cfg:
        fields["rope_scaling"] = dict(cfg["rope_scaling"])
    config = LlamaConfig(**fields, bos_token_id=eos_id, eos_token_id=eos_id, dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)


def write_checkpoint(folder: str | Path, cfg: dict, layers: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     tokenizer_vocab: int = 512, log=print, gen_device: str = "cpu", resume: bool = False) -> dict:
    """Write the checkpoint into ``folder`` one shard at a time; returns a summary dict.
    ``resume``: keep the whole shards already in ``folder`` (same shapes and seed assumed)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "num_hidden_layers": layers}
    tokenizer = train_tokenizer(tokenizer_vocab)
    if cfg["vocab_size"] < len(tokenizer):
        raise SystemExit(f"--vocab {cfg['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens); raise --vocab or lower --tokenizer-vocab")
    tokenizer.save_pretrained(folder)
    write_config(folder, cfg, dtype, tokenizer.eos_token_id)

    n_shards = layers + 1
    shard = lambda k: f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    total = 0

    def write(k: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """Shard k, unless a complete one is there already (shards are written to a temporary
        name and renamed, so a shard under its final name is whole: a killed run resumes)."""
        nonlocal total
        path = folder / shard(k)
        if resume and path.is_file():
            for name, s in shapes.items():
                weight_map[name] = shard(k)
                total += math.prod(s) * torch.finfo(dtype).bits // 8
            return
        tensors = {name: random_tensor(name, s, dtype, seed, gen_device) for name, s in shapes.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        for name, t in tensors.items():
            weight_map[name] = shard(k)
            total += t.numel() * t.element_size()

    write(0, outer_shapes(cfg))
    for i in range(layers):
        prefix = f"model.layers.{i}."
        write(i + 1, {prefix + n: s for n, s in layer_shapes(cfg).items()})
        log(f"  layer {i + 1}/{layers} written ({(folder / shard(i + 1)).stat().st_size / 2**20:.1f} MiB)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = folder / "model.safetensors.index.json.tmp"  # the index last, whole or absent: it marks a complete folder
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, folder / "model.safetensors.index.json")
    layer_bytes = sum(math.prod(s) for s in layer_shapes(cfg).values()) * torch.finfo(dtype).bits // 8
    return {
        "folder": str(folder),
        "layers": layers,
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"],
        "tokenizer_size": len(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
        "layer_bytes": layer_bytes,
        "total_bytes": total,
        "gen_device": gen_device,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose a model's shapes (shared with bench_layers / bench_memory)."""
    p.add_argument("--config", default="custom", choices=sorted(PRESETS), help="named shapes (default custom)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers to write (default 4)")
    p.add_argument("--vocab", type=int, default=None, help="vocab_size (default the named model's); shrink to save disk")
    p.add_argument("--hidden", type=int, default=None, help="hidden size d (overrides the preset)")
    p.add_argument("--intermediate", type=int, default=None, help="FFN width f (overrides the preset)")
    p.add_argument("--heads", type=int, default=None, help="attention heads H (overrides the preset)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads G (overrides the preset)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim h (default d / H for custom)")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie lm_head to the embedding")
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--max-position", type=int, default=None, help="max_position_embeddings")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="storage dtype (default bf16)")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--tokenizer-vocab", type=int, default=512, help="size of the byte-level BPE tokenizer (default 512)")


def config_from_args(a: argparse.Namespace) -> dict:
    if a.layers <= 0:
        raise SystemExit(f"--layers must be > 0, got {a.layers}")
    return model_config(a.config, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                        tie_word_embeddings=a.tie, rope_theta=a.rope_theta, max_position_embeddings=a.max_position)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--gen-device", default="cpu", help="device that draws the random weights (cuda: much faster "
                   "for 70B shapes; other numbers than cpu)")
    add_shape_args(p)
    return p


def main() -> None:
    a = build_parser().parse_args()
    cfg = config_from_args(a)
    print(f"writing {a.config} shapes (d {cfg['hidden_size']}, f {cfg['intermediate_size']}, H {cfg['num_attention_heads']}, "
          f"G {cfg['num_key_value_heads']}, h {cfg['head_dim']}, vocab {cfg['vocab_size']}) x {a.layers} layers to {a.out}")
    summary = write_checkpoint(a.out, cfg, a.layers, DTYPES[a.dtype], a.seed, a.tokenizer_vocab, gen_device=a.gen_device)
    print(f"{summary['total_bytes'] / 2**20:.1f} MiB in {a.layers + 1} shards, {summary['seconds']} s")
    print(json.dumps({"config": a.config, **summary}, sort_keys=True))


if __name__ == "__main__":
    main()
