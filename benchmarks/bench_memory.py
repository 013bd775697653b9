"""Memory of a streamed prune over time, and its peak as the model gets deeper (a script).

    python benchmarks/bench_memory.py                                   # custom d 512, f 1408; 8/16/32 layers, CPU
    python benchmarks/bench_memory.py --device cuda --config llama-2-7b --vocab 4096 --depths 2,4,8

For each depth (same width, same seed) a synthetic checkpoint is written with
``make_synthetic.py`` and pruned by ``streamprune prune`` in a **child process**, so every
depth starts from a fresh interpreter and its memory is its own. While it runs, a sampler
thread here reads the child's RSS (psutil, child + its own children) every ``--interval``
seconds and watches the run's ``profile.jsonl``: the moment a line appears is the end of
that layer. On CUDA the child also samples ``torch.cuda.memory_allocated`` / ``_reserved``
in a thread of its own (those counters are per process) and hands the samples back.

The claim under test (ARCHITECTURE.md): CPU memory does not grow with the number of
layers. Reported per depth: peak RSS = the larger of the kernel's ``ru_maxrss`` of the child
(exact, as the engine read it at finalize) and the sampled maximum (which also sees the
end of the run), the checkpoint size for contrast, and the ratio of peak RSS at the
deepest to the shallowest depth (1.0 = flat; the checkpoint grows by the depth ratio).

Writes ``memory_timeline.png`` (RSS / GPU memory over time, one panel per depth, layer
ends marked) and ``memory_vs_depth.png`` to ``--results`` (default benchmarks/results/).
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic  # noqa: E402  (a sibling script)

GiB, MiB = 1 << 30, 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    make_synthetic.add_shape_args(p)
    p.set_defaults(config="custom")
    p.add_argument("--depths", default="8,16,32", help="comma-separated layer counts (default 8,16,32)")
    p.add_argument("--method", default="magnitude", help="pruning method (default magnitude: quick)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-dtype", default=None)
    p.add_argument("--max-gpu-memory", default=None)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--calib", default="c4")
    p.add_argument("--interval", type=float, default=0.05, help="sampling period in seconds")
    p.add_argument("--work", type=Path, default=None, help="folder for checkpoints and runs (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the PNGs go (default benchmarks/results/)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: run one prune
    return p.parse_args(argv)


# ---- the child: one prune, GPU memory sampled in-process ------------------------------------
def child_main(spec_path: Path) -> None:
    import torch

    from streamprune.config import PruneConfig
    from streamprune.engine import prune

    spec = json.loads(spec_path.read_text())
    cfg = PruneConfig(**spec["config"])
    samples: list[tuple[float, int, int]] = []  # (unix time, allocated, reserved)
    stop = threading.Event()
    sampler = None
    if cfg.device.startswith("cuda"):
        device = torch.device(cfg.device)

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.time(), torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)))
                stop.wait(spec["interval"])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        report = prune(cfg)
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        Path(spec["gpu_samples"]).write_text(json.dumps(samples))
    print(json.dumps(report, sort_keys=True, default=str))


# ---- the parent: RSS of the child + layer ends from profile.jsonl ---------------------------
def sample_child(proc: subprocess.Popen, profile: Path, interval: float) -> tuple[list, list]:
    """Until ``proc`` exits: [(unix time, rss bytes)], [(unix time, profile record)]."""
    import psutil

    ps = psutil.Process(proc.pid)
    rss, layers, seen = [], [], 0
    while proc.poll() is None:
        now = time.time()
        try:
            total = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            rss.append((now, total))
        except psutil.Error:  # exited between poll() and the read
            pass
        if profile.is_file():
            lines = profile.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    layers.append((now, json.loads(line)))
                    seen += 1
                except json.JSONDecodeError:  # half-written line: read it next time
                    break
        time.sleep(interval)
    if profile.is_file():  # lines written after the last sample
        for line in profile.read_text().splitlines()[seen:]:
            layers.append((time.time(), json.loads(line)))
    return rss, layers


def run_depth(a: argparse.Namespace, depth: int, work: Path) -> dict:
    cfg = make_synthetic.config_from_args(a)
    model = work / f"model_{depth}"
    info = make_synthetic.write_checkpoint(model, cfg, depth, make_synthetic.DTYPES[a.dtype], a.seed, a.tokenizer_vocab, log=lambda *_: None)
    run_dir = work / f"run_{depth}"
    spec = {
        "config": dict(source=str(model), out=str(work / f"out_{depth}"), method=a.method, ratio=a.ratio, calib=a.calib,
                       nsamples=a.nsamples, seqlen=a.seqlen, device=a.device, dtype=a.compute_dtype, work_dir=str(run_dir),
                       fresh=True, max_gpu_memory=a.max_gpu_memory, progress=False),
        "interval": a.interval,
        "gpu_samples": str(work / f"gpu_{depth}.json"),
    }
    spec_path = work / f"spec_{depth}.json"
    spec_path.write_text(json.dumps(spec))
    out_log, err_log = work / f"child_{depth}.out", work / f"child_{depth}.err"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=out, stderr=err)
        rss, layers = sample_child(proc, run_dir / "profile.jsonl", a.interval)
    if proc.returncode != 0:
        raise SystemExit(f"prune of the {depth}-layer checkpoint failed (exit {proc.returncode}):\n{err_log.read_text()[-3000:]}")
    report = json.loads(out_log.read_text().strip().splitlines()[-1])
    gpu = json.loads(Path(spec["gpu_samples"]).read_text())
    peak = max((r for _, r in rss), default=0)
    while len(rss) > 1 and rss[-1][1] < 0.5 * peak:
        rss.pop()  # the last samples caught the interpreter tearing down
    run = {
        "depth": depth,
        "checkpoint_bytes": info["total_bytes"],
        "layer_bytes": info["layer_bytes"],
        "wall_s": time.time() - t0,
        "maxrss_bytes": report.get("peak_rss_bytes") or 0,  # the child's ru_maxrss, as the engine last read it
        "sampled_peak_rss_bytes": max((r for _, r in rss), default=0),
        "gpu_peak_allocated_bytes": report.get("gpu_peak_allocated_bytes"),
        "rss": [(t - t0, r) for t, r in rss],
        "gpu": [(t - t0, al, rs) for t, al, rs in gpu],
        "layers": [(t - t0, rec) for t, rec in layers],
    }
    run["peak_rss_bytes"] = max(run["maxrss_bytes"], run["sampled_peak_rss_bytes"])
    return run


# ---- plots ------------------------------------------------------------------------------
def plot_timeline(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs) + 0.6), squeeze=False)
    top = max(max((r for _, r in run["rss"]), default=0) for run in runs) / GiB
    top = max(top, max((max((rs for _, _, rs in run["gpu"]), default=0) for run in runs)) / GiB)
    for ax, run in zip(axes[:, 0], runs):
        t = [s for s, _ in run["rss"]]
        ax.plot(t, [r / GiB for _, r in run["rss"]], color="tab:blue", lw=1.6, label="process RSS")
        if run["gpu"]:
            ax.plot([s for s, _, _ in run["gpu"]], [a / GiB for _, a, _ in run["gpu"]], color="tab:red", lw=1.2, label="GPU allocated")
            ax.plot([s for s, _, _ in run["gpu"]], [r / GiB for _, _, r in run["gpu"]], color="tab:red", lw=1, ls="--", label="GPU reserved")
        ends = [s for s, _ in run["layers"]]
        if ends:
            loop_start = ends[0] - run["layers"][0][1]["wall_s"]
            ax.axvspan(0, loop_start, color="0.5", alpha=0.10, lw=0, label="start-up: imports, calibration, boundary 0")
            ax.axvspan(loop_start, ends[-1], color="tab:green", alpha=0.07, lw=0, label="layer loop")
            ax.axvspan(ends[-1], t[-1] if t else ends[-1], color="tab:orange", alpha=0.12, lw=0, label="finalize + exit")
            for s in ends:
                ax.axvline(s, color="tab:green", lw=0.6, alpha=0.6)
        peak = run["peak_rss_bytes"]
        ax.axhline(peak / GiB, color="tab:blue", lw=0.8, ls=":")
        ax.text(t[-1] if t else 0, peak / GiB, f" peak {peak / GiB:.2f} GiB", va="bottom", ha="right", fontsize=8, color="tab:blue")
        ax.set_ylim(0, top * 1.15)
        ax.set_xlim(0, max(t[-1] if t else 1, 1e-3))
        ax.set_ylabel("GiB")
        ax.set_title(f"{run['depth']} layers (checkpoint {run['checkpoint_bytes'] / MiB:.3g} MiB); thin lines = layer ends", fontsize=9, loc="left")
        ax.grid(alpha=0.25)
    axes[0, 0].legend(loc="lower right", fontsize=7, ncol=2, framealpha=0.9)
    axes[-1, 0].set_xlabel("seconds since start of the prune process")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r["depth"] for r in runs]
    peak = [r["peak_rss_bytes"] / GiB for r in runs]
    ckpt = [r["checkpoint_bytes"] / GiB for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(depths, peak, "o-", color="tab:blue", lw=2, label="peak RSS of the prune")
    ax.plot(depths, ckpt, "s--", color="0.5", lw=1.2, label="checkpoint size on disk")
    for d, p in zip(depths, peak):
        ax.annotate(f"{p:.2f}", (d, p), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8, color="tab:blue")
    if any(r["gpu_peak_allocated_bytes"] for r in runs):
        ax.plot(depths, [(r["gpu_peak_allocated_bytes"] or 0) / GiB for r in runs], "^-", color="tab:red", label="GPU peak allocated")
    ax.set_xticks(depths)
    ax.set_xlabel("decoder layers (same width)")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(peak + ckpt) * 1.2)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="center left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    a = parse_args()
    if a.child is not None:
        child_main(a.child)
        return
    depths = sorted({int(x) for x in a.depths.split(",")})
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=a.work))
    try:
        runs = []
        for depth in depths:
            print(f"depth {depth}: writing checkpoint and pruning ({a.method}, {a.nsamples}x{a.seqlen}, {a.device}) ...", flush=True)
            runs.append(run_depth(a, depth, work))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cfg = make_synthetic.config_from_args(a)
    shape = f"d {cfg['hidden_size']}, f {cfg['intermediate_size']}, H {cfg['num_attention_heads']}, G {cfg['num_key_value_heads']}"
    print(f"\n{a.config} shapes ({shape}), method {a.method}, {a.nsamples}x{a.seqlen} calibration, device {a.device}")
    hdr = f"{'layers':>6} {'ckpt MiB':>9} {'peak RSS GiB':>12} {'maxrss GiB':>10} {'sampled GiB':>11} {'end RSS GiB':>11} {'GPU peak GiB':>12} {'wall s':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        end_rss = r["layers"][-1][1]["rss_bytes"] / GiB if r["layers"] else float("nan")
        gpu = f"{r['gpu_peak_allocated_bytes'] / GiB:.2f}" if r["gpu_peak_allocated_bytes"] else "-"
        print(f"{r['depth']:>6} {r['checkpoint_bytes'] / MiB:9.1f} {r['peak_rss_bytes'] / GiB:12.3f} {r['maxrss_bytes'] / GiB:10.3f} "
              f"{r['sampled_peak_rss_bytes'] / GiB:11.3f} "
              f"{end_rss:11.3f} {gpu:>12} {r['wall_s']:7.1f}")
    first, last = runs[0], runs[-1]
    rss_ratio = last["peak_rss_bytes"] / first["peak_rss_bytes"]
    depth_ratio = last["depth"] / first["depth"]
    slope = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / max(1, last["depth"] - first["depth"])
    print(f"\npeak RSS {last['depth']}/{first['depth']} layers: {rss_ratio:.3f}  (checkpoint: {last['checkpoint_bytes'] / first['checkpoint_bytes']:.2f}; "
          f"1.0 = flat); growth {slope / MiB:+.2f} MiB per extra layer vs {first['layer_bytes'] / MiB:.1f} MiB per layer on disk")

    a.results.mkdir(parents=True, exist_ok=True)
    timeline, vs_depth = a.results / "memory_timeline.png", a.results / "memory_vs_depth.png"
    plot_timeline(runs, timeline, f"streamprune prune memory over time: {a.config} ({shape}), {a.method}, {a.nsamples}x{a.seqlen}, {a.device}")
    plot_depth(runs, vs_depth, f"peak RSS x{rss_ratio:.2f} for x{depth_ratio:g} layers "
               f"(checkpoint x{last['checkpoint_bytes'] / first['checkpoint_bytes']:.2f})\n{a.config}: {shape}, {a.method}, {a.device}")
    print(f"plots: {timeline}, {vs_depth}")
    print(json.dumps({
        "bench": "memory", "config": a.config, "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "method": a.method, "device": a.device, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "depths": [r["depth"] for r in runs],
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in runs],
        "maxrss_bytes": [r["maxrss_bytes"] for r in runs],
        "sampled_peak_rss_bytes": [r["sampled_peak_rss_bytes"] for r in runs],
        "gpu_peak_allocated_bytes": [r["gpu_peak_allocated_bytes"] for r in runs],
        "checkpoint_bytes": [r["checkpoint_bytes"] for r in runs],
        "peak_rss_ratio": round(rss_ratio, 4), "depth_ratio": depth_ratio,
        "rss_growth_bytes_per_layer": round(slope),
        "plots": [str(timeline), str(vs_depth)],
    }, sort_keys=True))


if __name__ == "__main__":
    main()
