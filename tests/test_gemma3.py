"""Gemma 3 text (``model_type: gemma3_text``): sandwich norms, scaled embedding, a RoPE per layer type.

Run:  OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_gemma3.py -q

The Qwen3 / OLMo 2 tests of ``test_architectures.py`` for Gemma 3, on a tiny random checkpoint of
transformers' own ``Gemma3ForCausalLM`` (4 layers: sliding, sliding, full, sliding with a window
of 8 tokens under 32-token inputs; hidden 64, 4 query / 2 KV heads of head_dim 16, FFN 128,
``query_pre_attn_scalar`` 24 (not head_dim), local RoPE base 100 and a global base of 10^6 with
linear scaling x2, tied head; fp32, CPU; norm weights drawn around 1, so a norm applied in the
wrong place, or without its ``1 +``, shows in the logits). What they prove: ratio 0 reproduces
``Gemma3ForCausalLM``'s logits (<= 1e-5, ``load_pruned`` and ``trust_remote_code``) and the KV
cache the full-sequence logits across the window; the engine's streamed evaluation (its own
scaled embedding, per-type RoPE, window masks and final norm) equals transformers'; the ``o_proj``
and ``mlp`` taps read after the post-norms; every method at 0.3 lands within the ratio tolerance,
loads and generates with the cache what it generates without; olica's streamed decisions equal
the in-memory reference's; kill -9 + resume is byte-identical (olica, killed in the full-attention layer); the text decoder of an
image-text ``gemma3`` checkpoint (transformers' ``Gemma3ForConditionalGeneration``, a tiny
SigLIP tower beside it) prunes into a text-only model with its text logits; nemotron-nas, GGUF,
soft-capping and bidirectional attention are refused in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import logits_of
from streamprune import EvalConfig, PruneConfig, load_pruned, perplexity, perplexity_in_memory, prune
from streamprune.adapters import open_model
from streamprune.errors import ConfigError, UnsupportedArchitectureError
from streamprune.methods import available
from streamprune.modeling import StreamPruneConfig, StreamPruneDecoderLayer
from streamprune.spec import LayerSpec
from test_architectures import CALIB, RATIO_TOLERANCE, _cached_logits, _greedy_same_with_and_without_cache, _tokens, \
    assert_olica_streamed_equals_in_memory
from test_resume import ARGS, digests, run_cli
from tiny import make_tiny_model, tiny_tokenizer

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
GEMMA = dict(layers=4, inter=128, head_dim=16, tie=True, random_norms=True, sliding_window=8, layer_types=LAYER_TYPES,
             query_pre_attn_scalar=24, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gemma3_source") / "gemma3", "gemma3_text", **GEMMA)


@pytest.fixture(scope="module")
def pruned(source, tmp_path_factory) -> dict:
    """method -> (output folder, report) of a 0.3 prune, made on first use."""
    from tiny import pruned_on_first_use

    return pruned_on_first_use(source, tmp_path_factory.mktemp("gemma3_pruned"), 0.3, **CALIB)


def test_ratio_zero_reproduces_source_logits_with_cache(source, tmp_path):
    out = tmp_path / "out"
    prune(PruneConfig(source=source, out=out, method="magnitude", ratio=0.0, **CALIB))
    cfg = json.loads((out / "config.json").read_text())
    assert all(s["qk_norm"] == "head" and s["norm_placement"] == "sandwich" for s in cfg["layer_specs"])
    assert cfg["embed_scale"] == 8.0 and cfg["norm_weight_offset"] == 1.0 and cfg["query_pre_attn_scalar"] == 24.0
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["layer_types"] == LAYER_TYPES and cfg["sliding_window"] == 8
    assert cfg["rope_parameters"]["full_attention"]["rope_type"] == "linear" and cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    ids = _tokens(source)  # 32 tokens: the sliding layers' window (8) cut in
    dense = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa").eval()
    assert type(dense).__name__ == "Gemma3ForCausalLM"
    want = logits_of(dense, ids)
    for model in (load_pruned(out).eval(), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
        assert (logits_of(model, ids) - want).abs().max().item() <= 1e-5
        assert (_cached_logits(model, ids, prefill=4) - want).abs().max().item() <= 1e-4
        _greedy_same_with_and_without_cache(model, ids[:1, :6])
    again = tmp_path / "again"  # an output pruned again carries the model-wide fields and the per-type RoPE
    prune(PruneConfig(source=out, out=again, method="magnitude", ratio=0.0, **CALIB))
    assert (logits_of(load_pruned(again).eval(), ids) - want).abs().max().item() <= 1e-5


def test_streamed_eval_of_the_source_equals_transformers(source):
    """The engine's own layer calls: its scaled embedding, each layer type's RoPE and window, the
    (1 + weight) final norm and the tied head, against ``Gemma3ForCausalLM``."""
    cfg = EvalConfig(model=source, dataset="wikitext2", seqlen=32, max_windows=6, chunk_tokens=64, dtype="float32", progress=False)
    streamed, ref = perplexity(cfg), perplexity_in_memory(cfg)
    assert streamed["tokens"] == ref["tokens"] == 6 * 31
    assert abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-5


def test_taps_read_outputs_after_the_post_norms(source):
    """``o_proj`` and ``mlp`` give (sub-block input, its post-norm output); the MLP's input is after its pre-norm."""
    from test_architectures import recorded_taps

    x, inner, seen = recorded_taps(source, 2)
    h = x.reshape(-1, 64) + seen["o_proj"][1]  # the residual after the attention
    m_in, m_out = seen["mlp"]
    torch.testing.assert_close(m_in, inner.pre_feedforward_layernorm(h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m_out, inner.post_feedforward_layernorm(inner.mlp(m_in)), rtol=0, atol=0)
    torch.testing.assert_close(seen["layer"][1], h + m_out, rtol=1e-6, atol=1e-6)


def test_sandwich_spec_is_the_pruned_layer():
    """A sandwich spec's tensors (low-rank q, fewer heads, narrower FFN, LC bypass) are the pruned layer's state dict."""
    spec = LayerSpec(hidden_size=64, num_kv_heads=1, heads_per_group=2, head_dim=16, v_head_dim=12, intermediate_size=40,
                     q_rank=8, bypass_rank=4, qk_norm="head", norm_placement="sandwich")
    cfg = StreamPruneConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            num_hidden_layers=1, vocab_size=32, layer_specs=[spec.to_dict()])
    with torch.device("meta"):
        layer = StreamPruneDecoderLayer(cfg, spec.to_dict(), 0)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == spec.tensor_shapes()
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "input_layernorm.weight"} <= set(spec.tensor_shapes())


