"""Qwen3 and OLMo 2: the pruned-model class, every method, streamed evaluation, kill -9 resume.

Run:  OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_architectures.py -q

Tiny random checkpoints built in-process from transformers' own config classes (2 layers,
hidden 64, fp32, CPU; norm weights drawn around 1, so a norm applied in the wrong place or
copied wrong shows in the logits). Qwen3 has per-head q/k RMSNorms and a head_dim (32) that
is not hidden / heads (16); OLMo 2 has post-norms and q/k RMSNorms over the whole projection.
What they prove, per architecture: ratio 0 reproduces the transformers model's logits
(<= 1e-5: the engine's output loaded by ``load_pruned`` and by ``AutoModelForCausalLM`` with
``trust_remote_code``) and the KV cache reproduces the full-sequence logits (Qwen3 also with
its sliding window); OLMo 2's ``o_proj`` / ``mlp`` taps read after the post-norms; every method
at 0.3 lands within the ratio tolerance, loads and generates with the cache what it
generates without, or refuses in one line (slimllm on OLMo 2); olica's streamed decisions
equal the in-memory reference's (OLMo 2's post-norm output taps included); streamed eval ==
in-memory eval; kill -9 + resume is byte-identical; nemotron-nas and GGUF refuse the blocks
in one line; version-1 layer specs (no q/k norm fields) still describe a Llama block.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from reference import logits_of, prune_in_memory
from streamprune import EvalConfig, PruneConfig, load_pruned, perplexity, perplexity_in_memory, prune
from streamprune.adapters import open_model
from streamprune.errors import ConfigError, UnsupportedArchitectureError
from streamprune.inputs.textdata import calibration_windows, resolve_text_source
from streamprune.methods import available, build_method
from streamprune.methods.slimllm.heads import slice_heads
from streamprune.modeling import StreamPruneConfig, StreamPruneForCausalLM
from streamprune.spec import LayerSpec
from test_resume import ARGS, digests, run_cli
from tiny import make_tiny_model

CALIB = dict(calib="c4", nsamples=8, seqlen=32, seed=0, chunk_tokens=96, progress=False, dtype="float32")
RATIO_TOLERANCE = 0.01  # the ratio contract (README): achieved total within ±1 percentage point
ARCHS = {
    "qwen3": dict(head_dim=32),  # head_dim independent of hidden / heads = 16
    "olmo2": dict(eos_token_id=0, pad_token_id=0),  # OLMo 2's defaults lie outside the tiny vocabulary
}
BLOCKS = {"qwen3": ("head", "pre"), "olmo2": ("proj", "post")}
REFUSED = {("olmo2", "slimllm"): "RMS denominator"}
RUNS = [(a, m) for a in ARCHS for m in available()]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("arch_sources")
    return {a: make_tiny_model(root / a, a, layers=2, inter=192, tie=True, random_norms=True, **kw) for a, kw in ARCHS.items()}


@pytest.fixture(scope="module")
def pruned(sources, tmp_path_factory) -> dict:
    """(arch, method) -> (output folder, report) of a 0.3 prune, made on first use."""
    root, done = tmp_path_factory.mktemp("arch_pruned"), {}

    def get(arch: str, method: str):
        if (arch, method) not in done:
            out = root / f"{arch}-{method}"
            done[arch, method] = out, prune(PruneConfig(source=sources[arch], out=out, method=method, ratio=0.3, **CALIB))
        return done[arch, method]

    return get


def _tokens(folder, n: int = 2) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(folder)
    return calibration_windows(tok, resolve_text_source("c4"), CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])[:n]


@torch.no_grad()
def _cached_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: a prefill of ``prefill`` tokens, then one token at a time with the cache."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, steps = getattr(out, "cache", None) or out.past_key_values, [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1).float()


@torch.no_grad()
def _greedy_same_with_and_without_cache(model, ids: torch.Tensor) -> None:
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_reproduces_source_logits_with_cache(arch, sources, tmp_path):
    out = tmp_path / "out"
    prune(PruneConfig(source=sources[arch], out=out, method="magnitude", ratio=0.0, **CALIB))
    specs = json.loads((out / "config.json").read_text())["layer_specs"]
    qk_norm, placement = BLOCKS[arch]
    assert all(s["qk_norm"] == qk_norm and s.get("norm_placement", "pre") == placement for s in specs)
    ids = _tokens(sources[arch])
    dense = AutoModelForCausalLM.from_pretrained(sources[arch], attn_implementation="sdpa").eval()
    want = logits_of(dense, ids)
    for model in (load_pruned(out).eval(), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
        assert (logits_of(model, ids) - want).abs().max().item() <= 1e-5
        assert (_cached_logits(model, ids, prefill=20) - want).abs().max().item() <= 1e-4
        _greedy_same_with_and_without_cache(model, ids[:1, :6])


@torch.no_grad()
def test_qwen3_sliding_window_ratio_zero_with_cache():
    """Qwen3 with ``use_sliding_window`` (layers from ``max_window_layers`` on), 20 tokens over a window of 6."""
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                      max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    src = Qwen3ForCausalLM(cfg).eval()
    for name, p in src.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
    spec = LayerSpec.dense(64, 4, 2, 32, 96, qk_norm="head")
    model = StreamPruneForCausalLM(StreamPruneConfig.from_source(src.config, [spec] * 2)).eval()
    model.load_state_dict(src.state_dict(), strict=True)
    assert model.config.layer_types == ["full_attention", "sliding_attention"] and model.config.sliding_window == 6
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    want = src(ids).logits
    assert (model(ids).logits - want).abs().max().item() <= 1e-5
    assert (_cached_logits(model, ids, prefill=4) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch,method", RUNS)
def test_method_at_0_3_loads_and_generates(arch, method, sources, pruned):
    if (arch, method) in REFUSED:
        with pytest.raises(UnsupportedArchitectureError, match=REFUSED[arch, method]) as e:
            pruned(arch, method)
        assert "\n" not in str(e.value)
        return
    out, report = pruned(arch, method)
    assert abs(report["achieved_ratio"] - 0.3) <= RATIO_TOLERANCE, report["achieved_ratio"]
    adapter = open_model(out)
    assert report["params_pruned"] == adapter.shapes().total_params(adapter.specs)
    assert {(s.qk_norm, s.norm_placement) for s in adapter.specs} == {BLOCKS[arch]}
    model = load_pruned(out).eval()
    ids = _tokens(sources[arch])
    logits = logits_of(model, ids)
    assert torch.isfinite(logits).all()
    assert (_cached_logits(model, ids, prefill=20) - logits).abs().max().item() <= 1e-4
    _greedy_same_with_and_without_cache(model, ids[:1, :6])


def assert_olica_streamed_equals_in_memory(src, out) -> None:
    """The olica output streamed into ``out`` holds the in-memory reference's tensors (≤ 5e-4 relative)."""
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), resolve_text_source("c4"),
                                 CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])
    method = build_method("olica", 0.3)
    method.plan(open_model(src).shapes())
    decisions = prune_in_memory(src, method, tokens)
    streamed = {}
    for f in sorted(out.glob("*.safetensors")):
        streamed.update(load_file(f))
    for i, d in enumerate(decisions):
        assert {k for k in streamed if k.startswith(f"model.layers.{i}.")} == {f"model.layers.{i}.{k}" for k in d.tensors}
        for name, ref in d.tensors.items():
            got = streamed[f"model.layers.{i}.{name}"]
            assert float((got - ref).norm() / ref.norm().clamp_min(1e-12)) < 5e-4, (i, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_olica_streamed_equals_in_memory(arch, sources, pruned):
    """Olica reads the attention output energy (OLMo 2: after the post-attention norm) and the
    FFN statistics; the streamed run's tensors equal the in-memory reference's."""
    out, _ = pruned(arch, "olica")
    assert_olica_streamed_equals_in_memory(sources[arch], out)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_eval_equals_in_memory(arch, sources, pruned):
    for folder in (sources[arch], pruned(arch, "cascade")[0]):
        cfg = EvalConfig(model=folder, dataset="wikitext2", seqlen=64, max_windows=6, chunk_tokens=256, dtype="float32", progress=False)
        streamed, ref = perplexity(cfg), perplexity_in_memory(cfg)
        assert streamed["tokens"] == ref["tokens"] == 6 * 63
        assert abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-4


@pytest.mark.parametrize("arch,method,point", [("qwen3", "olica", "observe:1"), ("olmo2", "cascade", "reconstructed:0")])
def test_sigkill_then_resume_is_byte_identical(arch, method, point, sources, tmp_path):
    cmd = lambda out: ["prune", sources[arch], "--out", out, "--method", method, "--ratio", "0.3", *ARGS]  # noqa: E731
    clean = run_cli(*cmd(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = run_cli(*cmd(tmp_path / "out"), crash_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*cmd(tmp_path / "out"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digests(tmp_path / "out") == digests(tmp_path / "clean")


@pytest.mark.parametrize("arch", ARCHS)
def test_nemotron_nas_and_gguf_refuse_the_block(arch, sources, pruned, tmp_path):
    from streamprune.formats.gguf import export_gguf
    from streamprune.formats.nemotron_nas import export

    word = "qk_norm"  # both blocks have q/k norms; the first thing the schema lacks
    with pytest.raises(ConfigError, match=word) as e:
        prune(PruneConfig(source=sources[arch], out=tmp_path / "nas", method="cascade", ratio=0.3, format="nemotron-nas", **CALIB))
    assert "\n" not in str(e.value) and "--format streamprune" in str(e.value)
    out, _ = pruned(arch, "cascade")
    with pytest.raises(ConfigError, match=word):
        export(out, tmp_path / "exported")
    with pytest.raises(ConfigError, match=word):
        export_gguf(out, tmp_path / "model.gguf", progress=False)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "model.gguf").exists()


def test_version_1_spec_dicts_are_llama_blocks():
    llama = LayerSpec.dense(64, 4, 2, 16, 96)
    v1 = llama.to_dict()
    assert "qk_norm" not in v1 and "norm_placement" not in v1  # Llama-family outputs serialise as before
    assert LayerSpec.from_dict(v1) == llama and (llama.qk_norm, llama.norm_placement) == ("none", "pre")
    assert set(llama.tensor_shapes()) >= {"input_layernorm.weight", "post_attention_layernorm.weight"}
    olmo = LayerSpec.dense(64, 4, 2, 16, 96, qk_norm="proj", norm_placement="post")
    shapes = olmo.tensor_shapes()
    assert shapes["self_attn.q_norm.weight"] == (64,) and shapes["self_attn.k_norm.weight"] == (32,)
    assert "input_layernorm.weight" not in shapes and shapes["post_feedforward_layernorm.weight"] == (64,)
    assert LayerSpec.from_dict(olmo.to_dict()) == olmo
    with pytest.raises(ValueError, match="qk_norm"):
        LayerSpec(**{**v1, "qk_norm": "rms"})


def test_head_slicing_keeps_whole_projection_norms_consistent():
    """Only query head 2 (group 1) stays: a whole-projection q/k norm keeps the kept
    heads' (groups') entries; a per-head norm stays whole."""
    h, H, G, d = 4, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    w = {f"self_attn.{p}_proj.weight": torch.randn(n * h, d, generator=g) for p, n in (("q", H), ("k", G), ("v", G))}
    w["self_attn.o_proj.weight"] = torch.randn(d, H * h, generator=g)
    proj = {**w, "self_attn.q_norm.weight": torch.arange(H * h).float(), "self_attn.k_norm.weight": torch.arange(G * h).float()}
    out = slice_heads(proj, [2], H, G, h)
    assert torch.equal(out["self_attn.q_norm.weight"], torch.arange(8, 12).float())
    assert torch.equal(out["self_attn.k_norm.weight"], torch.arange(4, 8).float())
    per_head = {**w, "self_attn.q_norm.weight": torch.ones(h), "self_attn.k_norm.weight": torch.ones(h)}
    out = slice_heads(per_head, [2], H, G, h)
    assert out["self_attn.q_norm.weight"].shape == (h,) and out["self_attn.k_norm.weight"].shape == (h,)


@torch.no_grad()
def recorded_taps(source, layer_idx: int):
    """Layer ``layer_idx`` of ``source`` (fp32) on a random (2, 7, 64) input, with what its ``o_proj``,
    ``mlp`` and ``layer`` taps saw: (input, its inner module, {tap: (tap input, tap output)}),
    the ``o_proj`` tap already checked to be the output after the post-attention norm."""
    from streamprune.observers import observing
    from streamprune.stream import position_embeddings

    adapter = open_model(source)
    layer = adapter.build_layer(layer_idx, adapter.read_layer(layer_idx), "cpu", torch.float32)
    seen: dict[str, tuple] = {}

    class Record:
        taps, summed = frozenset({"o_proj", "mlp", "layer"}), ()

        def update(self, tap, x_in, y_out):
            seen[tap] = (x_in, y_out)

    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with observing(layer, Record()):
        layer(x, position_embeddings(adapter.rotary("cpu"), 7, "cpu", torch.float32))
    inner = layer.inner
    o_in, o_out = seen["o_proj"]
    torch.testing.assert_close(o_out, inner.post_attention_layernorm(inner.self_attn.o_proj(o_in)), rtol=0, atol=0)
    return x, inner, seen


def test_post_norm_taps_read_outputs_after_the_norms(sources):
    """OLMo 2: the ``o_proj`` and ``mlp`` taps give (sub-block input, its post-norm output)."""
    x, inner, seen = recorded_taps(sources["olmo2"], 0)
    h = x.reshape(-1, 64) + seen["o_proj"][1]  # the MLP's input: the residual after the attention
    m_in, m_out = seen["mlp"]
    torch.testing.assert_close(m_in, h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m_out, inner.post_feedforward_layernorm(inner.mlp(m_in)), rtol=0, atol=0)
    torch.testing.assert_close(seen["layer"][1], h + m_out, rtol=1e-6, atol=1e-6)
