"""One run per work dir / --out (the lock), torn-journal repair, stale temp files.

Run: ``.venv/bin/pytest tests/test_runlock.py -q`` (~1 min: a few prune subprocesses on a
tiny model).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamprune import PruneConfig, prune
from streamprune.run import runlock
from streamprune.run.inspect import inspect_run
from streamprune.run.journal import RunDir, repair_tail

from test_resume import ARGS, digests, run_cli

JOB = ["--method", "magnitude", "--ratio", "0.3", *ARGS]


def start_cli(*args, stall_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPRUNE_")}
    if stall_at:
        env["STREAMPRUNE_STALL_AT"] = stall_at
    return subprocess.Popen([sys.executable, "-m", "streamprune", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_holder(proc: subprocess.Popen, run: Path, committed: int, timeout: float = 300) -> None:
    """Until ``proc`` holds ``run``'s lock and has journaled ``committed`` layers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        h = runlock.holder(run / "lock")
        if h and h.get("pid") == proc.pid and len(RunDir(run).committed_layers(RunDir(run).records())) >= committed:
            return
        time.sleep(0.05)
    raise AssertionError("the first run never got going")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_process_is_refused_at_once_and_the_first_is_unharmed(tiny_llama, tmp_path, baseline):
    out, run = tmp_path / "out", tmp_path / "out.work"
    first = start_cli("prune", tiny_llama, "--out", out, *JOB, stall_at="committed:1:15")
    wait_for_holder(first, run, committed=2)  # stalled 15 s after committing layer 1
    before = snapshot(run)
    seconds = {
        "output folder": ["--out", out],  # the same command
        "output folder ": ["--out", out, "--work-dir", tmp_path / "elsewhere.work"],
        "work dir": ["--out", tmp_path / "out2", "--work-dir", run],
    }
    for what, other in seconds.items():
        t0 = time.monotonic()
        r = run_cli("prune", tiny_llama, *other, *JOB)
        elapsed = time.monotonic() - t0
        err = r.stderr.strip().splitlines()
        assert r.returncode == 3 and elapsed < 2.0, (r.returncode, elapsed, r.stderr)
        assert len(err) == 1 and err[0].startswith("streamprune: error:"), err
        assert f"{what.strip()} " in err[0] and f"in use by pid {first.pid} on host {socket.gethostname()}, started 20" in err[0]
        assert "wait for that run to finish" in err[0]
    assert first.poll() is None  # still stalled: what follows checks the refusals' effects
    assert snapshot(run) == before  # touched nothing
    assert not (tmp_path / "elsewhere.work").exists() and not (tmp_path / "out2").exists()
    assert not (tmp_path / ".out2.lock").exists()
    # inspect works while the lock is held, and names the holder (in-process: no import delay)
    text = io.StringIO()
    state = inspect_run(run, out=text)
    assert state["running"]["pid"] == first.pid and state["layers_done"] == 2
    assert f"running (pid {first.pid} on {socket.gethostname()}" in text.getvalue()
    assert first.wait(timeout=300) == 0, first.communicate()
    assert digests(out) == baseline
    assert not (run / "lock").exists() and not (tmp_path / ".out.lock").exists()  # released, unlinked
    assert inspect_run(run, out=io.StringIO())["running"] is None