@pytest.mark.parametrize("method", available())
def test_method_at_0_3_loads_and_generates(method, source, pruned):
    out, report = pruned(method)
    assert abs(report["achieved_ratio"] - 0.3) <= RATIO_TOLERANCE, report["achieved_ratio"]
    adapter = open_model(out)
    assert report["params_pruned"] == adapter.shapes().total_params(adapter.specs)
    assert {(s.qk_norm, s.norm_placement) for s in adapter.specs} == {("head", "sandwich")}
    model = load_pruned(out).eval()
    ids = _tokens(source)
    logits = logits_of(model, ids)
    assert torch.isfinite(logits).all()
    assert (_cached_logits(model, ids, prefill=4) - logits).abs().max().item() <= 1e-4
    _greedy_same_with_and_without_cache(model, ids[:1, :6])


def test_olica_streamed_equals_in_memory(source, pruned):
    out, _ = pruned("olica")
    assert_olica_streamed_equals_in_memory(source, out)


def test_streamed_eval_of_a_pruned_model_equals_in_memory(pruned):
    cfg = EvalConfig(model=pruned("cascade")[0], dataset="wikitext2", seqlen=32, max_windows=6, chunk_tokens=64, dtype="float32", progress=False)
    streamed, ref = perplexity(cfg), perplexity_in_memory(cfg)
    assert streamed["tokens"] == ref["tokens"] == 6 * 31
    assert abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-4


def test_sigkill_then_resume_is_byte_identical(source, tmp_path):
    cmd = lambda out: ["prune", source, "--out", out, "--method", "olica", "--ratio", "0.3", *ARGS]  # noqa: E731
    clean = run_cli(*cmd(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = run_cli(*cmd(tmp_path / "out"), crash_at="observe:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*cmd(tmp_path / "out"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digests(tmp_path / "out") == digests(tmp_path / "clean")


def test_nemotron_nas_and_gguf_refuse_the_block(source, pruned, tmp_path):
    from streamprune.formats.gguf import export_gguf
    from streamprune.formats.nemotron_nas import export

    with pytest.raises(ConfigError, match="qk_norm") as e:
        prune(PruneConfig(source=source, out=tmp_path / "nas", method="cascade", ratio=0.3, format="nemotron-nas", **CALIB))
    assert "\n" not in str(e.value) and "--format streamprune" in str(e.value)
    out, _ = pruned("cascade")
    with pytest.raises(ConfigError, match="qk_norm"):
        export(out, tmp_path / "exported")
    with pytest.raises(ConfigError, match="qk_norm"):
        export_gguf(out, tmp_path / "model.gguf", progress=False)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("option,match", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
])
def test_unsupported_options_are_refused_in_one_line(option, match, tmp_path):
    src = make_tiny_model(tmp_path / "src", "gemma3_text", **{**GEMMA, "layers": 1, "layer_types": ["sliding_attention"]}, **option)
    with pytest.raises(UnsupportedArchitectureError, match=match) as e:
        prune(PruneConfig(source=src, out=tmp_path / "out", method="magnitude", ratio=0.3, **CALIB))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def _image_text_model(folder):
    """A tiny ``Gemma3ForConditionalGeneration`` (2 decoder layers, a 1-layer SigLIP tower) saved as transformers saves it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    v = len(tiny_tokenizer())
    text = Gemma3TextConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=LAYER_TYPES[1:3], max_position_embeddings=512)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=v - 1, boi_token_index=v - 2,
                       eoi_token_index=v - 3)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.normal_(0.0, 0.2)  # scales 1 + w around 1
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_image_text_checkpoint_prunes_its_text_decoder(tmp_path):
    from safetensors import safe_open

    src = _image_text_model(tmp_path / "src")
    with safe_open(src / "model.safetensors", "pt") as f:  # the Hub's names
        assert {"language_model.model.layers.1.pre_feedforward_layernorm.weight", "multi_modal_projector.mm_input_projection_weight"} <= set(f.keys())
    out = tmp_path / "out"
    report = prune(PruneConfig(source=src, out=out, method="magnitude", ratio=0.0, **CALIB))
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.embed_tokens.weight" in names and not any("vision" in n or "projector" in n for n in names)
    assert report["params_dense"] == open_model(out).shapes().total_params()  # the text model's parameters
    ids = _tokens(src)
    dense = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    assert type(dense).__name__ == "Gemma3ForConditionalGeneration"
    assert (logits_of(load_pruned(out).eval(), ids) - logits_of(dense, ids)).abs().max().item() <= 1e-5
