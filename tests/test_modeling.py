"""Tests for the pruned-model class (streamprune/modeling/modeling_streamprune.py).

Run:  . .venv/bin/activate && python -m pytest tests/test_modeling.py -q

Tiny random configs built in-process, fp32, CPU; no downloads. What they prove:
dense specs reproduce Llama / Qwen2 / Mistral logits (GQA, q/k/v bias, Llama-3 RoPE
scaling, tied and untied embeddings); the state dict equals ``LayerSpec.tensor_shapes()``
for every kind of pruned layer; exact low-rank factors reproduce the dense logits; padding
is honoured; saved folders load back through remote code and through ``register()``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from streamprune.modeling import (
    AUTO_MAP,
    MODELING_FILES,
    StreamPruneConfig,
    StreamPruneDecoderLayer,
    StreamPruneForCausalLM,
    register,
)
from streamprune.spec import LayerSpec

VOCAB, D, F_, H, G, L = 96, 64, 80, 4, 2, 2
HD = D // H
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _source(arch: str, tie: bool = False, rope: dict | None = None):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=F_,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=G,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    if rope is not None:
        common["rope_parameters"] = dict(rope)
    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common)).eval()
    # random (not unit) norm weights and biases, so that a wrong copy shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _dense_specs(src_cfg, qkv_bias: bool = False) -> list[LayerSpec]:
    return [
        LayerSpec.dense(
            src_cfg.hidden_size,
            src_cfg.num_attention_heads,
            src_cfg.num_key_value_heads,
            getattr(src_cfg, "head_dim", None) or src_cfg.hidden_size // src_cfg.num_attention_heads,
            src_cfg.intermediate_size,
            qkv_bias=qkv_bias,
        )
        for _ in range(src_cfg.num_hidden_layers)
    ]


def _pruned_from(ref, specs) -> StreamPruneForCausalLM:
    cfg = StreamPruneConfig.from_source(ref.config, specs)
    model = StreamPruneForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize(
    "arch,tie,rope",
    [
        ("llama", False, None),
        ("llama", True, None),
        ("llama", False, LLAMA3_ROPE),
        ("qwen2", False, None),
        ("qwen2", True, None),
        ("mistral", False, None),
    ],
)
def test_dense_specs_match_source_logits(arch, tie, rope):
    ref = _source(arch, tie, rope)
    specs = _dense_specs(ref.config, qkv_bias=arch == "qwen2")
    model = _pruned_from(ref, specs)
    assert model.config.source_model_type == arch
    if rope is not None:
        assert model.config.rope_parameters["rope_type"] == "llama3"
        theta, hd = LLAMA3_ROPE["rope_theta"], HD
        unscaled = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        assert not torch.allclose(model.model.rotary_emb.inv_freq, unscaled)  # scaling really applied
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = _ids(seq=40 if rope else 12)  # with llama3: beyond original_max_position_embeddings
    out, want = model(ids, labels=ids), ref(ids, labels=ids)
    diff = (out.logits - want.logits).abs().max().item()
    assert diff < 1e-5, diff
    assert abs(out.loss.item() - want.loss.item()) < 1e-5  # same shifted mean cross-entropy


PRUNED_SPECS = {
    "lowrank_qkvo_bias": LayerSpec(
        hidden_size=D, num_kv_heads=G, heads_per_group=2, head_dim=HD, v_head_dim=HD,
        intermediate_size=F_, q_rank=8, k_rank=6, v_rank=5, o_rank=7, qkv_bias=True, o_bias=True,
    ),
    "small_vhd_fewer_heads": LayerSpec(
        hidden_size=D, num_kv_heads=G, heads_per_group=1, head_dim=HD, v_head_dim=5, intermediate_size=24,
    ),
    "dropped_group_down_bias_bypass": LayerSpec(
        hidden_size=D, num_kv_heads=1, heads_per_group=2, head_dim=HD, v_head_dim=HD, intermediate_size=16,
        down_bias=True, bypass_rank=4,
    ),
    "zero_heads_o_bias": LayerSpec(
        hidden_size=D, num_kv_heads=0, heads_per_group=0, head_dim=HD, v_head_dim=HD, intermediate_size=F_,
        o_bias=True,
    ),
    "zero_heads_no_bias": LayerSpec(
        hidden_size=D, num_kv_heads=0, heads_per_group=0, head_dim=HD, v_head_dim=HD, intermediate_size=F_,
    ),
    "zero_ffn_down_bias_bypass": LayerSpec(
        hidden_size=D, num_kv_heads=G, heads_per_group=2, head_dim=HD, v_head_dim=HD, intermediate_size=0,
        down_bias=True, bypass_rank=3,
    ),
    "zero_ffn_nothing": LayerSpec(
        hidden_size=D, num_kv_heads=1, heads_per_group=1, head_dim=HD, v_head_dim=HD, intermediate_size=0,
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_equals_layer_spec_tensor_shapes(tie):
    specs = list(PRUNED_SPECS.values())
    src = _source("llama", tie).config
    cfg = StreamPruneConfig.from_source(src, specs)
    model = StreamPruneForCausalLM(cfg).eval()
    expected = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    if not tie:
        expected["lm_head.weight"] = (VOCAB, D)
    for i, s in enumerate(specs):
        expected.update({f"model.layers.{i}.{k}": v for k, v in s.tensor_shapes().items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for s in expected.values()
    )
    # forward runs and is finite, with and without padding
    torch.manual_seed(0)
    for p in model.parameters():
        p.normal_(0, 0.1)
    ids = _ids(seq=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for m in (None, mask):
        out = model(ids, attention_mask=m, labels=ids)
        assert out.logits.shape == (2, 9, VOCAB)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


@torch.no_grad()
def test_zero_blocks_output_bias_and_bypass_only():
    s0 = PRUNED_SPECS["zero_heads_o_bias"]
    s1 = PRUNED_SPECS["zero_ffn_down_bias_bypass"]
    cfg = StreamPruneConfig.from_source(_source("llama").config, [s0, s1])
    model = StreamPruneForCausalLM(cfg)
    for p in model.parameters():
        p.normal_()
    x = torch.randn(2, 5, D)
    attn0 = model.model.layers[0].self_attn
    assert torch.equal(attn0(x, None), attn0.o_proj.bias.expand(2, 5, D))
    mlp1 = model.model.layers[1].mlp
    want = mlp1.down_proj.bias + x @ mlp1.bypass.down.weight.T @ mlp1.bypass.up.weight.T
    torch.testing.assert_close(mlp1(x), want)


@torch.no_grad()
def test_exact_low_rank_factors_match_dense_logits():
    """Dense weights W = up @ down (rank r): factored model == dense model."""
    ref = _source("qwen2")  # q/k/v biases exercise up.bias
    ranks = {"q": 8, "k": 6, "v": 5, "o": 7}
    sd = ref.state_dict()
    factored: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(3)
    for i in range(L):
        for p, r in ranks.items():
            name = f"model.layers.{i}.self_attn.{p}_proj"
            out_f, in_f = sd[f"{name}.weight"].shape
            up = torch.randn(out_f, r, generator=g) / r**0.5
            down = torch.randn(r, in_f, generator=g) / in_f**0.5
            sd[f"{name}.weight"] = up @ down
            factored[f"{name}.up.weight"], factored[f"{name}.down.weight"] = up, down
            if f"{name}.bias" in sd:
                factored[f"{name}.up.bias"] = sd[f"{name}.bias"]
    ref.load_state_dict(sd)
    dense = _pruned_from(ref, _dense_specs(ref.config, qkv_bias=True))
    lr_specs = [
        LayerSpec(
            hidden_size=D, num_kv_heads=G, heads_per_group=H // G, head_dim=HD, v_head_dim=HD,
            intermediate_size=F_, qkv_bias=True, q_rank=8, k_rank=6, v_rank=5, o_rank=7,
        )
    ] * L
    lowrank = StreamPruneForCausalLM(StreamPruneConfig.from_source(ref.config, lr_specs)).eval()
    dense_attn = {f"model.layers.{i}.self_attn.{p}_proj.{t}" for i in range(L) for p in ranks for t in ("weight", "bias")}
    lr_sd = {k: v for k, v in sd.items() if k not in dense_attn}
    lr_sd.update(factored)
    lowrank.load_state_dict(lr_sd, strict=True)
    ids = _ids()
    diff = (lowrank(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-5, diff
    assert (dense(ids).logits - ref(ids).logits).abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("spec_name", [None, "small_vhd_fewer_heads"])
def test_left_padding_matches_unpadded(spec_name):
    ref = _source("llama")
    if spec_name is None:
        model = _pruned_from(ref, _dense_specs(ref.config))
    else:
        model = StreamPruneForCausalLM(StreamPruneConfig.from_source(ref.config, [PRUNED_SPECS[spec_name]] * L))
        model.eval()
    ids = _ids(batch=2, seq=10)
    pad = 4
    padded = ids.clone()
    padded[0, pad:] = ids[0, : 10 - pad]
    padded[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    out = model(padded, attention_mask=mask).logits
    alone = model(ids[:1, : 10 - pad]).logits
    assert torch.isfinite(out).all()
    assert (out[0, pad:] - alone[0]).abs().max().item() < 1e-5
    # the unpadded row is unaffected by its neighbour's padding
    assert (out[1] - model(ids[1:]).logits[0]).abs().max().item() < 1e-5


@torch.no_grad()
def test_standalone_layer_from_meta_with_assign():
    """How the streaming engine uses a layer: meta skeleton + load_state_dict(assign=True)."""
    spec = PRUNED_SPECS["lowrank_qkvo_bias"]
    cfg = StreamPruneConfig.from_source(_source("llama").config, [spec] * L)
    full = StreamPruneForCausalLM(cfg).eval()
    for p in full.parameters():
        p.normal_(0, 0.1)
    prefix = "model.layers.1."
    tensors = {k[len(prefix):]: v.clone() for k, v in full.state_dict().items() if k.startswith(prefix)}
    with torch.device("meta"):
        layer = StreamPruneDecoderLayer(cfg, spec.to_dict(), layer_idx=1)
    layer.load_state_dict(tensors, assign=True, strict=True)
    x = torch.randn(2, 7, D)
    pos = full.model.rotary_emb(x, torch.arange(7)[None])
    torch.testing.assert_close(layer(x, pos), full.model.layers[1](x, pos), rtol=0, atol=0)


@torch.no_grad()
def test_generate_without_cache_is_greedy_argmax():
    ref = _source("llama")
    model = _pruned_from(ref, _dense_specs(ref.config))
    ids = _ids(batch=1, seq=5)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    seq = ids
    for _ in range(4):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def _save_with_remote_code(model, path):
    model.save_pretrained(path)
    for source in MODELING_FILES:
        shutil.copy(source, path / source.name)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = AUTO_MAP
    cfg_path.write_text(json.dumps(cfg, indent=2))


# Loads through remote code in a fresh interpreter: proves the copied file works with
# streamprune never imported (in-process, a register()ed local class would win over it).
_REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
d = sys.argv[1]
model, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
problems = {k: v for k, v in info.items() if v}
assert not problems, problems
assert type(model).__name__ == "StreamPruneForCausalLM", type(model)
leaked = [m for m in sys.modules if m.split(".")[0] == "streamprune"]
assert not leaked, leaked
ids = torch.load(d + "/ids.pt")
torch.save(model.eval()(ids).logits.detach(), d + "/remote_logits.pt")
print("tied" if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() else "untied")
"""


