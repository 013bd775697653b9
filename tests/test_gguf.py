"""llama.cpp itself runs the ``deci`` GGUFs that ``streamprune.formats.gguf`` writes, and
agrees with transformers.

Run: ``.venv/bin/pytest -q tests/test_gguf.py`` (needs the ``llamacpp`` extra,
``pip install -e '.[llamacpp]'``: a ~7.5 min llama.cpp compile on 2 cores, then a cached
wheel). Without ``llama_cpp`` the runtime tests FAIL, they never skip.

The nemotron-nas folders are written here (``write_nas_folder``) from a transformers
state dict and per-layer block choices; the reference for a folder is the same
transformers model with each layer's modules resized to its block (``reference_model``):
an attention-free layer's attention returns zeros, an FFN-free layer's MLP returns zeros.

Error measure: per window, ``max |llama.cpp - transformers| / max |transformers|`` over
all positions and vocabulary entries of the fp32 logits (4 WikiText-2 windows of 128).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamprune.inputs.demo_model import ensure_demo_model
from streamprune.errors import ConfigError
from streamprune.formats.gguf import deci_blocks, ffn_width, permute_rope, tensor_type, write_gguf

try:
    import llama_cpp
except ImportError:  # the runtime tests fail with this message; the unit tests still run
    llama_cpp = None

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SEQLEN, WINDOWS, GREEDY = 128, 4, 32


# ----------------------------------------------------------------- nemotron-nas folders
def slice_state(state: dict, config: dict, blocks: list[tuple[int | None, int | None]]) -> dict:
    """The state dict of a pruned structure: ``blocks[i] = (n_heads_in_group | None, ffn
    width | None)``. FFN: the first ``width`` channels. KV heads: fewer keep the first ones,
    more repeat each (so a smaller group is the same function)."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for i, (group, width) in enumerate(blocks):
        p = f"model.layers.{i}."
        layer = {k: v for k, v in state.items() if k.startswith(p)}
        for k, v in layer.items():
            if "self_attn" in k or "input_layernorm" in k:
                if group is None:
                    continue
                new_kv = heads // group
                if any(s in k for s in ("k_proj", "v_proj")) and new_kv != kv:
                    v = v.reshape(kv, hd, *v.shape[1:])
                    v = v[:new_kv] if new_kv < kv else v.repeat_interleave(new_kv // kv, dim=0)
                    v = v.reshape(new_kv * hd, *v.shape[2:])
            elif "mlp" in k or "post_attention_layernorm" in k:
                if width is None:
                    continue
                if "gate_proj" in k or "up_proj" in k:
                    v = v[:width]
                elif "down_proj.weight" in k:
                    v = v[:, :width]
            out[k] = v.contiguous()
    return out


def write_nas_folder(folder: Path, config: dict, state: dict, blocks: list[tuple[int | None, int | None]], tokenizer_dir: Path) -> Path:
    """A nemotron-nas folder: config.json with block_configs, 2 safetensors shards + index,
    the tokenizer files of ``tokenizer_dir``. ``state`` is already sliced to ``blocks``."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden = config["hidden_size"]
    block_configs = []
    for group, width in blocks:
        mult = None if width is None else 3 * width / (2 * hidden)
        assert mult is None or ffn_width(mult, hidden) == width, width
        block_configs.append({
            "attention": {"n_heads_in_group": group, "no_op": group is None, "replace_with_linear": False},
            "ffn": {"ffn_mult": mult, "no_op": width is None, "replace_with_linear": False},
        })
    keep = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim")
    nas = {k: config[k] for k in keep if k in config}
    rope = config.get("rope_parameters") or {}
    nas.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], block_configs=block_configs,
               rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)), rope_scaling=None,
               attention_bias=any(k.endswith("o_proj.bias") for k in state), mlp_bias=False, hidden_act="silu")
    (folder / "config.json").write_text(json.dumps(nas, indent=2))
    names = sorted(k for k in state if not (k == "lm_head.weight" and config.get("tie_word_embeddings")))
    half = len(names) // 2
    weight_map = {}
    for j, part in enumerate((names[:half], names[half:])):
        shard = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, folder / f)
    return folder


class _ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def reference_model(config_obj, state: dict, blocks: list[tuple[int | None, int | None]]):
    """transformers' own model class with each layer resized to its block, fp32, eager."""
    from transformers import AutoModelForCausalLM

    config_obj._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config_obj, dtype=torch.float32).eval()
    heads = config_obj.num_attention_heads
    hd = getattr(config_obj, "head_dim", None) or config_obj.hidden_size // heads
    for layer, (group, width) in zip(model.model.layers, blocks):
        attn, mlp = layer.self_attn, layer.mlp
        if group is None:
            layer.self_attn = _ZeroAttention()
        else:
            kv = heads // group
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name)
                setattr(attn, name, torch.nn.Linear(old.in_features, kv * hd, bias=old.bias is not None))
            attn.num_key_value_groups = group
        if width is None:
            layer.mlp = _ZeroMLP()
        else:
            h = mlp.gate_proj.in_features
            mlp.gate_proj, mlp.up_proj = torch.nn.Linear(h, width, bias=False), torch.nn.Linear(h, width, bias=False)
            mlp.down_proj = torch.nn.Linear(width, h, bias=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("layernorm" in k or k == "lm_head.weight" for k in missing), missing
    return model


# ----------------------------------------------------------------- comparison
def _require_llama_cpp():
    if llama_cpp is None:
        pytest.fail("llama_cpp is not importable: install the runtime with `.venv/bin/pip install -e '.[llamacpp]'` (compiles llama.cpp, ~7.5 min on 2 cores)")
    return llama_cpp


def _llama(path: Path, **kw):
    _require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=SEQLEN + GREEDY + 8, n_threads=2, verbose=False, **kw)


