"""Kill -9 at random instants, resume, compare: is every resumed output byte-identical?

    python benchmarks/kill_harness.py --method olica [--source DIR] [--kills 20] [--kills-per-trial 7]
        [--ratio 0.2] [--nsamples N] [--seqlen 128] [--chunk-tokens 2048] [--option KEY=VALUE ...]
        [--work DIR] [--results benchmarks/results/kill_harness.jsonl] [--baseline OUT]

1. One uninterrupted ``python -m streamprune prune`` (the baseline); the harness polls its
   run directory to learn when each journal record appeared (a timeline of the run).
2. Trials: the same command, in a fresh output/work dir, is started and SIGKILLed at a
   random instant (``os.kill(pid, SIGKILL)`` on the prune process itself: it is started
   without a shell), then started again, killed again, ... up to ``--kills-per-trial``
   kills, then left to finish. A trial's instants are drawn uniformly over the baseline's
   timeline and sorted (one of them in the short tail after the last commit; about one
   in six over the process start-up instead), and each resumed attempt is killed when it
   reaches the next instant (once it has made the last commit the baseline made before
   that instant, after the same offset; before the first commit, by time after it took
   the lock), so kills land anywhere: start-up, boundary-0 embedding, survey, a layer's
   passes, mid-chunk activation writes, the commit, finalize, publish, the cleanup.
3. After each kill the run/output dirs are read to name the phase that was hit; after
   each trial every output file is compared by sha256 with the baseline's (the report's
   ``run`` block, time and memory, is the only part allowed to differ), and the run dir
   must be clean (no activations, no staging, no lock files).

Prints a table of kills, a table of trials, then one JSON line. Trials run until at least
``--kills`` kills were made. Default source: the demo model (SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPORT = "streamprune_report.json"


# ---- the command and the state it leaves ------------------------------------------------
def prune_cmd(args, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "streamprune", "prune", str(args.source), "--out", str(out), "--method", args.method,
           "--ratio", str(args.ratio), "--calib", args.calib, "--seqlen", str(args.seqlen),
           "--chunk-tokens", str(args.chunk_tokens), "--seed", str(args.seed), "--no-progress"]
    if args.nsamples:
        cmd += ["--nsamples", str(args.nsamples)]
    for opt in args.option or []:
        cmd += ["--option", opt]
    return cmd


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out`` (hidden ones too); the report without its ``run``."""
    digests = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == REPORT and p.parent == out:
            report = json.loads(data)
            report.pop("run", None)
            data = json.dumps(report, sort_keys=True).encode()
        digests[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return digests


def journal(run: Path) -> list[dict]:
    out = []
    try:
        lines = (run / "journal.jsonl").read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def phase(run: Path, out: Path, num_layers: int) -> str:
    """Name the phase a killed run was in, from what it left on disk."""
    if out.exists():
        return "cleanup (published, activations not yet removed)" if (run / "acts").exists() else "exit (all done)"
    if not (run / "manifest.json").is_file():
        return "start-up (lock taken, no manifest yet)"
    records = journal(run)
    layers = {r["layer"] for r in records if r.get("event") == "layer"}
    survey_done = any(r.get("event") == "survey" for r in records)
    acts, staging = run / "acts", run / "staging"
    tmp = sorted(p.name for p in staging.glob(".*tmp-*")) if staging.is_dir() else []
    mid_write = f" (mid-write: {tmp[0]})" if tmp else ""
    if not layers:
        if (acts / "survey").exists() and not survey_done:
            bounds = sorted((acts / "survey").glob("boundary_*"))
            if not bounds or (bounds[-1].name == "boundary_0000" and not (bounds[-1] / "complete.json").is_file()):
                return "survey: boundary-0 embedding"
            return f"survey pass (layer {int(bounds[-1].name.split('_')[1]) - (not (bounds[-1] / 'complete.json').is_file())})"
        if not (acts / "boundary_0000" / "complete.json").is_file():
            return "boundary-0 embedding" + mid_write
    k = len(layers)
    if k < num_layers:
        nxt = acts / f"boundary_{k + 1:04d}"
        if (staging / f"model-layer-{k:05d}.safetensors").is_file():
            return f"layer {k}: written, not journaled" + mid_write
        if nxt.exists():
            chunks = len(list(nxt.glob("chunk_*.safetensors")))
            done = " (boundary complete)" if (nxt / "complete.json").is_file() else ""
            return f"layer {k}: propagate, {chunks} chunks written{done}" + mid_write
        return f"layer {k}: read / observe / decide" + mid_write
    if (staging / REPORT).is_file():
        return "publish (staged, not moved)"
    return "finalize" + mid_write


# ---- running --------------------------------------------------------------------------
def wait_for_lock(proc: subprocess.Popen, run: Path, t0: float) -> float | None:
    """Seconds until ``proc`` holds the run's lock (it is past its imports), None if it exited."""
    lock = run / "lock"
    while proc.poll() is None:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == proc.pid:
                return time.perf_counter() - t0
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return None


def run_baseline(args, root: Path) -> dict:
    """The uninterrupted run, with its timeline: seconds after taking the lock at which the
    manifest and each layer's journal record appeared."""
    out = root / "baseline" / "out"
    run = out.with_name(out.name + ".work")
    t0 = time.perf_counter()
    with open(root / "baseline.log", "w") as log:
        proc = subprocess.Popen(prune_cmd(args, out), stdout=log, stderr=subprocess.STDOUT)
        lock_s = wait_for_lock(proc, run, t0) or 0.0
        manifest_s, seen, timeline = None, 0, []
        while proc.poll() is None:
            time.sleep(0.02)
            if manifest_s is None and (run / "manifest.json").is_file():
                manifest_s = time.perf_counter() - t0 - lock_s
            n = len([r for r in journal(run) if r.get("event") == "layer"])
            while seen < n:
                timeline.append(time.perf_counter() - t0 - lock_s)
                seen += 1
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"baseline prune failed (rc {proc.returncode}); see {root / 'baseline.log'}")
    report = json.loads((out / REPORT).read_text())
    return {"out": out, "wall_s": wall, "lock_s": lock_s, "work_s": wall - lock_s, "manifest_s": manifest_s or 0.0,
            "commit_s": timeline, "num_layers": report["layers"], "digests": output_digests(out)}


