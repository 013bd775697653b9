"""Out of core: prune a checkpoint larger than this machine's RAM (a script).

    python benchmarks/bench_out_of_core.py                                  # LLaMA-2-13B shapes (~26 GB), cascade 20 %
    python benchmarks/bench_out_of_core.py --methods magnitude,olica --kill-after 20
    python benchmarks/bench_out_of_core.py --shape tiny --root /tmp/ooc --results /tmp/ooc/results   # minutes-long check

1. The checkpoint: ``make_synthetic.py``'s LLaMA-2-13B shapes (40 layers, d 5120, 40 heads,
   FFN 13824, vocab 32000; seeded random bf16, N(0, 1/in) so activations stay finite),
   one shard per layer like the real one, written once under ``--root`` and reused
   (a killed write resumes at the first missing shard).
2. Preflight: ``streamprune prune ... --dry-run``: its host-memory, disk and time forecasts.
3. The run: ``python -m streamprune prune`` in a child process (the pid sampled and killed
   is the pruning process itself). Every ``--interval`` s: the child's RSS and USS (psutil),
   the kernel's page cache and swap (``/proc/meminfo``), the child's bytes read from and
   written to storage (``/proc/PID/io``); each line of the run's ``profile.jsonl`` marks a
   layer's end. With ``--kill-after K`` the child gets SIGKILL halfway through layer K and
   the same command is started again: the resume must start at layer K (not 0); the
   time lost is the killed process's work since its last committed layer plus the
   resume's start-up.
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
    p.add_argument("--kill-after", type=int, default=None, help="SIGKILL halfway through this layer, then resume")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--interval", type=float, default=2.0, help="sampling period, seconds")
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


def run_child(cmd: list[str], profile: Path, log: Path, interval: float, kill_after: int | None, t0: float,
              env: dict | None = None) -> dict:
    """Run ``cmd``, sampling it until it exits (or until it is killed halfway through layer
    ``kill_after``). Returns the samples, the layer ends and the child's I/O totals."""
    import psutil

    samples, layers, seen = [], [], len(profile.read_text().splitlines()) if profile.is_file() else 0
    io = {"read_bytes": 0, "write_bytes": 0}
    killed_at = None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            now = time.time()
            try:
                mem = ps.memory_full_info()  # rss and uss (the pages only this process holds)
                c = ps.io_counters()
                io = {"read_bytes": c.read_bytes, "write_bytes": c.write_bytes}
                m = meminfo()
                samples.append({"t": now - t0, "rss": mem.rss, "uss": mem.uss, "cache": m["Cached"] + m["Buffers"],
                                "available": m["MemAvailable"], "swap_used": m["SwapTotal"] - m["SwapFree"], **io})
            except psutil.Error:  # exited between poll() and the read
                pass
            if profile.is_file():
                for line in profile.read_text().splitlines()[seen:]:
                    try:
                        layers.append({"t": now - t0, **json.loads(line)})
                        seen += 1
                    except json.JSONDecodeError:  # half-written line: read it next time
                        break
            before = [r for r in layers if r["layer"] == (kill_after or 0) - 1]
            if kill_after is not None and killed_at is None and before and now - t0 >= before[0]["t"] + before[0]["wall_s"] / 2:
                os.kill(proc.pid, signal.SIGKILL)  # the pruning process itself, no shell between
                killed_at = now - t0
            time.sleep(interval)
    if profile.is_file():
        for line in profile.read_text().splitlines()[seen:]:
            layers.append({"t": time.time() - t0, **json.loads(line)})
    return {"returncode": proc.returncode, "samples": samples, "layers": layers, "io": io, "killed_at": killed_at,
            "output": log.read_text()}