def _f32_kv():
    _require_llama_cpp()
    return dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, vocab)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ppl(logits: list[np.ndarray], windows: torch.Tensor) -> float:
    """Perplexity of per-window logits (the benchmark's own function: one definition)."""
    from test_benchmarks import bench

    return bench("gguf_export").ppl(logits, windows)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return ensure_demo_model(progress=False)


@pytest.fixture(scope="module")
def windows(demo_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    from streamprune.inputs.textdata import eval_windows, resolve_text_source

    tok = AutoTokenizer.from_pretrained(demo_dir)
    return eval_windows(tok, resolve_text_source("wikitext2"), SEQLEN, WINDOWS)  # (4, 128)


def check_against_transformers(gguf_f32: Path, model, windows: torch.Tensor, bound: float = 1e-3) -> list[np.ndarray]:
    """llama.cpp (f32 weights, f32 KV cache) against transformers fp32: logits and greedy text."""
    llm = _llama(gguf_f32, **_f32_kv())
    with torch.no_grad():
        ref = [model(w[None]).logits[0].numpy() for w in windows]
    got = [llama_logits(llm, w.tolist()) for w in windows]
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errs) <= bound, errs
    prompt = windows[0, :32].tolist()
    assert llama_greedy(llm, prompt, GREEDY) == hf_greedy(model, prompt, GREEDY)
    return ref


def _config_dict(config_obj) -> dict:
    return config_obj.to_dict()


