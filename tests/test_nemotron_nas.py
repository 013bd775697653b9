"""The nemotron-nas (DeciLM) output format: ``streamprune.formats.nemotron_nas`` and the
``DeciLMForCausalLM`` modeling files it ships.

Run:  .venv/bin/pytest tests/test_nemotron_nas.py -q   (-m 'not slow' skips the demo model)

Tiny streamprune-format folders with chosen layer specs and random weights (hidden 64,
4 heads / 2 KV heads; FFN widths multiples of 256; a layer without attention, one without
FFN, one without either) are exported. What the tests prove: ``ffn_mult`` gives every
width exactly in vLLM's and mlx-lm's arithmetic; the config read as vLLM's
``nemotron_nas.py`` reads it describes every tensor in the safetensors and nothing more;
transformers on the export (our class in-process and through ``trust_remote_code``) gives
the streamprune model's logits (Llama and a q/k/v-biased Qwen2 source); cached generation
equals uncached; ``streamprune eval``'s streamed perplexity equals the in-memory one; the
fit check names the first layer and field that does not fit; lm-eval's ``hf`` model scores
the folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamprune import EvalConfig, load_pruned, perplexity, perplexity_in_memory
from streamprune.cli import main as cli_main
from streamprune.errors import StreamPruneError
from streamprune.formats import nemotron_nas as nas
from streamprune.modeling import DeciLMConfig, StreamPruneConfig, StreamPruneForCausalLM
from streamprune.spec import LayerSpec
from tiny import tiny_config, tiny_tokenizer

D, H, G, HD = 64, 4, 2, 16
TASKS = Path(__file__).resolve().parents[1] / "streamprune" / "data" / "lmeval"


def _spec(kv: int, hpg: int, width: int, bias: bool = False, **kw) -> LayerSpec:
    return LayerSpec(D, kv, hpg, HD, HD, width, qkv_bias=bias and kv > 0, **kw)


def _specs(bias: bool = False) -> list[LayerSpec]:
    """Heterogeneous layers: GQA 2x2 / no attention / MQA without FFN / MHA / identity / GQA."""
    return [
        _spec(2, 2, 256, bias),
        _spec(0, 0, 512, bias),
        _spec(1, 4, 0, bias),  # attention only: a zero FFN of 256 is written (llama.cpp)
        _spec(4, 1, 512, bias),
        _spec(0, 0, 0, bias),  # neither: no tensors at all
        _spec(2, 2, 256, bias),
    ]


def random_streamprune_model(src, specs: list[LayerSpec], seed: int = 0) -> StreamPruneForCausalLM:
    """A streamprune model of ``specs`` on config ``src`` with random weights of unit-scale outputs."""
    model = StreamPruneForCausalLM(StreamPruneConfig.from_source(src, specs)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def write_streamprune_folder(folder: Path, specs: list[LayerSpec], arch: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A streamprune output folder (config with layer_specs, safetensors, tokenizer) of random weights."""
    src = tiny_config(arch, layers=len(specs), hidden=D, heads=H, kv_heads=G, inter=128, tie=tie)
    model = random_streamprune_model(src, specs, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nas_llama")
    sp = write_streamprune_folder(root / "sp", _specs())
    nas.export(sp, root / "nas")
    return sp, root / "nas"


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nas_qwen2")
    sp = write_streamprune_folder(root / "sp", _specs(bias=True), arch="qwen2", tie=True)
    nas.export(sp, root / "nas")
    return sp, root / "nas"


# ------------------------------------------------------------------------- ffn_mult
def test_ffn_mult_gives_every_width_exactly_as_the_engines_compute_it():
    for hidden in (64, 576, 4096, 8192):
        for width in range(256, 16 * hidden + 1, 256):
            m = nas.ffn_mult_for(width, hidden)
            assert isinstance(m, float)  # llama.cpp's converter asserts a float ffn_mult
            assert json.loads(json.dumps(m)) == m
            assert nas.intermediate_size(m, hidden) == width  # vLLM's _ffn_mult_to_intermediate_size
            assert nas.intermediate_size(round(m, 6), hidden) == width  # mlx-lm rounds ffn_mult to 6 decimals
    assert nas.ffn_mult_for(28672, 8192) == 5.25  # Llama-3.1-Nemotron-51B's dense FFN
    with pytest.raises(ValueError):
        nas.ffn_mult_for(300, 576)


# ----------------------------------------------------------- the config as vLLM reads it
def _vllm_ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    # verbatim from vllm/model_executor/models/nemotron_nas.py
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    return _vllm_find_multiple(intermediate_size, 256)


def _vllm_find_multiple(n: int, k: int) -> int:
    if n % k == 0:
        return n
    return n + k - (n % k)


def _shapes_as_vllm_reads(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape that vLLM's DeciLMDecoderLayer / DeciModel allocate."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    bias = cfg.get("attention_bias", False)
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (cfg["vocab_size"], d)
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            kv = heads // block["attention"]["n_heads_in_group"]
            out[p + "input_layernorm.weight"] = (d,)
            for name, rows, cols in (("q", heads * hd, d), ("k", kv * hd, d), ("v", kv * hd, d), ("o", d, heads * hd)):
                out[p + f"self_attn.{name}_proj.weight"] = (rows, cols)
                if bias:  # vLLM: bias_o_proj = attention_bias
                    out[p + f"self_attn.{name}_proj.bias"] = (rows,)
        if not block["ffn"]["no_op"]:
            f = _vllm_ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"], d)
            out[p + "post_attention_layernorm.weight"] = (d,)
            out[p + "mlp.gate_proj.weight"] = (f, d)
            out[p + "mlp.up_proj.weight"] = (f, d)
            out[p + "mlp.down_proj.weight"] = (d, f)
    return out


def _stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shapes = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    assert set(shapes) == set(index["weight_map"])
    return shapes


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_config_read_as_vllm_describes_every_tensor(which, llama_pair, qwen2_pair):
    sp, folder = {"llama": llama_pair, "qwen2": qwen2_pair}[which]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert _stored_shapes(folder) == _shapes_as_vllm_reads(cfg)
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False, True, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, False, True, False]
    widths = [0 if b["ffn"]["no_op"] else _vllm_ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], D) for b in blocks]
    assert widths == [256, 512, 256, 512, 0, 256]  # layer 2: the zero FFN llama.cpp needs
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, None, 4, 1, None, 2]
    # no removed sub-block has a tensor or a norm (checked by the equality above) and the
    # zero FFN is zeros
    with safe_open(folder / "model-layer-00002.safetensors", framework="pt") as f:
        assert not f.get_tensor("model.layers.2.mlp.down_proj.weight").any()
    assert not (folder / "model-layer-00004.safetensors").exists()
    assert cfg["attention_bias"] is (which == "qwen2") and cfg["mlp_bias"] is False
    if which == "qwen2":  # Qwen2 has no o bias: a zero one is written
        with safe_open(folder / "model-layer-00000.safetensors", framework="pt") as f:
            assert not f.get_tensor("model.layers.0.self_attn.o_proj.bias").any()
            assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").any()
    # Llama-3-era keys and transformers 5's rope_parameters, both
    for key in ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "head_dim",
                "num_key_value_heads", "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "vocab_size"):
        assert key in cfg, key
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and cfg["rope_scaling"] is None
    assert cfg["num_key_value_heads"] == G and cfg["head_dim"] == D // H
    # the config class gives vLLM's attribute access
    c = DeciLMConfig.from_pretrained(folder)
    assert c.block_configs[0].attention.n_heads_in_group == 2 and c.block_configs[1].attention.no_op
    assert c.block_configs[3].ffn.ffn_mult == blocks[3]["ffn"]["ffn_mult"] and not hasattr(c.block_configs[0].ffn, "hidden_act")
    for name in ("configuration_decilm.py", "modeling_decilm.py", "cache_compat_streamprune.py", "tokenizer.json"):
        assert (folder / name).is_file()
    params = sum(math.prod(s) for s in _stored_shapes(folder).values())  # tied embedding stored once
    assert nas.export(sp, folder.parent / f"again-{which}")["params"] == params


