"""One prepared GPU check: 70B-shaped layers on a 24 GiB budget (issue 15). Driven by gpu_check.sh.

    bash benchmarks/gpu_check.sh                              # the GPU check: bare machine -> $OUT, <= 7 min
    METHODS="olica cascade" bash benchmarks/gpu_check.sh      # more methods (or --methods "olica cascade")
    bash benchmarks/gpu_check.sh --small                      # tiny shapes, any device (CPU: under a minute)
    bash benchmarks/gpu_check.sh --steps layers --methods cascade   # rerun one part on a warm machine

Steps, in this order (``--steps`` picks a subset), each a child process with its own time
limit, all inside one overall budget (``--budget-s``, default 420 s) so that the whole
check fits one device call with time left for a rerun:

  install    ``pip install -e .`` into this Python. When torch, transformers, safetensors,
             accelerate, psutil, tqdm and pytest are importable already (the device image:
             CUDA torch, no package index) it installs offline with ``--no-deps
             --no-build-isolation --no-index``, keeping the machine's CUDA torch; otherwise
             ``pip install -e .[test,bench]``. Skipped when this checkout is installed.
  env        gpu_env.py: versions, device, filesystem, measured copy / GEMM / H2D ceilings.
  synthetic  make_synthetic.py: a 4-layer LLaMA-2-70B-shaped bf16 checkpoint, vocab 4096
             (reused when the same shapes are already in the work folder).
  layers     bench_layers.py per method (default olica; ``--methods`` / ``$METHODS``) at
             ``--ratio`` 0.2, ``--max-gpu-memory`` 24GiB, 256 x 128 calibration, bf16 compute,
             the checkpoint evicted from the page cache first (fsync + POSIX_FADV_DONTNEED).
             A method the install does not register is skipped, not replaced.
  tests      pytest of the engine / method / modeling / kernel tests with ``--device``,
             ``-m 'not slow'`` (the slow ones need the demo model, which is not on a device
             machine); per-test outcomes via pytest_outcomes.py, including which tests take
             the ``device`` fixture (only those run on the GPU).
  kernels    bench_kernels.py at 70B shapes, SVDs timed once (``--svd-repeat 1``).

Writes under ``--out`` (default ``$OUT``, else WORK/out), 7 files: gpu_check.log
(everything every step printed), summary.json (all of it), env.json, layers.json,
tests.json, kernels.json and gpu_section.md (gpu_summary.py's markdown for RESULTS.md,
also printed last). summary.json and gpu_section.md are rewritten after every step, so a
run cut short still brings back what it measured. This file uses only the standard
library: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_summary  # noqa: E402  (sibling, standard library only)

STEPS = ("install", "env", "synthetic", "layers", "tests", "kernels")
TEST_FILES = ("tests/test_engine.py", "tests/test_olica.py", "tests/test_lorap.py", "tests/test_slimllm.py",
              "tests/test_modeling.py", "tests/test_kernels.py")
DEPS = ("torch", "safetensors", "transformers", "accelerate", "psutil", "tqdm", "pytest")
# The GPU check's shapes (make_synthetic.py flags) and the --small ones.
FULL_SHAPE = ["--config", "llama-2-70b", "--layers", "4", "--vocab", "4096"]
SMALL_SHAPE = ["--config", "custom", "--hidden", "128", "--intermediate", "352", "--heads", "4", "--kv-heads", "2",
               "--layers", "4", "--vocab", "1024"]
# Per-step time caps (s), scaled by --budget-s / its default when that is larger; the
# overall budget cuts them further.
CAPS = {"install": 150, "env": 90, "synthetic": 180, "layers": 240, "tests": 180, "kernels": 180}
SMALL_CAPS = {"install": 150, "env": 60, "synthetic": 60, "layers": 90, "tests": 120, "kernels": 60}
BUDGET_S, SMALL_BUDGET_S = 420.0, 300.0  # default --budget-s
MIN_STEP_S = 15  # a step with less time left than this is skipped


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (d 128, f 352), 16 x 64 calibration: seconds on a CPU")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when torch sees one)")
    p.add_argument("--methods", default=os.environ.get("METHODS", "olica"),
                   help="space- or comma-separated methods for the layers step (default $METHODS or olica)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option passed to bench_layers")
    p.add_argument("--max-gpu-memory", default="24GiB")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 256; 16 with --small)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration length (default 128; 64 with --small)")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="tokens per forward chunk (engine default 16384; "
                   "lower it if the GPU peak is over 16 GB)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="results folder (default $OUT, else WORK/out)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp/streamprune_gpu_check")),
                   help="checkpoint, runs and outputs (default $WORK or /tmp/streamprune_gpu_check): the disk measured")
    p.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 420; 300 with --small)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--install", choices=("auto", "always", "never"), default="auto",
                   help="auto: install unless this checkout is importable already")
    p.add_argument("--tests", default=None, help="pytest arguments for the tests step (default: the engine / method / "
                   "modeling / kernel test files, -m 'not slow')")
    p.add_argument("--test-workers", type=int, default=None, help="pytest-xdist workers for the tests step when xdist is "
                   "installed (default min(8, cores / 2); 0 with --small; 0 = one process)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (default: remove what the run made)")
    p.add_argument("--verbose", action="store_true", help="echo every child line to stdout (always in gpu_check.log)")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.replace(",", " ").split() if m]
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    bad = [s for s in a.steps if s not in STEPS]
    if bad:
        p.error(f"unknown --steps {','.join(bad)}; choose from {','.join(STEPS)}")
    a.nsamples = a.nsamples or (16 if a.small else 256)
    a.seqlen = a.seqlen or (64 if a.small else 128)
    a.budget_s = a.budget_s or (SMALL_BUDGET_S if a.small else BUDGET_S)
    a.out = a.out or a.work / "out"
    if a.test_workers is None:
        a.test_workers = 0 if a.small else min(8, (os.cpu_count() or 2) // 2)
    return a


class Check:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = time.monotonic()
        self.py = sys.executable
        a.out.mkdir(parents=True, exist_ok=True)
        a.work.mkdir(parents=True, exist_ok=True)
        self.log = open(a.out / "gpu_check.log", "a", buffering=1)
        self.device = a.device
        self.summary: dict = {
            "meta": {"started_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                     "command": "bash benchmarks/gpu_check.sh " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                     "small": a.small, "methods": a.methods, "ratio": a.ratio, "max_gpu_memory": a.max_gpu_memory,
                     "nsamples": a.nsamples, "seqlen": a.seqlen, "chunk_tokens": a.chunk_tokens, "compute_dtype": a.compute_dtype,
                     "budget_s": a.budget_s, "work": str(a.work), **source_identity()},
            "steps": {},
        }

    # ---- plumbing ------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], cap: float, env: dict | None = None) -> tuple[int | None, list[str], float]:
        """Run ``cmd`` as a child (no shell), its output into the log; kill it past its limit.

        Returns (exit code or None on timeout, output lines, seconds)."""
        limit = max(1.0, min(cap, self.left()))
        self.say(f"{name}: {' '.join(shlex.quote(c) for c in cmd)}  (limit {limit:.0f} s)")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        lines: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                self.log.write(f"  {name}| {line}\n")
                if self.a.verbose:
                    print(f"  {name}| {line}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            self.say(f"{name}: over its {limit:.0f} s limit; killing pid {proc.pid} and its process group")
            proc.kill()  # the child itself (no wrapper shell) ...
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # ... and what it started (pytest's subprocesses)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        reader.join(timeout=10)
        secs = time.monotonic() - t0
        if rc not in (0, None) and not self.a.verbose:
            print("\n".join(f"  {name}| {x}" for x in lines[-25:]), flush=True)
        return rc, lines, secs

    def record(self, step: str, status: str, seconds: float = 0.0, **extra) -> None:
        self.summary["steps"][step] = {"status": status, "seconds": round(seconds, 1), **extra}
        self.say(f"{step}: {status} ({seconds:.1f} s){' - ' + extra['note'] if extra.get('note') else ''}")
        self.flush()

    def flush(self) -> None:
        """summary.json and gpu_section.md after every step: a cut-short run still reports."""
        self.summary["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json(self.a.out / "summary.json", self.summary)
        (self.a.out / "gpu_section.md").write_text(gpu_summary.render(self.summary))

    def cap(self, step: str) -> float:
        """The step's cap, scaled up with a budget above the default (a slow or shared machine)."""
        scale = max(1.0, self.a.budget_s / (SMALL_BUDGET_S if self.a.small else BUDGET_S))
        return (SMALL_CAPS if self.a.small else CAPS)[step] * scale

    def skip_for_budget(self, step: str) -> bool:
        if self.left() < MIN_STEP_S:
            self.record(step, "skipped", note=f"budget: {self.left():.0f} s left of {self.a.budget_s:.0f}")
            return True
        return False

    # ---- steps ---------------------------------------------------------------------------
    def installed_here(self) -> str | None:
        probe = "import os, streamprune, streamprune.kernels; print(os.path.dirname(os.path.abspath(streamprune.__file__)))"
        r = subprocess.run([self.py, "-c", probe], cwd="/", capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    def step_install(self) -> None:
        where = self.installed_here()
        if self.a.install == "never" or (self.a.install == "auto" and where == str(REPO / "streamprune")):
            self.record("install", "skipped", note=f"streamprune importable from {where}" if where else "--install never")
            return
        deps = subprocess.run([self.py, "-c", "import " + ", ".join(DEPS)], capture_output=True, text=True).returncode == 0
        pip = [self.py, "-m", "pip", "install", "--disable-pip-version-check"]
        if deps:
            # The device image: CUDA torch and the rest installed, no package index. Install the
            # project alone, offline, so pip cannot replace the machine's torch.
            tries = [pip + ["--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO)],
                     pip + ["--no-deps", "--no-build-isolation", "--no-index", str(REPO)]]
            how = "offline, --no-deps (dependencies already importable)"
        else:
            tries = [pip + ["-e", f"{REPO}[test,bench]"]]
            how = "pip install -e .[test,bench] (from the package index)"
        secs, rc = 0.0, None
        for cmd in tries:
            rc, _, s = self.run("install", cmd, self.cap("install"))
            secs += s
            if rc == 0:
                break
        where = self.installed_here() if rc == 0 else None
        if where is None:
            self.record("install", "failed", secs, rc=rc, note=f"{how}: streamprune not importable after pip (see log)")
            raise SystemExit(self.finish(1))
        self.record("install", "ok", secs, note=f"{how}; streamprune from {where}")

    def step_env(self) -> None:
        cmd = [self.py, str(HERE / "gpu_env.py"), "--work", str(self.a.work)]
        if self.device != "auto":
            cmd += ["--device", self.device]
        env, secs = self.run_json("env", cmd)
        if env is None:
            return
        self.summary["env"] = env
        write_json(self.a.out / "env.json", env)
        if self.device == "auto":
            self.device = "cuda" if env.get("cuda_available") else "cpu"
        self.record("env", "ok", secs, note=f"{env.get('device_name')}, torch {env.get('torch')}")

    def check_device(self) -> None:
        """The 70B-shaped check on a CPU would run for hours: refuse unless asked for explicitly."""
        if not self.a.small and self.a.device == "auto" and self.resolve_device() == "cpu":
            self.say("torch sees no CUDA device here: the 70B-shaped check needs one. Use --small on a CPU "
                     "(or --device cpu to insist)")
            self.summary["steps"]["device"] = {"status": "failed", "seconds": 0.0, "note": "no CUDA device; use --small"}
            raise SystemExit(self.finish(2))

    def step_synthetic(self) -> None:
        shape = (SMALL_SHAPE if self.a.small else FULL_SHAPE) + ["--gen-device", "cuda" if self.resolve_device().startswith("cuda") else "cpu"]
        folder = self.a.work / "model"
        stamp = self.a.work / "model.json"
        if stamp.exists() and json.loads(stamp.read_text()).get("args") == shape and folder.is_dir():
            info = json.loads(stamp.read_text())["summary"]
            self.summary["synthetic"] = info
            self.record("synthetic", "ok", note=f"reused {folder} (same shapes)")
            return
        shutil.rmtree(folder, ignore_errors=True)
        info, secs = self.run_json("synthetic", [self.py, str(HERE / "make_synthetic.py"), *shape, "--out", str(folder)])
        if info is None:
            return
        write_json(stamp, {"args": shape, "summary": info})
        self.summary["synthetic"] = info
        self.record("synthetic", "ok", secs, note=f"{info['total_bytes'] / 2**20:.1f} MiB in {info['layers'] + 1} shards")

    def run_json(self, step: str, cmd: list[str]) -> tuple[dict | None, float]:
        """Run a step's one child under the step's cap: (its last JSON line, seconds), or
        (None, seconds) with the step recorded as failed / timed out."""
        rc, lines, secs = self.run(step, cmd, self.cap(step))
        res = last_json(lines) if rc == 0 else None
        if res is None:
            self.record(step, "failed" if rc is not None else "timeout", secs, rc=rc)
        return res, secs

    def resolve_device(self) -> str:
        """--device auto without the env step: ask torch in a child."""
        if self.device == "auto":
            r = subprocess.run([self.py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
            self.device = "cuda" if r.stdout.strip() == "True" else "cpu"
        return self.device

    def step_layers(self) -> None:
        model = self.a.work / "model"
        stamp = self.a.work / "model.json"
        if "synthetic" not in self.summary and stamp.exists() and model.is_dir():  # --steps layers on a warm machine
            self.summary["synthetic"] = json.loads(stamp.read_text())["summary"]
        if "synthetic" not in self.summary:
            self.record("layers", "skipped", note="no checkpoint (synthetic step failed or not run)")
            return
        registered = self.summary.get("env", {}).get("streamprune", {}).get("methods")
        results = self.summary.setdefault("layers", [])
        for method in self.a.methods:
            step = f"layers:{method}"
            if registered is not None and method not in registered:
                self.record(step, "skipped", note=f"method {method!r} is not registered here ({', '.join(registered)})")
                continue
            if self.skip_for_budget(step):
                continue
            evicted = evict_from_page_cache(model.glob("*.safetensors"))
            bench = self.a.work / "bench"
            shutil.rmtree(bench, ignore_errors=True)
            cmd = [self.py, str(HERE / "bench_layers.py"), "--model", str(model), "--method", method, "--ratio", str(self.a.ratio),
                   "--device", self.resolve_device(), "--compute-dtype", self.a.compute_dtype, "--max-gpu-memory", self.a.max_gpu_memory,
                   "--nsamples", str(self.a.nsamples), "--seqlen", str(self.a.seqlen), "--chunk-tokens", str(self.a.chunk_tokens), "--work", str(bench),
                   "--bw-mib", "16" if self.a.small else "2048", "--no-progress", "--no-fallback"]
            for opt in self.a.option:
                cmd += ["--option", opt]
            rc, lines, secs = self.run(step, cmd, self.cap("layers"))
            res = last_json(lines) if rc == 0 else None
            if res is None:
                partial = [json.loads(x) for p in bench.glob("*/run/profile.jsonl") for x in p.read_text().splitlines() if x.strip()]
                results.append({"method": method, "status": "timeout" if rc is None else "failed", "per_layer": partial})
                self.record(step, "timeout" if rc is None else "failed", secs, rc=rc,
                            note=f"{len(partial)} layer(s) profiled before it stopped" if partial else "")
            else:
                res.update(status="ok", evicted_source_bytes=evicted, shape=self.summary["synthetic"])
                results.append(res)
                self.record(step, "ok", secs, note=f"80-layer extrapolation {res['extrapolated_s'] / 60:.1f} min")
            shutil.rmtree(bench, ignore_errors=True)
            write_json(self.a.out / "layers.json", results)

    def step_tests(self) -> None:
        if self.skip_for_budget("tests"):
            return
        outcomes = self.a.work / "tests.json"
        outcomes.unlink(missing_ok=True)
        if self.a.tests is not None:
            selection = shlex.split(self.a.tests)
        elif self.a.small:
            selection = ["tests/test_engine.py", "-k", "streamed_equals_in_memory"]
        else:
            selection = [*TEST_FILES, "-m", "not slow"]
        cmd = [self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_outcomes", "--outcomes-json", str(outcomes),
               "--device", self.resolve_device(), *selection]
        if self.a.test_workers > 1 and subprocess.run([self.py, "-c", "import xdist"], capture_output=True).returncode == 0:
            cmd += ["-n", str(self.a.test_workers)]  # the device image has pytest-xdist: 16 cores
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        rc, lines, secs = self.run("tests", cmd, self.cap("tests"), env)
        res = json.loads(outcomes.read_text()) if outcomes.exists() else {}
        res.update(args=selection, command="pytest " + " ".join(shlex.quote(c) for c in cmd[3:]), rc=rc, device=self.device, tail=lines[-3:])
        self.summary["tests"] = res
        write_json(self.a.out / "tests.json", res)
        counts = res.get("counts", {})
        status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
        note = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ("" if res.get("complete") else " (so far)")
        self.record("tests", status, secs, rc=rc, note=note)

    def step_kernels(self) -> None:
        if self.skip_for_budget("kernels"):
            return
        cmd = [self.py, str(HERE / "bench_kernels.py"), "--device", self.resolve_device()]
        cmd += ["--small", "--d", "256", "--f", "512", "--tokens", "1024", "--repeat", "1"] if self.a.small else ["--repeat", "5", "--svd-repeat", "1"]
        res, secs = self.run_json("kernels", cmd)
        if res is None:
            return
        self.summary["kernels"] = res
        write_json(self.a.out / "kernels.json", res)
        self.record("kernels", "ok", secs)

    def finish(self, code: int = 0) -> int:
        self.summary["meta"]["finished_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.flush()
        if not self.a.keep_work:
            for name in ("model", "model.json", "bench", "tests.json"):
                p = self.a.work / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        md = (self.a.out / "gpu_section.md").read_text()
        print("\n" + md, flush=True)
        self.say(f"done in {time.monotonic() - self.t0:.0f} s; files in {self.a.out}: "
                 + ", ".join(sorted(p.name for p in self.a.out.iterdir())))
        self.log.close()
        return code


# ---- helpers -----------------------------------------------------------------------------
def last_json(lines: list[str]) -> dict | list | None:
    for line in reversed(lines):
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")  # key order kept: steps in run order
    os.replace(tmp, path)


def evict_from_page_cache(paths) -> int:
    """fsync then POSIX_FADV_DONTNEED each file, so the prune reads the checkpoint from disk
    rather than from the page cache make_synthetic just filled. Advisory; returns bytes asked."""
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def source_identity() -> dict:
    """The commit ($COMMIT, else git) and a digest of the code that ran (the device copy has no .git)."""
    commit = os.environ.get("COMMIT")
    dirty = None
    if not commit and (REPO / ".git").exists():
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    h = hashlib.sha256()
    for folder in ("streamprune", "kernels", "benchmarks"):
        for p in sorted((REPO / folder).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return {"commit": commit, "dirty": dirty, "code_sha256": h.hexdigest()[:16]}


def main(argv=None) -> int:
    a = parse_args(argv)
    check = Check(a)
    check.say(f"start: steps {','.join(a.steps)}, methods {' '.join(a.methods)}, budget {a.budget_s:.0f} s, "
              f"{'small' if a.small else '70B-shaped'}, out {a.out}, work {a.work}, python {check.py}")
    for step in a.steps:
        if step not in ("install", "env"):
            check.check_device()
        getattr(check, f"step_{step}")()
    failed = [k for k, v in check.summary["steps"].items() if v["status"] in ("failed", "timeout")]
    return check.finish(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