def loaded(pid: int, library: str) -> bool:
    """Whether process ``pid`` has mapped a shared library whose name contains ``library``."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_second_prune_started_while_the_first_imports_torch_is_refused_at_once(tiny_llama, tmp_path, baseline):
    """The CLI takes the locks before its heavy imports: a second prune started 0.5 s after
    the first (which is then still importing torch) is refused in well under a second, before
    importing torch itself, touching nothing; the first finishes as a lone run would."""
    out = tmp_path / "out"
    t_first = time.monotonic()
    first = start_cli("prune", tiny_llama, "--out", out, *JOB)
    while runlock.holder(runlock.out_lock_path(out)) is None:  # the lock: its first act
        assert first.poll() is None, first.communicate()
        assert time.monotonic() - t_first < 30
        time.sleep(0.01)
    time.sleep(max(0.0, 0.5 - (time.monotonic() - t_first)))
    first_had_torch = loaded(first.pid, "libtorch")
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-X", "importtime", "-m", "streamprune", "prune", str(tiny_llama),
                             "--out", str(out), *JOB], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    err = [line for line in second.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert second.returncode == 3, second.stderr[-2000:]
    assert len(err) == 1 and f"in use by pid {first.pid}" in err[0], err
    assert "torch" not in imported and "transformers" not in imported  # refused before the heavy imports
    assert elapsed < 1.0, elapsed
    assert not out.exists()  # the first is still running: nothing published, nothing by the second
    assert first.wait(timeout=300) == 0, first.communicate()
    assert digests(out) == baseline
    print(f"second refused after {elapsed:.2f} s; first had torch loaded then: {first_had_torch}")


def test_lock_of_a_sigkilled_run_does_not_block(tiny_llama, tmp_path, baseline):
    out, run = tmp_path / "out", tmp_path / "out.work"
    killed = run_cli("prune", tiny_llama, "--out", out, *JOB, crash_at="committed:1")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run / "lock").read_text())["pid"]  # the dead holder's file is still there
    assert runlock.holder(run / "lock") is None  # ... but the kernel released its lock
    r = run_cli("prune", tiny_llama, "--out", out, *JOB)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "streamprune_report.json").read_text())["run"]["resumed_from_layer"] == 2
    assert digests(out) == baseline


def test_python_api_is_locked_too(tiny_llama, tmp_path):
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="magnitude", ratio=0.3, nsamples=8, seqlen=32, progress=False)
    with runlock.held(cfg.run_dir, cfg.out):
        with pytest.raises(runlock.RunLocked, match=f"in use by pid {os.getpid()}"):
            prune(cfg)
        assert prune(PruneConfig(**{**cfg.__dict__, "dry_run": True}))["dry_run"]  # a dry run takes no lock
    assert not cfg.run_dir.exists() and not (tmp_path / ".out.lock").exists()  # nothing left by the lock


def test_fresh_keeps_the_held_lock(tiny_llama, tmp_path):
    """``--fresh`` empties the run dir but must not unlink the lock this process holds (a
    second process would then create a new lock file and run alongside)."""
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="magnitude", ratio=0.3, nsamples=8, seqlen=32, progress=False, keep_work=True)
    prune(cfg)
    with runlock.held(cfg.run_dir, tmp_path / "other-out"):
        inode = (cfg.run_dir / "lock").stat().st_ino
        RunDir(cfg.run_dir).open({"x": 1}, fresh=True)
        assert (cfg.run_dir / "lock").stat().st_ino == inode
        assert runlock.holder(cfg.run_dir / "lock")["pid"] == os.getpid()
        assert not (cfg.run_dir / "acts").exists() and not (cfg.run_dir / "journal.jsonl").exists()


# ---- torn journal tail ------------------------------------------------------------------
@pytest.mark.parametrize("tail,kept", [
    (b"", 2), (b'{"event": "layer", "la', 2), (b"not json\n", 2), (b'{"a": 1}\n{"b"\n{"c": 3}\n', 3), (b"\xff\xfe\n", 2),
])
def test_repair_tail_cuts_what_records_would_skip(tmp_path, tail, kept):
    path = tmp_path / "journal.jsonl"
    good = b'{"event": "survey"}\n{"event": "layer", "layer": 0}\n'
    path.write_bytes(good + tail)
    removed = repair_tail(path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == kept and all(json.loads(line) for line in lines)
    assert removed == len(good) + len(tail) - path.stat().st_size
    assert repair_tail(path) == 0  # idempotent


def test_torn_journal_line_then_resume_crash_resume_is_byte_identical(tiny_llama, tmp_path, baseline):
    """A power loss mid-append leaves half a record; before the fix the next record was glued
    onto it, and the second resume lost it and every later one."""
    out, journal = tmp_path / "out", tmp_path / "out.work" / "journal.jsonl"
    cmd = ["prune", tiny_llama, "--out", out, *JOB]
    assert run_cli(*cmd, crash_at="committed:1").returncode == -signal.SIGKILL
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last + (len(data) - last) // 2])  # layer 1's record torn in half
    assert run_cli(*cmd, crash_at="committed:2").returncode == -signal.SIGKILL  # redoes layer 1, commits 2
    records = [json.loads(line) for line in journal.read_text().splitlines()]  # every line whole
    assert [r["layer"] for r in records] == [0, 1, 2]
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "streamprune_report.json").read_text())["run"]["resumed_from_layer"] == 3
    assert digests(out) == baseline


def test_temp_file_of_a_killed_write_is_not_published(tiny_llama, tmp_path, baseline):
    out, staging = tmp_path / "out", tmp_path / "out.work" / "staging"
    cmd = ["prune", tiny_llama, "--out", out, *JOB]
    assert run_cli(*cmd, crash_at="committed:1").returncode == -signal.SIGKILL
    # what a SIGKILL inside atomic.write_safetensors leaves (pid of the dead writer)
    (staging / ".model-layer-00002.safetensors.tmp-99999").write_bytes(b"partial")
    assert run_cli(*cmd).returncode == 0
    assert digests(out) == baseline  # same file set: no .tmp-* in the output


@pytest.fixture(scope="module")
def baseline(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lock_baseline") / "out"
    r = run_cli("prune", tiny_llama, "--out", out, *JOB)
    assert r.returncode == 0, r.stderr
    return digests(out)


def test_run_dir_without_manifest_keeps_nothing_stale(tmp_path):
    """A ``--fresh`` wipe (manifest first) or a first start killed half way leaves files of no
    job; a stale *complete* activation boundary must not be taken as this run's boundary 0."""
    run = RunDir(tmp_path / "w")
    (run.acts / "boundary_0000").mkdir(parents=True)
    (run.acts / "boundary_0000" / "complete.json").write_text('{"chunks": 1, "rows": 1}')
    run.staging.mkdir()
    (run.staging / "model-layer-00000.safetensors").write_bytes(b"old job")
    run.journal_path.write_text('{"event": "layer", "layer": 0}\n')
    assert run.open({"job": 2}, fresh=False) == []
    assert not run.acts.exists() and list(run.staging.iterdir()) == [] and not run.journal_path.exists()