def test_llama3_rope_is_written_in_both_forms(tmp_path):
    src = tiny_config("llama", layers=1, hidden=D, heads=H, kv_heads=G, inter=256)
    src.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = nas.config_dict(src, [_spec(2, 2, 256)], "float32")
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {k: v for k, v in src.rope_parameters.items() if k != "rope_theta"}
    assert cfg["rope_parameters"] == src.rope_parameters
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert DeciLMConfig.from_pretrained(tmp_path).rope_parameters == src.rope_parameters


# -------------------------------------------------------------- transformers on the folder
def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, len(tiny_tokenizer()), (batch, seq), generator=torch.Generator().manual_seed(1))


# Loads through the folder's own remote code in a fresh interpreter (in-process, the
# register()ed class would win over it); streamprune is never imported there.
_REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
d, out = sys.argv[1], sys.argv[2]
model, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True, dtype=torch.float32)
assert not {k: v for k, v in info.items() if v}, info
assert type(model).__name__ == "DeciLMForCausalLM" and not type(model).__module__.startswith("streamprune"), type(model)
assert not [m for m in sys.modules if m.split(".")[0] == "streamprune"]
ids, mask = torch.load(out + "/ids.pt")
with torch.no_grad():
    torch.save(model.eval()(ids, attention_mask=mask).logits, out + "/remote_logits.pt")
