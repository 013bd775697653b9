"""The demo job's plumbing (fast; the real run is covered by tests/test_demo_integration.py).

Run: ``.venv/bin/pytest tests/test_demo.py -q``
"""

from __future__ import annotations

import pytest

from streamprune import demo
from streamprune.errors import OutputError

REPORT = {"achieved_ratio": 0.2, "params_dense": 10, "params_pruned": 8, "run": {"wall_s": 1.0, "peak_rss_bytes": 1}}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "ensure_demo_model", lambda: tmp_path / "model")
    monkeypatch.setattr(demo, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(demo, "perplexity", lambda cfg: {"ppl": 10.0 if cfg.model.name == "model" else 20.0, "windows": 64})

    def prune(cfg):
        calls.append(cfg)
        if len(calls) == 1 and not cfg.fresh:
            cfg.out.mkdir(parents=True)
            raise OutputError("exists and is not a previous run of this job")
        return REPORT

    monkeypatch.setattr(demo, "prune", prune)
    monkeypatch.setattr(demo, "greedy_sample", lambda folder: f"text of {folder.name}")
    return calls


def test_demo_replaces_its_own_stale_output(fake, tmp_path, capsys):
    result = demo.run_demo(method="olica")
    assert [c.fresh for c in fake] == [False, True]
    assert result["ppl_dense"] == 10.0 and result["ppl_pruned"] == 20.0 and result["achieved_ratio"] == 0.2
    # ends with a greedy sample of the dense and of the pruned model, on the same prompt
    assert result["sample_dense"] == "text of model" and result["sample_pruned"] == "text of smollm2-olica-20"
    err = capsys.readouterr().err.splitlines()
    assert demo.SAMPLE_PROMPT in err[-4] and err[-3].split() == ["dense", "...text", "of", "model"]
    assert err[-2].split()[0] == "pruned"
    assert err[-1].startswith("  llama.cpp") and result["llama_cpp"] in err[-1]  # no GGUF of a streamprune-structure model
    assert "--format nemotron-nas" in err[-1]


def test_demo_ends_with_llama_cpp_on_the_servable_structure(fake, tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(demo, "llama_cpp_sample", lambda folder: seen.append(folder) or
                        {"gguf": "f.gguf", "gguf_bytes": 3 * 2**20, "gguf_type": "q8_0", "sample": "llama text"})
    result = demo.run_demo(method="cascade", fmt="nemotron-nas")
    assert all(c.format == "nemotron-nas" for c in fake) and seen == [tmp_path / "cache" / "demo-out" / "smollm2-cascade-20-nemotron-nas"]
    assert result["llama_cpp"]["sample"] == "llama text"
    assert capsys.readouterr().err.splitlines()[-1].split() == ["llama.cpp", "(q8_0", "GGUF,", "3.0", "MiB)", "...llama", "text"]


def test_demo_never_deletes_a_user_out(fake, tmp_path):
    with pytest.raises(OutputError):
        demo.run_demo(method="olica", out=tmp_path / "mine")
    assert (tmp_path / "mine").exists()
