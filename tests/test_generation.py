"""KV-cache generation and the source's attention window in the pruned-model class.

Run:  .venv/bin/pytest tests/test_generation.py -q

Tiny random models built in-process, fp32, CPU; no downloads. What they prove: with the
cache, logits at every step equal the full-sequence logits (<= 1e-4 relative) and greedy
generation equals generation without the cache token for token, for a GQA Llama, a Qwen2
with q/k/v bias, and a pruned model whose layers have their own KV head counts, a value
head dim below the q/k head dim, low-rank projections and no attention at all (layer 0);
left-padded batches generate what each row generates alone; ``past_key_values=`` and a
continued prompt work; a sliding-window source (Mistral, Qwen2 with
``use_sliding_window``) pruned at ratio 0 gives the source's logits, with and without
the cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from streamprune import PruneConfig, load_pruned, prune
from streamprune.modeling import modeling_streamprune as sp
from streamprune.modeling.modeling_streamprune import DummyLayer  # transformers' own from 5.23, else the modeling file's
from streamprune.modeling import StreamPruneConfig, StreamPruneForCausalLM
from streamprune.spec import LayerSpec
from test_modeling import PRUNED_SPECS, VOCAB, _dense_specs, _pruned_from, _source
from tiny import make_tiny_model

RTOL = 1e-4
MIXED = ["zero_heads_o_bias", "small_vhd_fewer_heads", "lowrank_qkvo_bias", "dropped_group_down_bias_bypass", "zero_heads_no_bias", "zero_ffn_down_bias_bypass"]


def cache_of(out):
    """The cache an output carries (``out.cache``; ``out.past_key_values`` before transformers renamed it)."""
    return getattr(out, sp._CACHE_FIELD)


def _mixed_model() -> StreamPruneForCausalLM:
    """Layer 0 has no attention (its cache slot is a DummyLayer); others: own shapes."""
    cfg = StreamPruneConfig.from_source(_source("llama").config, [PRUNED_SPECS[n] for n in MIXED])
    model = StreamPruneForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.05))
    return model


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that greedy continuations vary (default init repeats one token)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _model(kind: str) -> StreamPruneForCausalLM:
    if kind == "mixed_pruned":
        return _mixed_model()
    ref = _spread(_source("llama" if kind == "llama_gqa" else "qwen2"))
    return _pruned_from(ref, _dense_specs(ref.config, qkv_bias=kind == "qwen2_bias"))


KINDS = ["llama_gqa", "qwen2_bias", "mixed_pruned"]


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def stepwise_logits(model, ids, prefill: int, attention_mask=None) -> torch.Tensor:
    """Prefill ``prefill`` tokens with a fresh cache, then one token per forward."""
    mask = None if attention_mask is None else attention_mask[:, :prefill]
    out = model(ids[:, :prefill], attention_mask=mask, use_cache=True)
    cache, logits = cache_of(out), [out.logits]
    for t in range(prefill, ids.shape[1]):
        mask = None if attention_mask is None else attention_mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
        assert cache_of(out) is cache
        logits.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1)


def _greedy(model, ids, n, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_full_sequence_logits(kind):
    model = _model(kind)
    ids = _ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert _rel(stepwise_logits(model, ids, prefill=7), full) <= RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_with_cache_equals_without(kind):
    model = _model(kind)
    ids = _ids(2, 9, seed=2)
    cached = _greedy(model, ids, 24)
    assert torch.equal(cached, _greedy(model, ids, 24, use_cache=False))
    assert len(set(cached[0, 9:].tolist())) > 3  # a real continuation, not one token repeated
    # generate(..., use_cache=False) really runs without a cache; by default it has one
    out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(cache_of(out), DynamicCache) and cache_of(out).get_seq_length() == 10
    out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True, use_cache=False)
    assert cache_of(out) is None


def test_cache_layers_fit_each_layer():
    """Own KV head count and value head dim per layer; nothing stored for a layer without heads."""
    model = _mixed_model()
    with torch.no_grad():
        cache = cache_of(model(_ids(3, 5), use_cache=True))
    assert cache.get_seq_length() == 5  # layer 0 has no attention: read from the first layer that has
    for layer, spec_name in zip(cache.layers, MIXED):
        s = PRUNED_SPECS[spec_name]
        if s.num_kv_heads == 0:
            assert isinstance(layer, DummyLayer) and layer.keys is None
        else:
            assert type(layer) is DynamicLayer
            assert tuple(layer.keys.shape) == (3, s.num_kv_heads, 5, s.head_dim)
            assert tuple(layer.values.shape) == (3, s.num_kv_heads, 5, s.v_head_dim)  # never padded


@pytest.mark.parametrize("kind", ["llama_gqa", "mixed_pruned"])
def test_left_padded_batch_generates_what_each_row_generates_alone(kind):
    model = _model(kind)
    lengths, width = [11, 6, 8], 11
    rows = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    batch = _greedy(model, ids, 12, attention_mask=mask)
    assert torch.equal(batch, _greedy(model, ids, 12, attention_mask=mask, use_cache=False))
    for i, r in enumerate(rows):
        assert torch.equal(batch[i, width:], _greedy(model, r, 12)[0, r.shape[1] :]), i
    # step by step with the padding mask: the cached logits of real tokens equal the full pass
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    step = stepwise_logits(model, ids, prefill=8, attention_mask=mask)
    keep = mask.bool()
    assert _rel(step[keep], full[keep]) <= RTOL


@pytest.mark.parametrize("kind", ["llama_gqa", "mixed_pruned"])
def test_past_key_values_and_a_continued_prompt(kind):
    model = _model(kind)
    prompt = _ids(2, 8, seed=3)
    first = _greedy(model, prompt, 5, return_dict_in_generate=True)
    follow = torch.cat([first.sequences, _ids(2, 4, seed=4)], dim=1)  # the user types more
    again = _greedy(model, follow, 6, past_key_values=cache_of(first))
    assert torch.equal(again, _greedy(model, follow, 6, use_cache=False))
    # a cache the user made without this model's config: its layers are fitted on first use
    user_cache = DynamicCache()
    assert torch.equal(_greedy(model, prompt, 6, past_key_values=user_cache), _greedy(model, prompt, 6, use_cache=False))
    if kind == "mixed_pruned":
        assert isinstance(user_cache.layers[0], DummyLayer)


def test_model_without_attention_generates_without_a_cache():
    spec = PRUNED_SPECS["zero_heads_o_bias"]
    model = StreamPruneForCausalLM(StreamPruneConfig.from_source(_source("llama").config, [spec, spec])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        assert cache_of(model(_ids(1, 4), use_cache=True)) is None
    ids = _ids(1, 4)
    out = _greedy(model, ids, 5)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


# ---- the source's attention window ------------------------------------------------------

WINDOW = 16


def _windowed_source(arch: str, window: int | None) -> torch.nn.Module:
    """Tiny random Mistral (window on every layer) or Qwen2 (window from layer 1 on)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", sliding_window=window,
    )
    if arch == "mistral":
        cfg, cls = MistralConfig(**common), MistralForCausalLM
    else:
        cfg, cls = Qwen2Config(**common, use_sliding_window=window is not None, max_window_layers=1), Qwen2ForCausalLM
    torch.manual_seed(0)
    return _spread(cls(cfg).eval())


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_source_at_ratio_zero_gives_source_logits(arch):
    ref = _windowed_source(arch, WINDOW)
    model = _pruned_from(ref, _dense_specs(ref.config, qkv_bias=arch == "qwen2"))
    want_types = ["sliding_attention"] * 3 if arch == "mistral" else ["full_attention"] + ["sliding_attention"] * 2
    assert model.config.sliding_window == WINDOW and model.config.layer_types == want_types
    ids = _ids(2, 64)
    with torch.no_grad():
        want = ref(ids).logits
        full = model(ids, use_cache=False).logits
        no_window = _windowed_source(arch, None)(ids).logits
    # the window matters for these logits: beyond it, a full-attention model differs
    assert _rel(no_window[:, :WINDOW], want[:, :WINDOW]) < 1e-5
    assert _rel(no_window[:, WINDOW:], want[:, WINDOW:]) > 1e-2
    assert _rel(full, want) <= 1e-5
    assert _rel(stepwise_logits(model, ids, prefill=5), want) <= RTOL
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer if t == "sliding_attention" else DynamicLayer for t in want_types]
    prompt = ids[:, :10]
    assert torch.equal(_greedy(model, prompt, 30), _greedy(model, prompt, 30, use_cache=False))
    assert torch.equal(_greedy(model, prompt, 30), _greedy(ref, prompt, 30))