def run_method(a, source: Path, ckpt_bytes: int, method: str) -> dict:
    out = a.root / f"out-{a.shape}-{method}-{round(a.ratio * 100)}"
    work = out.with_name(out.name + ".work")
    dry = subprocess.run(prune_cmd(a, source, out, method, "--dry-run", "--fresh"), capture_output=True, text=True)
    if dry.returncode:
        raise SystemExit(f"preflight of {method} failed:\n{dry.stderr[-3000:]}")
    forecast = last_json(dry.stdout)
    for old in (out, work):  # a published output would be returned as is; --fresh clears the run dir only after the sampler read it
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.time()
    env = None
    if a.shape == "tiny" and a.kill_after is not None:  # tiny layers take less than a sample: hold layer K open for the kill
        env = {**os.environ, "STREAMPRUNE_STALL_AT": f"observe:{a.kill_after}:60"}
    first = run_child(prune_cmd(a, source, out, method, "--fresh"), work / "profile.jsonl", a.root / f"{method}.log",
                      a.interval, a.kill_after, t0, env)
    runs = [first]
    if first["killed_at"] is not None:
        runs.append(run_child(prune_cmd(a, source, out, method), work / "profile.jsonl", a.root / f"{method}.resume.log",
                              a.interval, None, t0))
    if runs[-1]["returncode"] != 0:
        raise SystemExit(f"prune with {method} failed (exit {runs[-1]['returncode']}):\n{runs[-1]['output'][-3000:]}")
    wall = time.time() - t0
    report = last_json(runs[-1]["output"])
    ev = subprocess.run([sys.executable, "-m", "streamprune", "eval", str(out), "--dataset", "wikitext2", "--seqlen", "128",
                         "--max-windows", str(a.eval_windows), "--no-progress"], capture_output=True, text=True)
    if ev.returncode:
        raise SystemExit(f"eval of the {method} output failed:\n{ev.stderr[-3000:]}")
    ppl = last_json(ev.stdout)
    layers = [rec for run in runs for rec in run["layers"]]
    samples = [s for run in runs for s in run["samples"]]
    peak = [max((s["rss"] for s in run["samples"]), default=0) for run in runs]
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
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
        "layer_wall_s_median": round(sorted(r["wall_s"] for r in layers)[len(layers) // 2], 2) if layers else None,
        "bytes_read": sum(r["io"]["read_bytes"] for r in runs),
        "bytes_written": sum(r["io"]["write_bytes"] for r in runs),
        "preflight_host_bytes": forecast["cpu_bytes"],
        "preflight_disk_bytes": forecast["disk_bytes"],
        "preflight_wall_s": forecast.get("wall_s"),
        "achieved_ratio": report["achieved_ratio"],
        "eval_windows": ppl.get("windows"),
        "eval_ppl": ppl["ppl"],
        "killed_at_s": first["killed_at"],
        "resumed_from_layer": report.get("resumed_from_layer") if first["killed_at"] is not None else None,
    }
    if first["killed_at"] is not None:
        ends = [r["t"] for r in first["layers"]]
        last_commit = ends[-1] if ends else 0.0
        rec["lost_s"] = round(first["killed_at"] - last_commit + (report.get("startup_s") or 0.0), 1)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"out_of_core_{a.shape}_{method}.json").write_text(json.dumps({"record": rec, "samples": samples, "layers": layers}) + "\n")
    with open(a.results / "out_of_core.jsonl", "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return {"record": rec, "samples": samples, "layers": layers}


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
        for layer in run["layers"]:
            ax.axvline(layer["t"] / 60, color="tab:green", lw=0.4, alpha=0.5)
        if rec["killed_at_s"] is not None:
            ax.axvline(rec["killed_at_s"] / 60, color="tab:red", lw=1.5, label=f"kill -9 (resumed at layer {rec['resumed_from_layer']})")
        ax.set_ylabel("GiB")
        ax.set_ylim(0, max(rec["checkpoint_bytes"], rec["ram_bytes"]) / GiB * 1.15)
        ax.set_title(f"{rec['method']} {round(rec['ratio'] * 100)} % on {rec['shape']} shapes ({rec['checkpoint_bytes'] / GiB:.1f} GiB "
                     f"checkpoint, {rec['ram_bytes'] / GiB:.1f} GiB RAM): peak RSS {rec['peak_rss_bytes'] / GiB:.2f} GiB; "
                     "green = layer ends", fontsize=9, loc="left")
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
    runs = []
    for method in a.methods.split(","):
        run = run_method(a, source, ckpt_bytes, method)
        runs.append(run)
        print(json.dumps(run["record"], sort_keys=True), flush=True)
    plot(runs, a.results / f"out_of_core_memory{'' if a.shape == 'llama-2-13b' else '_' + a.shape}.png")


if __name__ == "__main__":
    main()