"""


@torch.no_grad()
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_transformers_logits_equal_the_streamprune_model(which, llama_pair, qwen2_pair, tmp_path):
    sp, folder = {"llama": llama_pair, "qwen2": qwen2_pair}[which]
    ref = load_pruned(sp, dtype=torch.float32).eval()
    ours, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)  # register()ed by load_pruned
    assert type(ours).__name__ == "DeciLMForCausalLM" and not {k: v for k, v in info.items() if v}, info
    ours.eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    want = ref(ids, attention_mask=mask).logits
    assert (ours(ids, attention_mask=mask).logits - want)[mask.bool()].abs().max().item() <= 1e-5
    assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5

    torch.save((ids, mask), tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(folder), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # cwd: not the repo root (its kernels/ folder)
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(tmp_path / "remote_logits.pt")
    assert (remote - want)[mask.bool()].abs().max().item() <= 1e-5


@torch.no_grad()
def test_generate_with_cache_equals_without(llama_pair):
    _, folder = llama_pair
    model = load_pruned(folder, dtype=torch.float32).eval()
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 24) and torch.equal(cached, uncached)
    # the cache holds keys for attention layers only, with each layer's own KV heads
    out = model(ids, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
    kv_heads = [layer.keys.shape[1] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]
    assert kv_heads == [2, 0, 1, 4, 0, 2]


# -------------------------------------------------------------------------- evaluation
def test_streamed_eval_equals_in_memory_and_the_source(llama_pair):
    sp, folder = llama_pair
    kw = dict(dataset="wikitext2", seqlen=64, max_windows=6, dtype="float32", progress=False)
    streamed = perplexity(EvalConfig(model=folder, **kw))
    in_memory = perplexity_in_memory(EvalConfig(model=folder, **kw))
    source = perplexity(EvalConfig(model=sp, **kw))
    assert streamed["tokens"] == in_memory["tokens"] == source["tokens"] > 0
    assert abs(streamed["nll"] - in_memory["nll"]) <= 1e-5 * in_memory["nll"]
    assert abs(streamed["nll"] - source["nll"]) <= 1e-5 * source["nll"]


def test_cli_export_ends_with_one_json_line(llama_pair, tmp_path, capsys):
    sp, _ = llama_pair
    assert cli_main(["export", str(sp), str(tmp_path / "o"), "--format", "nemotron-nas"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nemotron_nas"]
    assert result["out"] == str((tmp_path / "o").resolve()) and result["params"] > 0 and result["files"] >= 8


# --------------------------------------------------------------------------- fit check
@pytest.mark.parametrize(
    "layer,change,field",
    [
        (1, dict(q_rank=8), "q_rank=8"),
        (2, dict(num_kv_heads=1, heads_per_group=2), "num_kv_heads=1"),
        (3, dict(v_head_dim=8), "v_head_dim=8"),
        (1, dict(intermediate_size=300), "intermediate_size=300"),
        (3, dict(bypass_rank=4), "bypass_rank=4"),
        (2, dict(down_bias=True), "down_bias=True"),
        (0, dict(num_kv_heads=0, heads_per_group=0), "num_kv_heads=0"),
    ],
)
def test_fit_check_names_the_first_layer_and_field(layer, change, field, tmp_path):
    specs = [_spec(2, 2, 256) for _ in range(4)]
    specs[layer] = LayerSpec(**{**specs[layer].to_dict(), **change})
    specs[3] = LayerSpec(**{**specs[3].to_dict(), "q_rank": 4}) if layer < 3 else specs[3]  # a later misfit is not named
    src = tiny_config("llama", layers=4, hidden=D, heads=H, kv_heads=G)
    with pytest.raises(StreamPruneError) as e:
        nas.check_fits(specs, src)
    msg = str(e.value)
    assert msg.startswith(f"layer {layer}: {field} (") and "\n" not in msg
    if "rank" in field:
        assert "--method cascade --option structure=servable" in msg
    # export refuses before writing anything
    sp = write_streamprune_folder(tmp_path / "sp", specs)
    with pytest.raises(StreamPruneError, match=f"layer {layer}: {field}"):
        nas.export(sp, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["sp"]


def test_export_refuses_a_non_empty_output_and_pickles(llama_pair, tmp_path):
    sp, folder = llama_pair
    with pytest.raises(StreamPruneError, match="not empty"):
        nas.export(sp, folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((sp / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(StreamPruneError, match="never unpickles"):
        nas.export(pickled, tmp_path / "out")


# ------------------------------------------------------------------------------- lm-eval
def test_lm_eval_hf_model_scores_the_folder(llama_pair, tmp_path):
    pytest.importorskip("lm_eval")
    _, folder = llama_pair
    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    cmd = [str(Path(sys.executable).with_name("lm-eval")), "run", "--model", "hf",
           "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
           "--include_path", str(TASKS), "--tasks", "streamprune_wikicloze", "--limit", "10",
           "--batch_size", "4", "--log_samples", "--output_path", str(results)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (summary,) = results.rglob("results_*.json")
    assert "acc,none" in json.loads(summary.read_text())["results"]["streamprune_wikicloze"]
    (samples,) = results.rglob("samples_streamprune_wikicloze_*.jsonl")
    model, tok = load_pruned(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)
    docs = [json.loads(line) for line in samples.read_text().splitlines() if line]
    assert len(docs) == 10
    for s in docs:
        for i, args in enumerate(s["arguments"].values()):
            got = float(s["resps"][i][0][0])
            whole, ctx = tok.encode(args["arg_0"] + args["arg_1"]), tok.encode(args["arg_0"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0].double(), -1)
            want = logp[len(ctx) - 1 : len(whole) - 1].gather(1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()
            assert abs(got - want) <= 1e-5 * abs(want)


# ---------------------------------------------------------------------- the demo model
@pytest.mark.slow
def test_demo_model_exports_with_its_perplexity(tmp_path):
    from streamprune.inputs.demo_model import ensure_demo_model

    demo = ensure_demo_model()
    out = tmp_path / "nas"
    result = nas.export(demo, out)
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["block_configs"]) == 30 and {b["ffn"]["ffn_mult"] for b in cfg["block_configs"]} == {nas.ffn_mult_for(1536, 576)}
    assert result["params"] == 134515008  # SmolLM2-135M, tied embeddings counted once
    kw = dict(dataset="wikitext2", seqlen=128, max_windows=4, progress=False)
    a, b = perplexity(EvalConfig(model=demo, **kw)), perplexity(EvalConfig(model=out, **kw))
    assert abs(a["nll"] - b["nll"]) <= 1e-6 * a["nll"]


# --------------------------------------------------------------------- llama.cpp (GGUF)
def test_llama_cpp_runs_the_export_like_transformers(tmp_path):
    """streamprune folder -> nemotron-nas -> GGUF (``export --gguf``) -> llama.cpp: the same
    logits as the streamprune model, with a layer without attention, an attention-only layer
    (written with its zero FFN), an identity layer in the middle and one last."""
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama_cpp is not importable: install the runtime with `.venv/bin/pip install -e '.[llamacpp]'`")
    from streamprune.inputs.demo_model import ensure_demo_model
    from streamprune.formats.gguf import export_gguf

    demo = ensure_demo_model(progress=False)  # its tokenizer: one llama.cpp knows
    specs = _specs() + [_spec(0, 0, 0)]
    src = tiny_config("llama", layers=len(specs), hidden=D, heads=H, kv_heads=G, inter=128, tie=True)
    src.vocab_size = 49152
    model = random_streamprune_model(src, specs, 0)
    model.save_pretrained(tmp_path / "sp")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sp" / name).write_bytes((demo / name).read_bytes())
    info = export_gguf(tmp_path / "sp", tmp_path / "m.gguf", "f32", progress=False)
    assert info["via"] == "nemotron-nas"
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), logits_all=True, n_ctx=128, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = AutoTokenizer.from_pretrained(demo).encode("The history of London is long: the city grew along the Thames for centuries.")
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