def test_sliding_window_survives_the_engine_and_the_output_folder(tmp_path):
    """Mistral source with window 16, pruned at ratio 0 by the engine: the output applies it."""
    src = make_tiny_model(tmp_path / "src", "mistral", layers=2)
    cfg_path = src / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sliding_window"] = WINDOW
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    prune(PruneConfig(source=src, out=out, method="magnitude", ratio=0.0, calib="c4", nsamples=4, seqlen=32, dtype="float32", progress=False))
    saved = json.loads((out / "config.json").read_text())
    assert saved["sliding_window"] == WINDOW and saved["layer_types"] == ["sliding_attention"] * 2
    ref = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    model = load_pruned(out).eval()
    ids = torch.randint(1, ref.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        assert _rel(model(ids, use_cache=False).logits, want) <= 1e-5
    assert _rel(stepwise_logits(model, ids, prefill=20), want) <= RTOL


def test_config_without_window_fields_loads_as_full_attention():
    """config.json written before the window fields existed."""
    cfg = StreamPruneConfig.from_source(_source("llama").config, [PRUNED_SPECS["lowrank_qkvo_bias"]] * 2)
    d = cfg.to_dict()
    d.pop("sliding_window"), d.pop("layer_types")
    again = StreamPruneConfig.from_dict(d)
    assert again.sliding_window is None and again.layer_types == ["full_attention"] * 2
    spec = LayerSpec.from_dict(again.layer_specs[0])
    assert spec.num_kv_heads == PRUNED_SPECS["lowrank_qkvo_bias"].num_kv_heads
