"""The project as people run it: from the checkout's root (the current directory first on
``sys.path``) and from a built wheel in an unrelated directory.

The top-level ``kernels/`` folder (installed as ``streamprune.kernels``) must never shadow
Hugging Face's ``kernels`` package, which transformers imports while loading ``LlamaConfig``
(kernels/README.md says how). Every command here runs in a subprocess with the working
directory named explicitly.

Run: ``.venv/bin/pytest tests/test_install.py -q`` (~2 min; the wheel test builds and
installs the package, PyPI reachable for the build backend).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamprune import EvalConfig, perplexity

from test_resume import ARGS, digests

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--method", "magnitude", "--ratio", "0.3", *ARGS]
EVAL = ["--dataset", "wikitext2", "--seqlen", "32", "--max-windows", "6", "--no-progress"]


def run(*cmd, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPRUNE_") and k != "PYTHONPATH"}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} in {cwd}:\n{r.stderr[-3000:]}"
    return r


def last_json(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


PROBE = """
import importlib.metadata, json, kernels, streamprune, streamprune.kernels.obs
from transformers import LlamaConfig
print(json.dumps({"kernels": kernels.__file__, "streamprune": streamprune.__file__,
                  "obs": streamprune.kernels.obs.__file__, "hf_kernels": importlib.metadata.version("kernels")}))
"""


def test_hf_kernels_is_installed():
    """The shadowing this file guards against needs Hugging Face's package present: it is,
    as a dependency of transformers (>= 5.25) or pinned in constraints.txt."""
    assert importlib.metadata.version("kernels")


def test_imports_from_the_project_root():
    probe = last_json(run(sys.executable, "-c", PROBE, cwd=ROOT))
    assert probe["kernels"] and not Path(probe["kernels"]).resolve().is_relative_to(ROOT / "kernels"), probe  # Hugging Face's
    assert Path(probe["streamprune"]).resolve() == ROOT / "streamprune" / "__init__.py"
    assert Path(probe["obs"]).resolve() == ROOT / "kernels" / "obs.py"  # through the streamprune/kernels link


def test_prune_and_eval_with_python_m_from_the_project_root(tiny_llama, tmp_path):
    out = tmp_path / "out"
    report = last_json(run(sys.executable, "-m", "streamprune", "prune", tiny_llama, "--out", out, *JOB, cwd=ROOT))
    assert report["method"]["method"] == "magnitude" and abs(report["achieved_ratio"] - 0.3) < 0.01
    ppl = last_json(run(sys.executable, "-m", "streamprune", "eval", out, *EVAL, cwd=ROOT))["ppl"]
    ref = perplexity(EvalConfig(model=out, dataset="wikitext2", seqlen=32, max_windows=6, progress=False))["ppl"]
    assert ppl == ref  # the same streamed evaluation, in a subprocess started from the root


def test_torchrun_from_the_project_root(tiny_llama, tmp_path):
    """2 CPU ranks (gloo) under ``torchrun -m streamprune`` started in the root; magnitude's
    decisions need no statistics, so the output is byte-identical to one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(sys.executable, "-m", "streamprune", "prune", tiny_llama, "--out", one, *JOB, cwd=ROOT)
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "streamprune",
        "prune", tiny_llama, "--out", two, *JOB, cwd=ROOT)
    a, b = digests(one), digests(two)
    del a["streamprune_report.json"], b["streamprune_report.json"]  # it names the output folder and the ranks
    assert a == b and any(name.startswith("model-layer-") for name in a)


def test_python_m_pytest_collects_the_suite_from_the_project_root():
    r = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", cwd=ROOT)
    tail = r.stdout.strip().splitlines()[-1]
    assert "tests collected" in tail and "error" not in tail, tail
    assert int(tail.split()[0]) > 300, tail


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """``pip install`` of a wheel built from a copy of the tracked tree (the build writes
    build/ and *.egg-info into its source folder, so never into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            dest.symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():  # a tracked file deleted in the work tree is skipped
            shutil.copy2(ROOT / name, dest)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", src, "-w", dist, cwd=tmp)
    (wheel,) = dist.glob("streamprune-*.whl")
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target", site, wheel, cwd=tmp)
    return site


def test_built_wheel_runs_from_an_unrelated_directory(wheel_site, tiny_llama, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(wheel_site)}  # ahead of the checkout's editable install
    probe = last_json(run(sys.executable, "-c", PROBE, cwd=elsewhere, env=env))
    assert Path(probe["streamprune"]).is_relative_to(wheel_site), probe
    assert Path(probe["obs"]).is_relative_to(wheel_site) and not Path(probe["obs"]).is_symlink(), probe
    assert not Path(probe["kernels"]).is_relative_to(wheel_site) and not Path(probe["kernels"]).resolve().is_relative_to(ROOT / "kernels")
    kernels = sorted(p.name for p in (wheel_site / "streamprune" / "kernels").glob("*.py"))
    assert kernels == sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    cli = [sys.executable, "-m", "streamprune"]
    report = last_json(run(*cli, "prune", tiny_llama, "--out", tmp_path / "out", *JOB, cwd=elsewhere, env=env))
    assert abs(report["achieved_ratio"] - 0.3) < 0.01
    ppl = last_json(run(*cli, "eval", tmp_path / "out", *EVAL, cwd=elsewhere, env=env))["ppl"]
    assert 1 < ppl < 1e6
    assert (tmp_path / "out" / "modeling_streamprune.py").is_file()  # the modeling file came from the wheel