# ----------------------------------------------------------------- unit tests (no llama.cpp)
def test_permute_rope_turns_rotate_half_into_pairs():
    # HF rotates (x[j], x[j + d/2]); llama.cpp's NORM RoPE rotates (x[2j], x[2j+1]).
    n_head, d = 3, 8
    w = torch.arange(n_head * d, dtype=torch.float32)[:, None].numpy()
    p = permute_rope(w, n_head)[:, 0].reshape(n_head, d)
    for h in range(n_head):
        for j in range(d // 2):
            assert (p[h, 2 * j], p[h, 2 * j + 1]) == (h * d + j, h * d + j + d // 2)


def test_deci_blocks_rules():
    cfg = {"num_attention_heads": 9, "num_hidden_layers": 4, "hidden_size": 576, "block_configs": [
        {"attention": {"n_heads_in_group": 3, "no_op": False}, "ffn": {"ffn_mult": 4.0, "no_op": False}},
        {"attention": {"n_heads_in_group": None, "no_op": True}, "ffn": {"ffn_mult": 2.0, "no_op": False}},
        {"attention": {"n_heads_in_group": 9, "no_op": False}, "ffn": {"ffn_mult": None, "no_op": True}},
        {"attention": {"n_heads_in_group": None, "no_op": True}, "ffn": {"ffn_mult": None, "no_op": True}},
    ]}
    b = deci_blocks(cfg)
    assert [(x.n_head, x.n_head_kv, x.n_ff, x.zero_ffn) for x in b] == [
        (9, 3, 1536, False), (0, 0, 768, False), (9, 1, 256, True), (0, 0, 0, False)]
    cfg["block_configs"][0]["attention"] = {"n_heads_in_group": None, "no_op": True}
    with pytest.raises(ConfigError, match="layer 0"):
        deci_blocks(cfg)
    assert ffn_width(1.3, 4096) == 3584  # int(3549.8) -> 3584, as DeciLM rounds


def test_tensor_types_follow_the_converter():
    from gguf import GGMLQuantizationType as Q

    assert tensor_type("blk.0.attn_norm.weight", (64,), Q.Q8_0) == Q.F32
    assert tensor_type("blk.0.attn_q.bias", (64,), Q.F16) == Q.F32
    assert tensor_type("blk.0.ffn_up.weight", (256, 64), Q.Q8_0) == Q.Q8_0
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), Q.Q8_0) == Q.F16  # rows not a multiple of 32
    assert tensor_type("token_embd.weight", (10, 64), Q.BF16) == Q.BF16


# ----------------------------------------------------------------- llama.cpp runtime
# 30 layers: FFN widths cycle over multiples of 256; no attention in 5, 11, 17; attention
# without FFN in 23 (written as a zero FFN); neither in 27; 1 KV head in 2, 9 in 3.
def _demo_blocks() -> list[tuple[int | None, int | None]]:
    widths = [1536, 1280, 1024, 768, 512, 256]
    blocks = [(3, widths[i % 6]) for i in range(30)]
    for i in (5, 11, 17):
        blocks[i] = (None, blocks[i][1])
    blocks[23], blocks[27], blocks[2], blocks[3] = (3, None), (None, None), (9, 1024), (1, 1536)
    return blocks


def _mild_blocks() -> list[tuple[int | None, int | None]]:
    """A structure that keeps the demo model a language model (PPL in the tens), for the
    Q8_0 perplexity bound (~96 against the dense 45 on these windows): every third FFN
    1280 wide, no attention in 28, 9 KV heads in 3."""
    blocks = [(3, 1536 if i % 3 else 1280) for i in range(30)]
    blocks[28], blocks[3] = (None, 1536), (1, 1536)
    return blocks


def _pruned_demo(demo_dir: Path, folder: Path, blocks):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config_obj = AutoConfig.from_pretrained(demo_dir)
    index = json.loads((demo_dir / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(demo_dir / shard)))
    sliced = slice_state(state, _config_dict(config_obj), blocks)
    write_nas_folder(folder, _config_dict(config_obj), sliced, blocks, demo_dir)
    return folder, reference_model(config_obj, sliced, blocks)


