"""The tokenizer part of a llama.cpp GGUF, from a Hugging Face ``tokenizer.json`` folder.

Two kinds, told apart by ``tokenizer.json`` itself (llama.cpp's converter picks by model
family instead; its ``DeciModel.set_vocab`` even keys on ``vocab_size == 128256``):

- byte-level BPE (GPT-2 style: SmolLM2, Llama-3, Qwen2): ``tokenizer.ggml.model = gpt2``,
  tokens and token types as ``TextModel.get_vocab_base`` makes them, the merges, and
  ``tokenizer.ggml.pre`` found like ``get_vocab_base_pre`` does, by the hash of the check
  string's ids (:mod:`streamprune.formats.gguf_pretok`);
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral): ``tokenizer.ggml.model =
  llama``, scores and types from ``gguf.LlamaHfVocab`` (``_set_vocab_llama_hf``).

Special ids (bos/eos/unk/pad), ``add_bos_token``/``add_eos_token`` and the chat template
(``chat_template.jinja`` or ``tokenizer_config.json``) come from ``gguf.SpecialVocab``, which
reads ``tokenizer_config.json``, ``config.json`` and ``generation_config.json`` as the
converter does.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from streamprune.errors import CheckpointError
from streamprune.formats.gguf_pretok import CHECK_TEXT, PRE_BY_HASH


def tokenizer_kind(folder: Path) -> str:
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (BPE with byte fallback) from tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a GGUF needs the tokenizer; copy the source model's tokenizer files into {folder}")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF export (only BPE: byte-level or byte-fallback)")

    def has_bytelevel(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_bytelevel(n) for key in ("pretokenizers", "decoders") for n in node.get(key) or [])

    if has_bytelevel(tok.get("pre_tokenizer")) or has_bytelevel(tok.get("decoder")):
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    raise CheckpointError(f"{path}: a BPE tokenizer with neither a ByteLevel pre-tokenizer nor byte_fallback; no GGUF tokenizer model fits it")


def bpe_pre_name(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer (``get_vocab_base_pre``)."""
    chkhsh = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    try:
        return PRE_BY_HASH[chkhsh]
    except KeyError:
        raise CheckpointError(
            f"llama.cpp does not know this tokenizer's pre-tokenizer (check hash {chkhsh}); "
            "llama.cpp's convert_hf_to_gguf_update.py must learn it first"
        ) from None


def _looks_special(text: str) -> bool:
    # TextModel.does_token_look_special
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types as ``TextModel.get_vocab_base`` makes them."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"the tokenizer has id {max(vocab.values())} but config.json says vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Write the tokenizer keys of ``folder`` into ``writer``; returns the tokenizer model."""
    folder = Path(folder)
    kind = tokenizer_kind(folder)
    if kind == "gpt2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tokens, types = _bpe_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True)
    else:
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        if len(tokens) != vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but config.json says vocab_size {vocab_size}")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return kind
