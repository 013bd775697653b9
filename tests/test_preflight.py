"""Preflight / --dry-run: exact achieved ratio, memory forecast bounding the real peak.

Run: ``.venv/bin/pytest tests/test_preflight.py -q``
"""

from __future__ import annotations

import json

import pytest

from streamprune.config import parse_size
from test_resume import run_cli

ARGS = ["--calib", "c4", "--nsamples", "16", "--seqlen", "32", "--no-progress"]


@pytest.mark.parametrize("method", ["magnitude", "olica"])
def test_dry_run_matches_real_run(tiny_llama, tmp_path, method):
    out = tmp_path / "out"
    dry = run_cli("prune", tiny_llama, "--out", out, "--method", method, "--ratio", "0.3", "--dry-run", *ARGS)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout.strip().splitlines()[-1])
    assert plan["dry_run"] and not out.exists() and not (tmp_path / "out.work").exists()
    real = run_cli("prune", tiny_llama, "--out", out, "--method", method, "--ratio", "0.3", *ARGS)
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout.strip().splitlines()[-1])
    assert plan["achieved_ratio"] == report["achieved_ratio"]
    assert plan["params_pruned"] == report["params_pruned"]
    assert plan["cpu_bytes"] >= report["peak_rss_bytes"], (plan["cpu_bytes"], report["peak_rss_bytes"])
    assert plan["disk_bytes"] > 0 and plan["disk_free_bytes"] > plan["disk_bytes"]


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(Exception, match="24GiB"):
        parse_size("lots")


def test_forecast_counts_each_layer_pass_and_writes_in_the_storage_dtype(tmp_path):
    """Time: 2 FLOP per parameter per token for every pass of every layer (dense passes over the
    dense layer, pruned ones over the kept layer); disk: the output in the source's dtype."""
    from dataclasses import replace

    import torch

    from streamprune import preflight
    from streamprune.shapes import ModelShapes

    shapes = ModelShapes(num_layers=3, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4, head_dim=64, vocab_size=1000,
                         tie_word_embeddings=False, qkv_bias=False, o_bias=False, max_position_embeddings=512)
    dense = shapes.dense_spec()
    specs = [replace(dense, intermediate_size=2048)] * 3

    def fc(**kw):
        kw = {"chunk_rows": 128, **kw}
        return preflight.forecast(shapes, specs, nsamples=64, seqlen=512, dtype=torch.float32, device=torch.device("cpu"),
                                  workspace=0, work_dir=tmp_path, survey=False, **kw)  # shapes only: nothing is allocated

    tokens = 64 * 512
    one = fc()
    assert one.forward_tflop == round(2 * tokens * 3 * (dense.num_params() + specs[0].num_params()) / 1e12, 3)
    two = fc(dense_passes=2, pruned_passes=2, method_flop=1e9)
    assert two.wall_s > one.wall_s > 0
    bf16, fp32 = fc(storage_itemsize=2), fc(storage_itemsize=4)
    assert fp32.disk_bytes - bf16.disk_bytes == 2 * shapes.total_params(specs)
    assert fc(chunk_rows=64).device_bytes == one.device_bytes  # a chunk never holds more than the 64 windows there are