def baseline_from(out: Path, lock_s: float) -> dict:
    """The baseline of an uninterrupted output folder made earlier by the same command
    (``--baseline``), its timeline rebuilt from file times: the report's ``run.wall_s`` ends
    at the report's mtime and starts when the lock was taken; each layer file was written
    just before its journal record (a rename keeps mtimes)."""
    report = json.loads((out / REPORT).read_text())
    t_lock = (out / REPORT).stat().st_mtime - report["run"]["wall_s"]
    run = out.with_name(out.name + ".work")
    layers = sorted(out.glob("model-layer-*.safetensors"))
    return {"out": out, "wall_s": lock_s + report["run"]["wall_s"], "lock_s": lock_s, "work_s": report["run"]["wall_s"],
            "manifest_s": max((run / "manifest.json").stat().st_mtime - t_lock, 0.0),
            "commit_s": [p.stat().st_mtime - t_lock for p in layers], "num_layers": report["layers"], "digests": output_digests(out)}


def committed(run: Path) -> int:
    return len([r for r in journal(run) if r.get("event") == "layer"])


def kill_plan(base: dict, n: int, rng: random.Random, max_early: int) -> list[tuple[str, float]]:
    """``n`` kill instants for one trial: ("start", s after the process start) for about one
    in six (imports, argument checks, the lock), else ("run", s on the baseline's timeline
    after its lock), sorted. One is in the tail (last commit -> exit: finalize, publish,
    cleanup), too short for uniform draws to hit often; at most ``max_early`` are before the
    first commit (boundary 0, survey): the survey is not resumable per layer, so each kill
    there repeats it, which a many-kill trial on a large model cannot afford."""
    work = base["work_s"]
    first = base["commit_s"][0] if base["commit_s"] else 0.0
    tail0 = base["commit_s"][-1] if base["commit_s"] else 0.0
    points, early = [], 0
    for i in range(n):
        if n >= 3 and i == n - 1:
            points.append(("run", rng.uniform(tail0, work)))
        elif rng.random() < 1 / 6:
            points.append(("start", rng.uniform(0.0, base["lock_s"])))
        else:
            t = rng.uniform(0.0, work) if early < max_early else rng.uniform(first, work)
            early += t < first
            points.append(("run", t))
    runs = sorted(t for kind, t in points if kind == "run")
    starts = [p for p in points if p[0] == "start"]
    plan = [("run", t) for t in runs]
    for s in starts:  # start-up kills at random places in the sequence
        plan.insert(rng.randrange(len(plan) + 1), s)
    return plan


