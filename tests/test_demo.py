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
    assert demo.SAMPLE_PROMPT in err[-3] and err[-2].split() == ["dense", "...text", "of", "model"]
    assert err[-1].split()[0] == "pruned"


def test_demo_never_deletes_a_user_out(fake, tmp_path):
    with pytest.raises(OutputError):
        demo.run_demo(method="olica", out=tmp_path / "mine")
    assert (tmp_path / "mine").exists()
