"""CPU memory does not grow with depth: 32-layer vs 8-layer twin (same width).

Run: ``.venv/bin/pytest tests/test_memory.py -q``. Precise figures: ``benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import json

import pytest

from test_resume import run_cli
from tiny import make_tiny_model

WIDTH = dict(hidden=512, inter=1536, heads=8, kv_heads=2)  # 13.6 MB of fp32 weights per layer


@pytest.mark.slow
def test_peak_rss_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (8, 32):
        model = make_tiny_model(tmp_path / f"m{layers}", "llama", layers=layers, shards=4, **WIDTH)
        r = run_cli("prune", model, "--out", tmp_path / f"o{layers}", "--method", "magnitude", "--ratio", "0.2",
                    "--nsamples", "16", "--seqlen", "64", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        peaks[layers] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    # Holding every layer would add 24 x 13.6 MB = 326 MB (> 50 %) to the 32-layer peak.
    assert peaks[32] <= 1.10 * peaks[8], peaks