def delay_after_lock(base: dict, run: Path, target: float, rng: random.Random) -> float:
    """Seconds after an attempt takes the lock at which it reaches ``target`` (baseline
    timeline): a resumed attempt restarts at its last commit, after its own start-up."""
    k = committed(run)
    if k == 0:
        return target
    done_at = base["commit_s"][k - 1] if k <= len(base["commit_s"]) else base["work_s"]
    if target <= done_at:  # already past it (the killed layer is redone): kill in the start-up
        return rng.uniform(0.0, base["manifest_s"])
    return base["manifest_s"] + (target - done_at)


def trial(args, base: dict, root: Path, index: int, kills_wanted: int, rng: random.Random) -> dict:
    """Kill, restart, kill, ... then let it finish; compare with the baseline."""
    out = root / f"trial_{index:02d}" / "out"
    run = out.with_name(out.name + ".work")
    kills, attempts = [], 0
    plan = kill_plan(base, kills_wanted, rng, args.max_early_kills)
    log_path = root / f"trial_{index:02d}.log"
    while True:
        attempts += 1
        if attempts > kills_wanted + 10:
            sys.exit(f"trial {index}: no finish after {attempts} attempts; see {log_path}")
        # once the output is published (a kill hit the cleanup or the exit), the run is over:
        # the next attempt only has to find it complete, and is not killed
        kind, target = plan[len(kills)] if len(kills) < len(plan) and not out.exists() else (None, None)
        with open(log_path, "a") as log:
            log.write(f"--- attempt {attempts} kill {kind} {target}\n")
            log.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(prune_cmd(args, out), stdout=log, stderr=subprocess.STDOUT)
            delay, counted = target, "process start" if kind == "start" else "lock taken"
            if kind == "run":
                if wait_for_lock(proc, run, t0) is not None:
                    t0 = time.perf_counter()
                # Anchor the instant on the last baseline commit before it: wait until this
                # attempt has made that commit too, then the same offset. The machine's
                # speed then only matters within one layer (the load of a shared machine
                # varies by 2x and more between the baseline and a trial).
                anchor = sum(c <= target for c in base["commit_s"])
                if anchor > committed(run):
                    while proc.poll() is None and committed(run) < anchor:
                        time.sleep(0.05)
                    t0, delay = time.perf_counter(), target - base["commit_s"][anchor - 1]
                    counted = f"commit {anchor}"
                else:
                    delay = delay_after_lock(base, run, target, rng)
            try:
                rc = proc.wait(timeout=None if delay is None else max(delay - (time.perf_counter() - t0), 0.0))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)  # the prune process itself, no shell in between
                rc = proc.wait()
                if rc != -signal.SIGKILL:
                    sys.exit(f"trial {index}: the killed prune exited with {rc}, not -9")
                try:
                    locked = json.loads((run / "lock").read_text() or "{}").get("pid") == proc.pid
                except (OSError, ValueError):
                    locked = False
                hit = phase(run, out, base["num_layers"]) if locked or out.exists() else "start-up (before the lock)"
                kills.append({"trial": index, "attempt": attempts, "target_s": round(target, 2), "delay_s": round(delay, 2),
                              "from": counted, "phase": hit})
                print(f"  kill {len(kills)}: {kills[-1]}", flush=True)
                continue
        if rc != 0:
            sys.exit(f"trial {index}: prune exited {rc} after {len(kills)} kills; see {log_path}")
        break  # finished (before its planned kill, if any: that kill is not counted)
    mine = output_digests(out)
    differ = sorted(n for n in set(mine) | set(base["digests"]) if mine.get(n) != base["digests"].get(n))
    leftovers = sorted(str(p.relative_to(run)) for p in (run / "acts", run / "staging", run / "lock") if p.exists())
    leftovers += [p.name for p in out.parent.glob(".*.lock")]
    return {"trial": index, "kills": kills, "attempts": attempts, "identical": not differ, "differ": differ, "leftovers": leftovers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, help="any registered method (magnitude, olica, lorap, slimllm, ...)")
    ap.add_argument("--source", type=Path, default=None, help="model folder (default: the demo model)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=None, help="default: the method's default")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="small chunks: several chunk writes per boundary")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (the prune's)")
    ap.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, passed through")
    ap.add_argument("--kills", type=int, default=20, help="at least this many kills in all")
    ap.add_argument("--kills-per-trial", type=int, default=7)
    ap.add_argument("--max-early-kills", type=int, default=3, help="per trial, at most this many kills before the first commit (each repeats the survey)")
    ap.add_argument("--kill-seed", type=int, default=0, help="seed of the random kill instants")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--results", type=Path, default=None, help="append the JSON record to this file")
    ap.add_argument("--baseline", type=Path, default=None, help="reuse this uninterrupted output of the same command (its run dir OUT.work beside it) instead of running one")
    ap.add_argument("--baseline-lock-s", type=float, default=10.0, help="with --baseline: seconds from process start to the lock")
    args = ap.parse_args()
    if args.source is None:
        from streamprune.inputs.demo_model import ensure_demo_model

        args.source = ensure_demo_model()
    import tempfile

    root = args.work or Path(tempfile.mkdtemp(prefix=f"kill-{args.method}-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        sys.exit(f"--work {root} is not empty")
    rng = random.Random(args.kill_seed)
    t0 = time.perf_counter()
    base = baseline_from(args.baseline, args.baseline_lock_s) if args.baseline else run_baseline(args, root)
    print(f"baseline: {base['wall_s']:.1f} s ({base['lock_s']:.1f} s to the lock), {base['num_layers']} layers, {len(base['digests'])} output files", flush=True)
    trials, total = [], 0
    while total < args.kills:
        t = trial(args, base, root, len(trials), min(args.kills_per_trial, args.kills - total), rng)
        trials.append(t)
        total += len(t["kills"])
        print(f"trial {t['trial']}: {len(t['kills'])} kills, identical={t['identical']} {t['differ'][:3]} leftovers={t['leftovers']}", flush=True)

    print("\n| trial | attempt | instant (s, baseline timeline) | killed after s | counted from | phase hit |\n|---|---|---|---|---|---|")
    for t in trials:
        for k in t["kills"]:
            print(f"| {k['trial']} | {k['attempt']} | {k['target_s']} | {k['delay_s']} | {k['from']} | {k['phase']} |")
    print("\n| trial | kills | output byte-identical to the uninterrupted run | run dir clean |\n|---|---|---|---|")
    for t in trials:
        print(f"| {t['trial']} | {len(t['kills'])} | {'yes' if t['identical'] else 'NO: ' + ', '.join(t['differ'][:3])} | {'yes' if not t['leftovers'] else t['leftovers']} |")
    phases: dict[str, int] = {}
    for t in trials:
        for k in t["kills"]:
            name = k["phase"].split(" (")[0]
            key = "layer: " + name.split(": ", 1)[1].split(",")[0] if name.startswith("layer ") else name
            phases[key] = phases.get(key, 0) + 1
    ok_kills = sum(len(t["kills"]) for t in trials if t["identical"] and not t["leftovers"])
    record = {
        "method": args.method, "source": str(args.source), "ratio": args.ratio, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "chunk_tokens": args.chunk_tokens, "options": args.option or [], "kill_seed": args.kill_seed, "max_early_kills": args.max_early_kills,
        "kills": total, "kills_identical": ok_kills, "trials": len(trials),
        "trials_identical": sum(t["identical"] for t in trials), "trials_clean": sum(not t["leftovers"] for t in trials),
        "phases": dict(sorted(phases.items())), "baseline_s": round(base["wall_s"], 1), "total_s": round(time.perf_counter() - t0, 1),
        "layers": base["num_layers"], "output_files": len(base["digests"]), "baseline_reused": bool(args.baseline),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(f"\n{ok_kills}/{total} kills resumed to a byte-identical output ({record['trials_identical']}/{len(trials)} trials identical, {record['trials_clean']} clean)")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
