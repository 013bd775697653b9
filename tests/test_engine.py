"""Streaming engine contract on tiny random GQA models (Llama, Qwen2 with q/k/v bias).

Run: ``.venv/bin/pytest tests/test_engine.py -q`` (on a GPU machine add ``--device cuda``)
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference import logits_of, prune_in_memory
from streamprune import EvalConfig, PruneConfig, load_pruned, perplexity, perplexity_in_memory, prune
from streamprune.storage.activations import ActivationCache
from streamprune.adapters import open_model
from streamprune.methods import build_method
from streamprune.inputs.textdata import calibration_windows, resolve_text_source

CALIB = dict(calib="c4", nsamples=8, seqlen=32, seed=0, chunk_tokens=96, progress=False)  # 3 rows/chunk: 3 chunks


def _tokens(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    return calibration_windows(tok, resolve_text_source("c4"), CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])


def _output_tensors(out):
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _engine_logits(run_dir, out, tokens):
    """Logits from the engine's own propagation: the last activation boundary + norm + head."""
    adapter = open_model(out)
    outer = adapter.read_outer()
    cache = ActivationCache(run_dir / "acts")
    hidden = torch.cat(list(cache.read(adapter.num_layers)))
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(adapter.config.hidden_size, eps=adapter.config.rms_norm_eps)
    norm.weight.data.copy_(outer["model.norm.weight"])
    head = outer.get("lm_head.weight", outer["model.embed_tokens.weight"])
    with torch.no_grad():
        return torch.nn.functional.linear(norm(hidden), head)


def test_streamed_equals_in_memory(tiny_model, tmp_path, device):
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_model, out=out, method="magnitude", ratio=0.2, keep_work=True, device=device, dtype="float32", **CALIB))
    tokens = _tokens(tiny_model)
    method = build_method("magnitude", 0.2)
    method.plan(open_model(tiny_model).shapes())
    decisions = prune_in_memory(tiny_model, method, tokens)
    streamed = _output_tensors(out)
    for i, d in enumerate(decisions):
        for name, t in d.tensors.items():
            torch.testing.assert_close(streamed[f"model.layers.{i}.{name}"], t, rtol=0, atol=0)
    model = load_pruned(out).eval()
    # logits of the loaded output == the engine's own propagation (fp32, chunked vs whole batch)
    torch.testing.assert_close(logits_of(model, tokens), _engine_logits(tmp_path / "out.work", out, tokens), rtol=1e-4, atol=1e-4)
    assert 0.19 <= report["achieved_ratio"] <= 0.21


def test_ratio_zero_reproduces_dense_logits(tiny_model, tmp_path, device):
    out = tmp_path / "out"
    prune(PruneConfig(source=tiny_model, out=out, method="magnitude", ratio=0.0, device=device, dtype="float32", **CALIB))
    tokens = _tokens(tiny_model)[:2]
    dense = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    pruned = load_pruned(out).eval()
    torch.testing.assert_close(logits_of(pruned, tokens), logits_of(dense, tokens), rtol=1e-5, atol=1e-5)


def test_output_loads_with_remote_code(tiny_llama, tmp_path):
    out = tmp_path / "out"
    prune(PruneConfig(source=tiny_llama, out=out, method="magnitude", ratio=0.2, **CALIB))
    tokens = _tokens(tiny_llama)[:2]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    local = load_pruned(out).eval()
    assert type(remote).__name__ == "StreamPruneForCausalLM"
    torch.testing.assert_close(logits_of(remote, tokens), logits_of(local, tokens), rtol=0, atol=0)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "modeling_streamprune.py" in files and "configuration_streamprune.py" in files and "cache_compat_streamprune.py" in files
    assert "tokenizer.json" in files
    assert sum(f.startswith("model-layer-") for f in files) == 4


def test_streamed_ppl_equals_in_memory(tiny_model, device):
    cfg = EvalConfig(model=tiny_model, dataset="wikitext2", seqlen=64, max_windows=12, chunk_tokens=256, device=device, dtype="float32", progress=False)
    streamed, ref = perplexity(cfg), perplexity_in_memory(cfg)
    assert streamed["tokens"] == ref["tokens"] == 12 * 63
    assert abs(streamed["ppl"] / ref["ppl"] - 1) < 1e-4


def test_sigterm_during_streamed_eval_cleans_its_activation_folder(tiny_llama, tmp_path, monkeypatch):
    import os
    import signal

    import pytest

    from streamprune import evaluate
    from streamprune.run.interrupts import Interrupted

    real = evaluate.propagate

    def signal_at_layer_1(layer, cache, i, *args):
        assert list(tmp_path.glob("streamprune-eval-*")), "the activation folder exists while evaluating"
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(layer, cache, i, *args)

    monkeypatch.setattr(evaluate, "propagate", signal_at_layer_1)
    cfg = EvalConfig(model=tiny_llama, seqlen=64, max_windows=4, work_dir=tmp_path, dtype="float32", progress=False)
    with pytest.raises(Interrupted, match="evaluation stopped by SIGTERM"):
        perplexity(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_eval_removes_folders_of_killed_evaluations_only(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed, alive, foreign = tmp_path / "streamprune-eval-killed", tmp_path / "streamprune-eval-alive", tmp_path / "streamprune-eval-x"
    for folder, pid in ((killed, dead.stdout.strip()), (alive, str(os.getpid())), (foreign, None)):
        (folder / "acts").mkdir(parents=True)
        if pid is not None:
            (folder / "pid").write_text(pid)
    cfg = EvalConfig(model=tiny_llama, seqlen=64, max_windows=2, work_dir=tmp_path, dtype="float32", progress=False)
    assert perplexity(cfg)["windows"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, foreign.name]  # own pid: a running eval; no pid: not ours
