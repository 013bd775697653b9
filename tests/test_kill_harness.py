"""Kill -9 at random instants (small scale): ``benchmarks/kill_harness.py`` on a tiny model.

The harness SIGKILLs the prune process itself (no shell in between) at >= 6 random
instants of the run, reruns the same command until it finishes and compares every output
file with an uninterrupted run (only the report's ``run`` block may differ). The
full-scale figures (demo model, >= 20 kills per method) are in benchmarks/RESULTS.md.

Run: ``.venv/bin/pytest tests/test_kill_harness.py -q`` (~2-4 min: ~8 prune processes per method).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import make_tiny_model

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_harness.py"


@pytest.fixture(scope="module")
def tiny_deep(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_deep"), "qwen2", layers=8, tie=True)


# olica only: its run has every phase magnitude's has plus the survey (magnitude's kills added
# ~110 s of CI for no path olica misses; the targeted kill points of test_resume cover it).
@pytest.mark.parametrize("method", ["olica"])
def test_random_sigkills_resume_byte_identical(tiny_deep, tmp_path, method):
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--method", method, "--source", str(tiny_deep), "--ratio", "0.3", "--nsamples", "32",
         "--seqlen", "32", "--chunk-tokens", "256", "--kills", "6", "--kills-per-trial", "8", "--kill-seed", "1",
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["kills"] >= 6
    assert rec["kills_identical"] == rec["kills"]  # every chain of kills ended byte-identical ...
    assert rec["trials_identical"] == rec["trials_clean"] == rec["trials"]  # ... with a clean run dir
    assert len(rec["phases"]) >= 2, rec["phases"]  # the kills did not all land in one phase
    assert rec["output_files"] >= 8 + 5  # layers + outer, index, config, modeling files, report