@pytest.mark.slow
def test_pruned_demo_model_runs_in_llama_cpp(demo_dir, windows, tmp_path):
    folder, model = _pruned_demo(demo_dir, tmp_path / "demo-nas", _demo_blocks())
    write_gguf(folder, tmp_path / "f32.gguf", "f32", progress=False)
    check_against_transformers(tmp_path / "f32.gguf", model, windows)
    reader = gguf.GGUFReader(tmp_path / "f32.gguf")
    arrays = {k: [int(reader.fields[k].parts[i][0]) for i in reader.fields[k].data]
              for k in ("deci.feed_forward_length", "deci.attention.head_count", "deci.attention.head_count_kv")}
    blocks = _demo_blocks()
    assert arrays["deci.feed_forward_length"] == [256 if w is None and g is not None else (w or 0) for g, w in blocks]
    assert arrays["deci.attention.head_count"] == [0 if g is None else 9 for g, _ in blocks]
    assert arrays["deci.attention.head_count_kv"] == [0 if g is None else 9 // g for g, _ in blocks]


@pytest.mark.slow
def test_pruned_demo_model_q8_0_perplexity(demo_dir, windows, tmp_path):
    folder, model = _pruned_demo(demo_dir, tmp_path / "demo-nas", _mild_blocks())
    write_gguf(folder, tmp_path / "q8.gguf", "q8_0", progress=False)
    llm = _llama(tmp_path / "q8.gguf")
    with torch.no_grad():
        ref = [model(w[None]).logits[0].numpy() for w in windows]
    q8 = [llama_logits(llm, w.tolist()) for w in windows]
    p_ref, p_q8 = ppl(ref, windows), ppl(q8, windows)
    assert p_ref < 200, p_ref  # still a language model, so 1 % means something
    assert abs(p_q8 / p_ref - 1) <= 0.01, (p_q8, p_ref)


def _tiny(arch: str, layers: int, tie: bool):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(arch, vocab_size=49152, hidden_size=64, intermediate_size=512, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so every layer shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
            elif "bias" in name:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return cfg, model.state_dict()


def test_tiny_qwen2_with_qkv_bias(demo_dir, windows, tmp_path):
    cfg, state = _tiny("qwen2", 4, tie=False)
    assert "model.layers.0.self_attn.q_proj.bias" in state
    for i in range(4):  # nemotron-nas' attention_bias means q, k, v and o biases
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(64)
    blocks = [(2, 512), (4, 256), (1, 512), (2, 256)]
    sliced = slice_state(state, _config_dict(cfg), blocks)
    folder = write_nas_folder(tmp_path / "qwen2-nas", _config_dict(cfg), sliced, blocks, demo_dir)
    model = reference_model(cfg, {k: v for k, v in sliced.items() if not k.endswith("o_proj.bias")}, blocks)
    write_gguf(folder, tmp_path / "f32.gguf", "f32", progress=False)
    check_against_transformers(tmp_path / "f32.gguf", model, windows)


def test_tiny_llama_with_attention_free_layers(demo_dir, windows, tmp_path):
    cfg, state = _tiny("llama", 6, tie=True)
    # no attention in 1 and 4, neither part in 2, attention without FFN in 3
    blocks = [(2, 512), (None, 256), (None, None), (2, None), (None, 512), (4, 256)]
    sliced = slice_state(state, _config_dict(cfg), blocks)
    folder = write_nas_folder(tmp_path / "llama-nas", _config_dict(cfg), sliced, blocks, demo_dir)
    model = reference_model(cfg, sliced, blocks)
    info = write_gguf(folder, tmp_path / "f32.gguf", "f32", progress=False)
    check_against_transformers(tmp_path / "f32.gguf", model, windows)
    assert info["n_tensors"] == 2 + 9 + 4 + 0 + 9 + 4 + 9  # embd + final norm, then per layer (zero FFN in 3)


def test_zero_ffn_is_why_attention_only_layers_survive(demo_dir, tmp_path, monkeypatch):
    """llama.cpp's deci graph drops the attention of a layer with n_ff == 0 (deci.cpp:
    ``if (n_ff == 0) continue;`` skips ``inpL = cur``): written the converter's way, the
    attention-only layer's output is lost; with the zero FFN it is kept."""
    import streamprune.formats.gguf as G

    cfg, state = _tiny("llama", 3, tie=True)
    blocks = [(2, 512), (2, None), (4, 256)]
    sliced = slice_state(state, _config_dict(cfg), blocks)
    folder = write_nas_folder(tmp_path / "nas", _config_dict(cfg), sliced, blocks, demo_dir)
    with torch.no_grad():
        ref = reference_model(cfg, sliced, blocks)(torch.arange(1000, 1064)[None]).logits[0].numpy()
    errs = {}
    for mode in ("zero_ffn", "n_ff=0"):
        if mode == "n_ff=0":
            orig = G.deci_blocks
            monkeypatch.setattr(G, "deci_blocks", lambda c: [G.DeciBlock(b.n_head, b.n_head_kv, 0) if b.zero_ffn else b for b in orig(c)])
        write_gguf(folder, tmp_path / f"{mode}.gguf", "f32", progress=False)
        errs[mode] = rel_err(llama_logits(_llama(tmp_path / f"{mode}.gguf", **_f32_kv()), list(range(1000, 1064))), ref)
    assert errs["zero_ffn"] <= 1e-4 and errs["n_ff=0"] > 0.05, errs