@torch.no_grad()
@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load(tmp_path, tie):
    from safetensors import safe_open

    specs = list(PRUNED_SPECS.values())
    ref = _source("llama", tie, LLAMA3_ROPE)
    cfg = StreamPruneConfig.from_source(ref.config, specs)
    model = StreamPruneForCausalLM(cfg).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.normal_(0, 0.1)
    _save_with_remote_code(model, tmp_path)
    ids = _ids(seq=20)
    want = model(ids).logits

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "streamprune" and saved["source_model_type"] == "llama"
    assert saved["layer_specs"] == [s.to_dict() for s in specs]
    assert saved["rope_parameters"]["rope_type"] == "llama3"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict()) - ({"lm_head.weight"} if tie else set())

    # 1. trust_remote_code, fresh process
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _REMOTE_LOAD, str(tmp_path)],
        env=env,
        cwd=tmp_path,  # not the repo root: its top-level kernels/ would shadow HF's `kernels` package
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for word in ("MISSING", "UNEXPECTED", "MISMATCH", "not initialized"):  # transformers' load report
        assert word not in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == ("tied" if tie else "untied")
    assert torch.equal(torch.load(tmp_path / "remote_logits.pt"), want)

    # 2. register(), in process, no remote code
    register()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is StreamPruneForCausalLM
    assert not {k: v for k, v in info.items() if v}, info
    loaded.eval()
    assert loaded.config.layer_specs == [s.to_dict() for s in specs]
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert torch.equal(loaded(ids).logits, want)


def test_config_round_trip_and_validation():
    specs = list(PRUNED_SPECS.values())[:2]
    cfg = StreamPruneConfig.from_source(_source("qwen2", rope=LLAMA3_ROPE).config, specs)
    again = StreamPruneConfig.from_dict(cfg.to_dict())
    assert again.layer_specs == cfg.layer_specs
    assert again.source_model_type == "qwen2"
    assert again.rope_parameters == cfg.rope_parameters
    assert again.to_diff_dict() == cfg.to_diff_dict()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        StreamPruneConfig.from_source(_source("llama").config, specs, num_hidden_layers=3)
    with pytest.raises(ValueError, match="unknown fields"):
        StreamPruneConfig.from_source(_source("llama").config, [{**specs[0].to_dict(), "bogus": 1}] * 2)
