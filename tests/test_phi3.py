"""Phi-3 / Phi-4 (``model_type: phi3``): fused q/k/v and gate/up read as a Llama block.

Run:  OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_phi3.py -q

The Qwen3 / OLMo 2 tests of ``test_architectures.py`` for Phi-3, in a file of their own (that
one already takes most of its time budget). Tiny random checkpoints of transformers' own
``Phi3ForCausalLM`` (2 layers, hidden 64, fp32, CPU, norm weights drawn around 1). What they
prove: the adapter's split layer equals the fused checkpoint's slices; ratio 0 reproduces
``Phi3ForCausalLM``'s logits (<= 1e-5, ``load_pruned`` and ``trust_remote_code``) and the KV
cache the full-sequence logits; with ``longrope`` (short and long factors) and a sliding
window shorter than the sequence, the pruned model equals transformers with and without the
cache, and the streamed evaluation (the engine's layer calls) equals transformers'; every
method at 0.3 lands within the ratio tolerance, loads and generates with the cache what it
generates without; olica's streamed decisions equal the in-memory reference's; streamed eval
== in-memory eval; the nemotron-nas export of a Phi-3 checkpoint equals it in transformers
and a nemotron-nas prune of Phi-3 loads; partial RoPE (Phi-4-mini), a sliding
window in nemotron-nas and longrope in GGUF are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reference import logits_of
from streamprune import EvalConfig, PruneConfig, load_pruned, perplexity, perplexity_in_memory, prune
from streamprune.adapters import open_model
from streamprune.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from streamprune.methods import available
from test_architectures import CALIB, RATIO_TOLERANCE, _cached_logits, _greedy_same_with_and_without_cache, _tokens, \
    assert_olica_streamed_equals_in_memory
from tiny import make_tiny_model

IDS = dict(eos_token_id=0, pad_token_id=0, bos_token_id=0)  # Phi-3's defaults (32000) lie outside the tiny vocabulary
HALF = 8  # head_dim 16 / 2: the length of longrope's factor lists
LONG = dict(  # Phi-3-mini-128k-shaped: longrope past 16 positions, every layer windowed to 12 tokens
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                     "short_factor": [1.0 + 0.05 * i for i in range(HALF)], "long_factor": [1.0 + 0.9 * i for i in range(HALF)]},
    original_max_position_embeddings=16, sliding_window=12,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("phi3_sources")
    return {
        "plain": make_tiny_model(root / "plain", "phi3", layers=2, inter=192, tie=True, random_norms=True, **IDS),
        "long": make_tiny_model(root / "long", "phi3", layers=2, inter=192, random_norms=True, **IDS, **LONG),
        "servable": make_tiny_model(root / "servable", "phi3", layers=2, inter=512, random_norms=True, **IDS),  # FFN 2 x 256 (servable)
    }


@pytest.fixture(scope="module")
def pruned(sources, tmp_path_factory) -> dict:
    """method -> (output folder, report) of a 0.3 prune of the plain source, made on first use."""
    from tiny import pruned_on_first_use

    return pruned_on_first_use(sources["plain"], tmp_path_factory.mktemp("phi3_pruned"), 0.3, **CALIB)


def test_read_layer_splits_the_fused_projections(sources):
    adapter = open_model(sources["plain"])
    fused = adapter.reader.read(["model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"])
    qkv, gate_up = fused["model.layers.1.self_attn.qkv_proj.weight"], fused["model.layers.1.mlp.gate_up_proj.weight"]
    split = adapter.read_layer(1)
    assert set(split) == set(adapter.specs[1].tensor_shapes())  # a Llama block's names
    assert torch.equal(torch.cat([split[f"self_attn.{p}_proj.weight"] for p in "qkv"]), qkv)
    assert split["self_attn.q_proj.weight"].shape == (64, 64) and split["self_attn.k_proj.weight"].shape == (32, 64)
    assert torch.equal(torch.cat([split["mlp.gate_proj.weight"], split["mlp.up_proj.weight"]]), gate_up)


def test_a_fused_tensor_of_the_wrong_shape_is_refused_in_one_line(sources, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = shutil.copytree(sources["plain"], tmp_path / "bad")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.qkv_proj.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="qkv_proj") as e:
        open_model(folder)
    assert "\n" not in str(e.value)


def test_ratio_zero_reproduces_source_logits_with_cache(sources, tmp_path):
    out = tmp_path / "out"
    prune(PruneConfig(source=sources["plain"], out=out, method="magnitude", ratio=0.0, **CALIB))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source_model_type"] == "phi3" and all("qk_norm" not in s for s in cfg["layer_specs"])  # Llama blocks
    ids = _tokens(sources["plain"])
    dense = AutoModelForCausalLM.from_pretrained(sources["plain"], attn_implementation="sdpa").eval()
    assert type(dense).__name__ == "Phi3ForCausalLM"
    want = logits_of(dense, ids)
    for model in (load_pruned(out).eval(), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
        assert (logits_of(model, ids) - want).abs().max().item() <= 1e-5
        assert (_cached_logits(model, ids, prefill=20) - want).abs().max().item() <= 1e-4
        _greedy_same_with_and_without_cache(model, ids[:1, :6])


def test_longrope_and_sliding_window_ratio_zero(sources, tmp_path):
    """32 tokens: past longrope's original 16 positions and over the 12-token window. The
    engine's layer calls (streamed eval) and the pruned model equal transformers' Phi-3."""
    src, out = sources["long"], tmp_path / "out"
    prune(PruneConfig(source=src, out=out, method="magnitude", ratio=0.0, **CALIB))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "longrope" and cfg["sliding_window"] == 12
    assert cfg["layer_types"] == ["sliding_attention"] * 2
    dense = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    model = load_pruned(out).eval()
    ids = _tokens(src)
    for t in (10, 32):  # short factors only; long factors and the window
        assert (logits_of(model, ids[:, :t]) - logits_of(dense, ids[:, :t])).abs().max().item() <= 1e-5
    # with the cache (the rotary switches to the long factors mid-way, in both alike)
    assert (_cached_logits(model, ids, prefill=8) - _cached_logits(dense, ids, prefill=8)).abs().max().item() <= 1e-4
    kw = dict(dataset="wikitext2", seqlen=32, max_windows=4, chunk_tokens=64, dtype="float32", progress=False)
    ref = perplexity_in_memory(EvalConfig(model=src, **kw))
    for folder in (src, out):
        streamed = perplexity(EvalConfig(model=folder, **kw))
        assert streamed["tokens"] == ref["tokens"] and abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-5


def test_the_window_mask_is_what_the_engine_would_otherwise_miss(sources):
    """Without the window mask the engine's layer call is plain causal attention: it differs."""
    from streamprune.stream import position_embeddings

    adapter = open_model(sources["long"])
    layer = adapter.build_layer(0, adapter.read_layer(0), "cpu", torch.float32)
    assert layer.window == 12
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(0))
    pe = position_embeddings(adapter.rotary("cpu"), 32, "cpu", torch.float32)
    with torch.no_grad():
        windowed = layer(x, pe)
        layer.window = None
        causal = layer(x, pe)
    assert torch.equal(windowed[:, :12], causal[:, :12]) and not torch.allclose(windowed[:, 12:], causal[:, 12:])


