"""Tiny random Llama-family checkpoints built in-process (unit tests, no downloads).

``make_tiny_model(folder, arch)`` writes a sharded safetensors checkpoint (>= 3 shards,
with ``model.safetensors.index.json``), its config and a small byte-level BPE tokenizer
trained on the bundled WikiText-2 text.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "streamprune" / "data"


@functools.lru_cache(maxsize=1)
def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (DATA / "wikitext2" / "test.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128, tie: bool = False,
                **extra):
    """``extra``: further fields of the architecture's config (e.g. Qwen3's ``head_dim``)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config, "olmo2": Olmo2Config,
           "phi3": Phi3Config, "gemma3_text": Gemma3TextConfig}[arch]
    return cls(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        **extra,
    )


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, shards: int = 3, random_norms: bool = False, **kw) -> Path:
    """``random_norms``: norm weights drawn around 1 (else ones), so that a norm applied in the
    wrong place, or copied wrong, shows in the logits."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = tiny_config(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so layers matter for the logits
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
            elif "bias" in name:
                p.normal_(0, 0.02)
            elif random_norms and name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(total // (shards + 1), 1))
    tiny_tokenizer().save_pretrained(folder)
    return folder


def real_shapes():
    """Shapes of real models the planning tests use (no weights): SmolLM2-135M (the demo),
    LLaMA-7B, LLaMA-2-70B."""
    from streamprune.shapes import ModelShapes

    return {
        "smollm2": ModelShapes(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                               head_dim=64, vocab_size=49152, tie_word_embeddings=True),
        "llama-7b": ModelShapes(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                                head_dim=128, vocab_size=32000, tie_word_embeddings=False),
        "llama-2-70b": ModelShapes(num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                                   head_dim=128, vocab_size=32000, tie_word_embeddings=False),
    }


def pruned_on_first_use(source: Path, root: Path, ratio: float, **calib):
    """``get(method)`` -> (output folder, report) of a ``ratio`` prune of ``source`` under ``root``,
    made the first time it is asked for (a module fixture's cache)."""
    from streamprune import PruneConfig, prune

    done: dict = {}

    def get(method: str):
        if method not in done:
            out = root / method
            done[method] = out, prune(PruneConfig(source=source, out=out, method=method, ratio=ratio, **calib))
        return done[method]

    return get
