"""Out of core: prune a checkpoint larger than this machine's RAM (a script).

    python benchmarks/bench_out_of_core.py                                  # LLaMA-2-13B shapes (~26 GB), cascade 20 %
    python benchmarks/bench_out_of_core.py --methods magnitude,olica --kill-after 20
    python benchmarks/bench_out_of_core.py --kill-after survey:8     # cascade, killed inside its survey
    python benchmarks/bench_out_of_core.py --continue                # go on after this script was stopped
    python benchmarks/bench_out_of_core.py --shape tiny --root /tmp/ooc --results /tmp/ooc/results   # minutes-long check

1. The checkpoint: ``make_synthetic.py``'s LLaMA-2-13B shapes (40 layers, d 5120, 40 heads,
   FFN 13824, vocab 32000; seeded random bf16, N(0, 1/in) so activations stay finite),
   one shard per layer like the real one, written once under ``--root`` and reused
   (a killed write resumes at the first missing shard).
2. Preflight: ``streamprune prune ... --dry-run``: its host-memory, disk and time forecasts.
3. The run: ``python -m streamprune prune`` in a child process (the pid sampled and killed
   is the pruning process itself). Every ``--interval`` s: the child's RSS and USS (psutil),
   the kernel's page cache and swap (``/proc/meminfo``), the child's bytes read from and
   written to storage (``/proc/PID/io``); each ``survey_layer`` line of the run's journal
   marks a survey layer's end, each line of its ``profile.jsonl`` a layer's end. With
   ``--kill-after K`` (``survey:K``) the child gets SIGKILL halfway through layer K of the
   loop (of the survey) and the same command is started again: the resume must start at
   layer K (not 0); the time lost is the killed process's work since its last commit
   plus the resume's start-up. What was sampled is kept beside the output
   (``*.bench.json``, every 30 s): if this script is stopped too (a machine taken back
   in the middle of a multi-hour run), ``--continue`` starts the prune again, which
   resumes at the layer in flight, and the record covers every process.
4. ``streamprune eval OUT`` (streamed) on ``--eval-windows`` WikiText-2 windows: finite.

Each method appends one JSON line to ``--results``/out_of_core.jsonl and writes its
timeline (``out_of_core_<shape>_<method>.json``) and the plot ``out_of_core_memory.png``.
Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic  # noqa: E402  (a sibling script)

GiB = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results"
# The test suite's shape: every code path of the large run in seconds.
TINY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=1024,
            rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5, num_hidden_layers=6, tie_word_embeddings=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-2-13b", choices=["llama-2-13b", "tiny"])
    p.add_argument("--root", type=Path, default=Path.home() / ".cache" / "streamprune" / "out_of_core",
                   help="where the checkpoint (kept) and the outputs go")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of out_of_core.jsonl and the plots")
    p.add_argument("--methods", default="cascade", help="comma-separated (default cascade, the default method)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--kill-after", default=None, metavar="K|survey:K",
                   help="SIGKILL halfway through layer K of the loop (or of the survey), then resume")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="go on with a run this script started and was stopped in (its prune resumes, its samples are kept)")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--interval", type=float, default=2.0, help="sampling period, seconds")
    p.add_argument("--save-every", type=float, default=30.0, help="seconds between saves of what was sampled (for --continue)")
    return p.parse_args(argv)


def ensure_checkpoint(shape: str, root: Path) -> tuple[Path, int]:
    folder = root / shape
    cfg = TINY if shape == "tiny" else make_synthetic.model_config(shape)
    if not (folder / "model.safetensors.index.json").is_file():  # written last: its presence = complete
        print(f"writing the {shape} checkpoint to {folder} (resumable)", flush=True)
        make_synthetic.write_checkpoint(folder, cfg, cfg["num_hidden_layers"], resume=True, log=lambda m: print(m, flush=True))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return folder, size


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (page cache = Cached + Buffers)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, rest = line.split(":", 1)
        out[key] = int(rest.split()[0]) * 1024
    return out


def prune_cmd(a, source: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamprune", "prune", str(source), "--out", str(out), "--method", method, "--ratio", str(a.ratio),
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--no-progress", *extra]


def last_json(text: str) -> dict:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON report in the output:\n{text[-3000:]}")
    return json.loads(lines[-1])


def progress_marks(work: Path) -> dict[str, list[dict]]:
    """What the run has committed so far: its survey layers (journal) and its layers (profile lines)."""
    out = {"survey": [], "layers": []}
    for name, key in (("journal.jsonl", "survey"), ("profile.jsonl", "layers")):
        path = work / name
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # half-written line: read it next time
                break
            if key == "layers" or rec.get("event") == "survey_layer":
                out[key].append(rec)
    return out


def kill_due(kill_at: tuple[str, int], run: dict, now: float) -> bool:
    """Halfway through layer K of the pass named (``survey`` or ``prune``): the previous layer's
    end plus half its duration (the first layer of the process: half the time since its start)."""
    kind, k = kill_at
    ends = {r["layer"]: r["t"] for r in run["survey" if kind == "survey" else "layers"]}
    if k - 1 not in ends:
        return False
    before = ends.get(k - 2, run["start_t"])
    return now >= ends[k - 1] + max(ends[k - 1] - before, 0.0) / 2


def run_child(cmd: list[str], work: Path, log: Path, interval: float, kill_at: tuple[str, int] | None, t0: float,
              env: dict | None = None, save=None, save_every: float = 30.0) -> dict:
    """Run ``cmd``, sampling it until it exits (or until it is killed at ``kill_at``); ``save(run)``
    every ``save_every`` s keeps what was sampled if this script itself is stopped. Returns the samples,
    the survey's and the loop's layer ends, the child's I/O totals."""
    import psutil

    seen = progress_marks(work)
    seen = {k: len(v) for k, v in seen.items()}
    run = {"start_t": time.time() - t0, "end_t": None, "returncode": None, "samples": [], "survey": [], "layers": [],
           "io": {"read_bytes": 0, "write_bytes": 0}, "killed_at": None, "resume_point": dict(seen)}
    saved = time.time()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            now = time.time()
            try:
                mem = ps.memory_full_info()  # rss and uss (the pages only this process holds)
                c = ps.io_counters()
                run["io"] = {"read_bytes": c.read_bytes, "write_bytes": c.write_bytes}
                m = meminfo()
                run["samples"].append({"t": now - t0, "rss": mem.rss, "uss": mem.uss, "cache": m["Cached"] + m["Buffers"],
                                       "available": m["MemAvailable"], "swap_used": m["SwapTotal"] - m["SwapFree"], **run["io"]})
            except psutil.Error:  # exited between poll() and the read
                pass
            for key, recs in progress_marks(work).items():
                run[key] += [{"t": now - t0, **r} for r in recs[seen[key]:]]
                seen[key] = len(recs)
            if kill_at is not None and run["killed_at"] is None and kill_due(kill_at, run, now - t0):
                os.kill(proc.pid, signal.SIGKILL)  # the pruning process itself, no shell between
                run["killed_at"] = now - t0
            run["end_t"] = now - t0
            if save is not None and now - saved >= save_every:
                save(run)
                saved = now
            time.sleep(interval)
    for key, recs in progress_marks(work).items():
        run[key] += [{"t": time.time() - t0, **r} for r in recs[seen[key]:]]
    run["returncode"], run["end_t"] = proc.returncode, time.time() - t0
    if save is not None:
        save(run)
    run["output"] = log.read_text()
    return run


