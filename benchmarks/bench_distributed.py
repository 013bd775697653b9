"""Data-parallel speed-up: the same prune with 1 rank and with N ranks under torchrun (a script).

    python benchmarks/bench_distributed.py --config smollm2 --layers 4 --vocab 4096 --method olica \\
        --nsamples 64 --seqlen 128 --nproc 2 --threads 1 --repeats 3          # CPU, gloo
    python benchmarks/bench_distributed.py --config llama-2-7b --layers 2 --device cuda --nproc 8 --threads 4

Writes a synthetic checkpoint with ``make_synthetic.py`` (once), then runs, in turn
(1 rank, N ranks, 1 rank, N ranks, ...: pairing keeps the ratio meaningful while the
machine's speed drifts), ``python -m streamprune prune`` and ``torchrun --nproc-per-node N
-m streamprune prune``, each with ``OMP_NUM_THREADS=--threads`` per process and
``--fresh``. From each run's ``profile.jsonl`` (rank 0's; rank 0 waits for the slowest
rank at every collective, so its layer time is the job's) it takes the median per-layer
wall time and its split (read / forward / sync / decide / write), rank 0's CPU seconds per
layer, and the whole command's wall time (process start-up, survey and boundary 0 included).

On a machine shared with other jobs the wall-time speed-up is capped by the idle cores, so
the CPU seconds are printed too: ``cpu_s`` of 1 rank / ``cpu_s`` of rank 0 of N is the
share of a layer's work each rank does (ideal N; the ranks' shards are balanced).

Prints a table, the per-pair speed-ups and their median, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic  # noqa: E402  (a sibling script)

PHASES = ("read_s", "forward_s", "sync_s", "decide_s", "write_s", "cpu_s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    make_synthetic.add_shape_args(p)
    p.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and runs (default: a temp folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--method", default="olica")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--chunk-tokens", type=int, default=2048, help="per forward chunk (default 2048: several chunks per rank)")
    p.add_argument("--calib", default="c4")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the parallel run (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3); medians are quoted")
    return p.parse_args()


def run(a: argparse.Namespace, source: Path, work: Path, nproc: int) -> dict:
    out, run_dir = work / f"out-{nproc}", work / f"run-{nproc}"
    args = ["prune", str(source), "--out", str(out), "--work-dir", str(run_dir), "--fresh", "--method", a.method,
            "--ratio", str(a.ratio), "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
            "--chunk-tokens", str(a.chunk_tokens), "--device", a.device, "--no-progress"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "streamprune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "streamprune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    prof = [json.loads(line) for line in (run_dir / "profile.jsonl").read_text().splitlines()]
    med = lambda key: statistics.median(p.get(key, 0.0) for p in prof)
    return {"nproc": nproc, "command_s": round(wall, 2), "engine_s": report["wall_s"], "layer_s": med("wall_s"),
            **{k: med(k) for k in PHASES}, "bytes_read": med("bytes_read"), "layers": len(prof)}


def main() -> None:
    a = parse_args()
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_dist_", dir=a.work))
    try:
        cfg = make_synthetic.config_from_args(a)
        print(f"writing a {a.config}-shaped checkpoint ({a.layers} layers) in {work}")
        make_synthetic.write_checkpoint(work / "model", cfg, a.layers, make_synthetic.DTYPES[a.dtype], a.seed,
                                        a.tokenizer_vocab, log=lambda *_: None)
        layer_bytes = statistics.median(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
        pairs = []
        for rep in range(a.repeats):
            one, many = run(a, work / "model", work, 1), run(a, work / "model", work, a.nproc)
            pairs.append((one, many))
            print(f"pair {rep}: 1 rank {one['layer_s']:.3f} s/layer, {a.nproc} ranks {many['layer_s']:.3f} s/layer "
                  f"-> x{one['layer_s'] / many['layer_s']:.2f} (command {one['command_s']:.1f} s vs {many['command_s']:.1f} s)")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    def median(side: int, key: str) -> float:
        return statistics.median(p[side][key] for p in pairs)

    print(f"\n{a.config} shapes, {a.layers} layers, {a.method} @ {a.ratio}, {a.nsamples} x {a.seqlen} tokens, "
          f"{a.threads} thread(s) per process, {a.device}; medians of {a.repeats} pairs")
    print(f"{'ranks':>5} {'layer_s':>8} " + " ".join(f"{k:>9}" for k in PHASES) + f" {'engine_s':>9} {'command_s':>9}")
    for side, n in ((0, 1), (1, a.nproc)):
        cells = " ".join(f"{median(side, k):>9.3f}" for k in PHASES)
        print(f"{n:>5} {median(side, 'layer_s'):>8.3f} {cells} {median(side, 'engine_s'):>9.2f} {median(side, 'command_s'):>9.2f}")
    layer_x = statistics.median(o["layer_s"] / m["layer_s"] for o, m in pairs)
    engine_x = statistics.median(o["engine_s"] / m["engine_s"] for o, m in pairs)
    command_x = statistics.median(o["command_s"] / m["command_s"] for o, m in pairs)
    cpu_x = statistics.median(o["cpu_s"] / m["cpu_s"] for o, m in pairs)
    print(f"speed-up (median of per-pair ratios): per layer x{layer_x:.2f}, engine x{engine_x:.2f}, whole command x{command_x:.2f} "
          f"(ideal x{a.nproc}); CPU seconds per layer, 1 rank / rank 0 of {a.nproc}: x{cpu_x:.2f}")
    print(f"read per layer by rank 0 (its layer weights, {layer_bytes / 2**20:.1f} MiB on disk, + its activation shard): "
          f"{median(0, 'bytes_read') / 2**20:.1f} MiB with 1 rank, {median(1, 'bytes_read') / 2**20:.1f} MiB with {a.nproc}; "
          f"each rank reads the layer's weights (the page cache serves all but the first)")
    print(json.dumps({"bench": "distributed", "config": a.config, "layers": a.layers, "method": a.method, "nproc": a.nproc,
                      "threads": a.threads, "device": a.device, "nsamples": a.nsamples, "seqlen": a.seqlen,
                      "layer_s_1": median(0, "layer_s"), f"layer_s_{a.nproc}": median(1, "layer_s"),
                      "speedup_layer": round(layer_x, 3), "speedup_engine": round(engine_x, 3), "speedup_command": round(command_x, 3), "cpu_split": round(cpu_x, 3), "layer_file_bytes": layer_bytes,
                      "pairs": pairs}, sort_keys=True))


if __name__ == "__main__":
    main()