@pytest.mark.parametrize("method", available())
def test_method_at_0_3_loads_and_generates(method, sources, pruned):
    out, report = pruned(method)
    assert abs(report["achieved_ratio"] - 0.3) <= RATIO_TOLERANCE, report["achieved_ratio"]
    adapter = open_model(out)
    assert report["params_pruned"] == adapter.shapes().total_params(adapter.specs)
    model = load_pruned(out).eval()
    ids = _tokens(sources["plain"])
    logits = logits_of(model, ids)
    assert torch.isfinite(logits).all()
    assert (_cached_logits(model, ids, prefill=20) - logits).abs().max().item() <= 1e-4
    _greedy_same_with_and_without_cache(model, ids[:1, :6])


def test_olica_streamed_equals_in_memory(sources, pruned):
    out, _ = pruned("olica")
    assert_olica_streamed_equals_in_memory(sources["plain"], out)


def test_streamed_eval_equals_in_memory(sources, pruned):
    for folder in (sources["plain"], pruned("cascade")[0]):
        cfg = EvalConfig(model=folder, dataset="wikitext2", seqlen=64, max_windows=6, chunk_tokens=256, dtype="float32", progress=False)
        streamed, ref = perplexity(cfg), perplexity_in_memory(cfg)
        assert streamed["tokens"] == ref["tokens"] == 6 * 63
        assert abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-4


@torch.no_grad()
def test_nemotron_nas_exports(sources, tmp_path):
    """The dense checkpoint exports as nemotron-nas with its logits; a nemotron-nas prune (the
    servable structure) loads. (GGUF reads that folder like any other nemotron-nas folder; the
    tiny tokenizer is not one llama.cpp knows, so it is not converted here.)"""
    from streamprune.formats.nemotron_nas import export

    src = sources["servable"]
    export(src, tmp_path / "dense-nas")
    assert json.loads((tmp_path / "dense-nas" / "config.json").read_text())["model_type"] == "nemotron-nas"
    ids = _tokens(src)
    want = logits_of(AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    from streamprune.modeling import register

    register()  # the nemotron-nas class in-process
    nas = AutoModelForCausalLM.from_pretrained(tmp_path / "dense-nas", dtype=torch.float32).eval()
    assert type(nas).__name__ == "DeciLMForCausalLM"
    assert (logits_of(nas, ids) - want).abs().max().item() <= 1e-5

    out = tmp_path / "pruned-nas"
    report = prune(PruneConfig(source=src, out=out, method="cascade", ratio=0.3, format="nemotron-nas", **CALIB))
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas" and report["achieved_ratio"] > 0.1
    assert torch.isfinite(logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)).all()


def test_unsupported_options_are_refused_in_one_line(sources, tmp_path):
    from streamprune.formats.gguf import export_gguf
    from streamprune.formats.nemotron_nas import export
    from streamprune.modeling import register

    register()  # the nemotron-nas class in-process

    partial = make_tiny_model(tmp_path / "partial", "phi3", layers=1, **IDS,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    with pytest.raises(UnsupportedArchitectureError, match=r"partial_rotary_factor=0\.75") as e:
        open_model(partial)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor"):
        prune(PruneConfig(source=partial, out=tmp_path / "out", method="magnitude", ratio=0.3, **CALIB))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="sliding_window=12") as e:  # nemotron-nas has no sliding window
        export(sources["long"], tmp_path / "nas")
    assert "\n" not in str(e.value)
    longrope = make_tiny_model(tmp_path / "longrope", "phi3", layers=1, inter=256, **IDS, **{**LONG, "sliding_window": None})
    export(longrope, tmp_path / "longrope-nas")  # nemotron-nas carries rope_parameters as they are: same logits
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))  # past the original 16 positions
    nas = AutoModelForCausalLM.from_pretrained(tmp_path / "longrope-nas", dtype=torch.float32).eval()
    assert (logits_of(nas, ids) - logits_of(AutoModelForCausalLM.from_pretrained(longrope).eval(), ids)).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError, match="longrope") as e:  # GGUF has no longrope
        export_gguf(tmp_path / "longrope-nas", tmp_path / "model.gguf", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "model.gguf").exists()