def parse_kill(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    kind, _, k = text.rpartition(":")
    if kind not in ("", "survey") or not k.isdigit() or int(k) < 1:
        raise SystemExit(f"--kill-after {text!r}: give a layer K >= 1 of the loop (K) or of the survey (survey:K)")
    return (kind or "prune", int(k))


def run_method(a, source: Path, ckpt_bytes: int, method: str) -> dict:
    out = a.root / f"out-{a.shape}-{method}-{round(a.ratio * 100)}"
    work = out.with_name(out.name + ".work")
    state_file = out.with_name(out.name + ".bench.json")
    if a.resume:
        if not state_file.is_file():
            raise SystemExit(f"--continue: no earlier run of {method} to continue ({state_file} is missing): run without --continue")
        state = json.loads(state_file.read_text())
    else:
        dry = subprocess.run(prune_cmd(a, source, out, method, "--dry-run", "--fresh"), capture_output=True, text=True)
        if dry.returncode:
            raise SystemExit(f"preflight of {method} failed:\n{dry.stderr[-3000:]}")
        for old in (out, work):  # a published output would be returned as is; --fresh clears the run dir only after the sampler read it
            shutil.rmtree(old, ignore_errors=True)
        state = {"forecast": last_json(dry.stdout), "runs": []}
        (a.root / f"{method}.log").unlink(missing_ok=True)
    forecast = state["forecast"]

    def save(run: dict) -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**state, "runs": state["runs"] + [{k: v for k, v in run.items() if k != "output"}]}))
        os.replace(tmp, state_file)

    kill_at = parse_kill(a.kill_after)
    env = None
    if a.shape == "tiny" and kill_at is not None:  # tiny layers take less than a sample: hold layer K open for the kill
        point = f"observe:{kill_at[1]}" if kill_at[0] == "prune" else f"surveyed:{kill_at[1] - 1}"  # inside layer K, before its commit
        env = {**os.environ, "STREAMPRUNE_STALL_AT": f"{point}:60"}
    while True:
        t0 = time.time() - (state["runs"][-1]["end_t"] if state["runs"] else 0.0)  # the timeline leaves out the time between processes
        deliberate = kill_at if not any(r["killed_at"] for r in state["runs"]) else None
        run = run_child(prune_cmd(a, source, out, method, *(() if state["runs"] else ("--fresh",))), work, a.root / f"{method}.log",
                        a.interval, deliberate, t0, env if deliberate else None, save, a.save_every)
        state["runs"].append({k: v for k, v in run.items() if k != "output"})
        if run["killed_at"] is None:
            break
    runs = state["runs"]
    if run["returncode"] != 0:
        raise SystemExit(f"prune with {method} failed (exit {run['returncode']}):\n{run['output'][-3000:]}")
    wall = run["end_t"]
    report = last_json(run["output"])
    ev = subprocess.run([sys.executable, "-m", "streamprune", "eval", str(out), "--dataset", "wikitext2", "--seqlen", "128",
                         "--max-windows", str(a.eval_windows), "--no-progress"], capture_output=True, text=True)
    if ev.returncode:
        raise SystemExit(f"eval of the {method} output failed:\n{ev.stderr[-3000:]}")
    ppl = last_json(ev.stdout)
    layers = [rec for r in runs for rec in r["layers"]]
    survey = [rec for r in runs for rec in r["survey"]]
    samples = [s for r in runs for s in r["samples"]]
    peak = [max((s["rss"] for s in r["samples"]), default=0) for r in runs]
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    killed = next((r for r in runs if r["killed_at"] is not None), None)
    # Time lost to each process that did not finish: from its last commit (survey layer or layer) to its end.
    lost = [r["end_t"] - max([x["t"] for x in r["survey"] + r["layers"]], default=r["start_t"]) for r in runs[:-1]]
    rec = {
        "shape": a.shape,
        "method": method,
        "ratio": a.ratio,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "checkpoint_bytes": ckpt_bytes,
        "output_bytes": out_bytes,
        "ram_bytes": meminfo()["MemTotal"],
        "peak_rss_bytes": max(max(peak), report.get("peak_rss_bytes") or 0),
        "peak_rss_bytes_per_process": peak,
        "peak_uss_bytes": max((s["uss"] for s in samples), default=0),
        "peak_page_cache_bytes": max((s["cache"] for s in samples), default=0),
        "min_available_bytes": min((s["available"] for s in samples), default=0),
        "peak_swap_used_bytes": max((s["swap_used"] for s in samples), default=0),
        "wall_s": round(wall, 1),
        "processes": len(runs),
        "resume_points": [r["resume_point"] for r in runs[1:]],  # survey layers and layers committed when each started
        "survey_layer_wall_s_median": median_gap(runs),
        "layer_wall_s_median": round(sorted(r["wall_s"] for r in layers)[len(layers) // 2], 2) if layers else None,
        "bytes_read": sum(r["io"]["read_bytes"] for r in runs),
        "bytes_written": sum(r["io"]["write_bytes"] for r in runs),
        "preflight_host_bytes": forecast["cpu_bytes"],
        "preflight_disk_bytes": forecast["disk_bytes"],
        "preflight_wall_s": forecast.get("wall_s"),
        "achieved_ratio": report["achieved_ratio"],
        "eval_windows": ppl.get("windows"),
        "eval_ppl": ppl["ppl"],
        "killed_at_s": killed["killed_at"] if killed else None,
        "killed_in": list(kill_at) if killed else None,
        "resumed_from_layer": report.get("resumed_from_layer") if len(runs) > 1 else None,
    }
    if len(runs) > 1:
        rec["lost_s"] = round(sum(lost) + (report.get("startup_s") or 0.0), 1)
    a.results.mkdir(parents=True, exist_ok=True)
    timeline = {"record": rec, "samples": samples, "survey": survey, "layers": layers,
                "kills": [r["end_t"] for r in runs[:-1]]}
    (a.results / f"out_of_core_{a.shape}_{method}.json").write_text(json.dumps(timeline) + "\n")
    with open(a.results / "out_of_core.jsonl", "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    state_file.unlink()
    return timeline


def median_gap(runs: list[dict]) -> float | None:
    """Median time between consecutive survey-layer commits within one process."""
    gaps = []
    for r in runs:
        ts = [r["start_t"]] + [x["t"] for x in r["survey"]]
        gaps += [b - a for a, b in zip(ts[1:-1], ts[2:])]  # the first layer of a process includes its start-up
    return round(sorted(gaps)[len(gaps) // 2], 2) if gaps else None


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs) + 0.6), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        rec, s = run["record"], run["samples"]
        t = [x["t"] / 60 for x in s]
        ax.plot(t, [x["rss"] / GiB for x in s], color="tab:blue", lw=1.6, label="prune process RSS")
        ax.plot(t, [x["uss"] / GiB for x in s], color="tab:cyan", lw=1, ls="--", label="USS (its own pages)")
        ax.plot(t, [x["cache"] / GiB for x in s], color="0.55", lw=1, label="kernel page cache (not the process's)")
        ax.axhline(rec["checkpoint_bytes"] / GiB, color="tab:red", lw=1, ls=":", label="checkpoint size")
        ax.axhline(rec["ram_bytes"] / GiB, color="black", lw=1, ls="-.", label="machine RAM")
        for layer in run.get("survey", []):
            ax.axvline(layer["t"] / 60, color="tab:orange", lw=0.4, alpha=0.5)
        for layer in run["layers"]:
            ax.axvline(layer["t"] / 60, color="tab:green", lw=0.4, alpha=0.5)
        kills = run.get("kills", [rec["killed_at_s"]] if rec.get("killed_at_s") is not None else [])
        points = rec.get("resume_points", [{"survey": 0, "layers": rec.get("resumed_from_layer")}])
        for n, (t, point) in enumerate(zip(kills, points)):
            ax.axvline(t / 60, color="tab:red", lw=1.5, label=("process ended (kill -9), resumed at survey layer / layer "
                                                                 f"{point['survey']} / {point['layers']}") if n == 0 else None)
        ax.set_ylabel("GiB")
        ax.set_ylim(0, max(rec["checkpoint_bytes"], rec["ram_bytes"]) / GiB * 1.15)
        ax.set_title(f"{rec['method']} {round(rec['ratio'] * 100)} % on {rec['shape']} shapes ({rec['checkpoint_bytes'] / GiB:.1f} GiB "
                     f"checkpoint, {rec['ram_bytes'] / GiB:.1f} GiB RAM): peak RSS {rec['peak_rss_bytes'] / GiB:.2f} GiB; "
                     "orange / green = survey / layer ends", fontsize=9, loc="left")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="center right", framealpha=0.9)
    axes[-1, 0].set_xlabel("minutes since the start of the prune")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    source, ckpt_bytes = ensure_checkpoint(a.shape, a.root)
    for method in a.methods.split(","):
        run = run_method(a, source, ckpt_bytes, method)
        print(json.dumps(run["record"], sort_keys=True), flush=True)
    timelines = [json.loads(p.read_text()) for p in sorted(a.results.glob(f"out_of_core_{a.shape}_*.json"))]  # every method run on this shape
    plot(timelines, a.results / f"out_of_core_memory{'' if a.shape == 'llama-2-13b' else '_' + a.shape}.png")


if __name__ == "__main__":
    main()
