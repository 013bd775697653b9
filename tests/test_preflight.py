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
