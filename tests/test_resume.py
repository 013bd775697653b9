"""Crash safety: SIGKILL at several points, resume, byte-identical output; fingerprints.

Run: ``.venv/bin/pytest tests/test_resume.py -q``
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamprune import PruneConfig, prune
from streamprune.errors import StreamPruneError

ARGS = ["--calib", "c4", "--nsamples", "8", "--seqlen", "32", "--chunk-tokens", "96", "--no-progress"]


def run_cli(*args, crash_at: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STREAMPRUNE_CRASH_AT"}
    if crash_at:
        env["STREAMPRUNE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "streamprune.cli", *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file; the report is compared without its volatile "run" block."""
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "streamprune_report.json":
            report = json.loads(data)
            report.pop("run")
            data = json.dumps(report, sort_keys=True).encode()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def baseline(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "out"
    r = run_cli("prune", tiny_llama, "--out", out, "--method", "magnitude", "--ratio", "0.3", *ARGS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["achieved_ratio"] > 0.25
    return digests(out)


@pytest.mark.parametrize("point", ["observe:1", "written:2", "committed:1", "finalize"])
def test_sigkill_then_resume_is_byte_identical(tiny_llama, tmp_path, baseline, point):
    out = tmp_path / "out"
    cmd = ["prune", tiny_llama, "--out", out, "--method", "magnitude", "--ratio", "0.3", *ARGS]
    killed = run_cli(*cmd, crash_at=point)
    assert killed.returncode == -9, killed.stderr  # really SIGKILLed
    assert not out.exists()  # nothing visible in the output folder
    resumed = run_cli(*cmd)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "streamprune_report.json").read_text())
    expected_start = {"observe:1": 1, "written:2": 2, "committed:1": 2, "finalize": 4}[point]
    assert report["run"]["resumed_from_layer"] == expected_start
    assert digests(out) == baseline


def test_fingerprint_mismatch_names_field_and_fresh_restarts(tiny_llama, tmp_path):
    out = tmp_path / "out"
    cmd = ["prune", tiny_llama, "--out", out, "--method", "magnitude", "--ratio", "0.3", *ARGS]
    assert run_cli(*cmd, crash_at="committed:0").returncode == -9
    changed = [c if c != "0.3" else "0.2" for c in cmd] + ["--seed", "1"]
    r = run_cli(*changed)
    assert r.returncode == 2
    assert "method.ratio" in r.stderr and "calibration.seed" in r.stderr and "--fresh" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*changed, "--fresh")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "streamprune_report.json").read_text())["run"]["resumed_from_layer"] == 0


def test_completed_run_is_not_redone(tiny_llama, tmp_path):
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="magnitude", ratio=0.3, calib="c4", nsamples=8, seqlen=32, progress=False)
    first = prune(cfg)
    again = prune(cfg)
    assert again.get("already_complete") and again["achieved_ratio"] == first["achieved_ratio"]
    # the activation cache is gone, the journal and profile stay
    work = tmp_path / "out.work"
    assert not (work / "acts").exists()
    assert (work / "journal.jsonl").is_file() and len((work / "profile.jsonl").read_text().splitlines()) == 4


def test_disk_full_reports_layer_and_resumes(tiny_llama, tmp_path, monkeypatch, baseline):
    import errno

    from streamprune.storage import writer

    out = tmp_path / "out"
    cfg = PruneConfig(source=tiny_llama, out=out, method="magnitude", ratio=0.3, calib="c4", nsamples=8, seqlen=32, chunk_tokens=96, progress=False)
    real = writer.save_layer

    def full_at_2(staging, i, tensors, dtype):
        if i == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(staging, i, tensors, dtype)

    monkeypatch.setattr(writer, "save_layer", full_at_2)
    with pytest.raises(StreamPruneError, match="disk full while writing layer 2"):
        prune(cfg)
    assert not out.exists()
    monkeypatch.setattr(writer, "save_layer", real)
    report = prune(cfg)
    assert report["run"]["resumed_from_layer"] == 2 if "run" in report else True
    assert digests(out) == baseline


def test_sigterm_stops_after_commit_then_resumes(tiny_llama, tmp_path, monkeypatch, capsys, baseline):
    import signal

    from streamprune.storage import writer
    from streamprune.cli import main

    out = tmp_path / "out"
    real = writer.save_layer

    def signal_during_layer_1(staging, i, tensors, dtype):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write: must not cut the layer
        return real(staging, i, tensors, dtype)

    monkeypatch.setattr(writer, "save_layer", signal_during_layer_1)
    cmd = ["prune", str(tiny_llama), "--out", str(out), "--method", "magnitude", "--ratio", "0.3", *ARGS[:-1], "--no-progress"]
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after committing layer 1" in err and "run the same command again" in err
    assert not out.exists()
    # the state is readable, then the same command resumes at layer 2
    assert main(["inspect", str(tmp_path / "out.work")]) == 0
    state = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert state["layers_done"] == 2 and state["num_layers"] == 4 and not state["complete"]
    monkeypatch.setattr(writer, "save_layer", real)
    assert main(cmd) == 0
    capsys.readouterr()
    assert json.loads((out / "streamprune_report.json").read_text())["run"]["resumed_from_layer"] == 2
    assert digests(out) == baseline


def test_sigterm_during_the_survey_stops_before_its_next_layer_then_the_rerun_goes_on_there(tiny_llama, tmp_path, monkeypatch, capsys):
    """A stop inside the survey ends the process before its next layer (not after the whole
    survey and the first layer); the rerun surveys from that layer on, and the output is a
    fresh run's."""
    import signal

    from streamprune import survey
    from streamprune.cli import main

    real, seen = survey.propagate, []

    def signal_in_survey_layer_1(layer, cache, i, *args, **kwargs):
        seen.append(i)
        if seen == [0, 1]:  # the survey is the first pass: its layer 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(layer, cache, i, *args, **kwargs)

    monkeypatch.setattr(survey, "propagate", signal_in_survey_layer_1)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    cmd = ["prune", str(tiny_llama), "--method", "slimllm", "--ratio", "0.3", *ARGS]
    assert main([*cmd, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during the survey, before its layer 2" in err and "run the same command again" in err
    assert seen == [0, 1] and not out.exists()
    assert (tmp_path / "out.work" / "acts" / "survey" / "boundary_0002" / "complete.json").is_file()  # the resume point
    seen.clear()
    monkeypatch.setattr(survey, "propagate", lambda layer, cache, i, *a, **k: seen.append(i) or real(layer, cache, i, *a, **k))
    assert main([*cmd, "--out", str(out)]) == 0
    assert seen == [2, 3]  # the survey's remaining layers only
    monkeypatch.setattr(survey, "propagate", real)
    assert main([*cmd, "--out", str(fresh)]) == 0
    capsys.readouterr()
    assert digests(out) == digests(fresh)
