"""Per-layer cost of a streamed prune, and what it means for an 80-layer model (a script).

    python benchmarks/bench_layers.py --config smollm2 --layers 4 --method magnitude --device cpu
    python benchmarks/bench_layers.py --config llama-2-70b --layers 4 --vocab 32000 \\
        --device cuda --max-gpu-memory 24GiB --work /nvme/bench          # 70B-shaped layers
    python benchmarks/bench_layers.py --model /path/to/checkpoint --method olica   # an existing folder

Writes a synthetic checkpoint with ``make_synthetic.py`` (or takes ``--model``), prunes it
in-process with ``streamprune.engine.prune``, and reads the run's ``profile.jsonl``:

1. a per-layer table: read / forward / decide / write seconds, GPU peak allocated and
   reserved, process RSS, bytes read and written;
2. the disk's bandwidth, measured on a freshly written file in the work folder: write +
   fsync, then a read after ``posix_fadvise(DONTNEED)`` asked the kernel to drop the file
   from the page cache ("evicted"), then a second read ("page cache"). Caveat: eviction is
   advisory. On a filesystem that ignores it (tmpfs, some overlay / network filesystems)
   the "evicted" figure is page-cache bandwidth and the floor below is too optimistic; the
   table flags it when both reads are within 30% of each other. No O_DIRECT (alignment
   rules, not supported everywhere), so this is what buffered reads of the checkpoint get;
3. the extrapolation to ``--extrapolate-layers`` (80) layers: median per-layer wall time
   (+ the survey pass per layer, for methods that have one) × 80 + the fixed costs (run
   total - layer loop - survey: tokenization, boundary 0, finalize), next to the I/O floor
   (median bytes read / read bandwidth + bytes written / write bandwidth, × 80) and their
   ratio, floor / extrapolated: 1.0 would mean the run is as fast as the disk allows.

The engine counts bytes as tensor payloads: weights read, every read of the activation
boundary (each pass reads it once), the next boundary and the output layer written.
Activations just written are usually still in the page cache when read back, so the floor
is the cost if none of them were: a bound, not a prediction.

Prints the tables, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic  # noqa: E402  (a sibling script)

from streamprune import engine  # noqa: E402
from streamprune.config import PruneConfig  # noqa: E402
from streamprune.methods import available  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
# profile.jsonl fields copied into the JSON line, one dict per layer (gpu_summary.py renders them)
PER_LAYER_KEYS = ("layer", "read_s", "forward_s", "decide_s", "write_s", "wall_s", "gpu_peak_allocated_bytes",
                  "gpu_peak_reserved_bytes", "rss_bytes", "peak_rss_bytes", "bytes_read", "bytes_written")
BLOCK = 16 * MiB


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    make_synthetic.add_shape_args(p)
    p.add_argument("--model", type=Path, default=None, help="prune this checkpoint folder instead of writing a synthetic one")
    p.add_argument("--work", type=Path, default=None, help="folder for the checkpoint, run and output (default: a temp folder; "
                   "put it on the disk you want to measure)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--method", default="olica", help="pruning method (default olica; magnitude if olica is not registered)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (JSON value)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compute-dtype", default=None, help="engine compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-gpu-memory", default=None, help="e.g. 24GiB (passed to PruneConfig)")
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--chunk-tokens", type=int, default=16384)
    p.add_argument("--calib", default="c4")
    p.add_argument("--extrapolate-layers", type=int, default=80)
    p.add_argument("--bw-mib", type=int, default=512, help="size of the bandwidth test file (default 512 MiB)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-fallback", action="store_true", help="fail (exit 2) when --method is not registered "
                   "instead of falling back to magnitude")
    return p.parse_args()


# ---- disk bandwidth --------------------------------------------------------------------
def _read_all(path: Path) -> int:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(view):
            n += k
    return n


def disk_bandwidth(folder: Path, size: int) -> dict:
    """Write + fsync, evicted read and page-cache read of a fresh ``size``-byte file (bytes/s)."""
    path = folder / ".bench_bandwidth.bin"
    block = os.urandom(BLOCK)  # incompressible
    try:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for _ in range(max(1, size // BLOCK)):
                f.write(block)
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
        total = path.stat().st_size
        evicted = False
        if hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                evicted = True
            finally:
                os.close(fd)
        t0 = time.perf_counter()
        _read_all(path)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _read_all(path)
        warm_s = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    cold, warm = total / cold_s, total / warm_s
    return {"bytes": total, "write_bps": total / write_s, "read_bps": cold, "read_warm_bps": warm,
            "evict_requested": evicted, "evict_suspect": cold > 0.7 * warm}


# ---- the run ---------------------------------------------------------------------------
class SurveyTimer:
    """Wraps ``engine.run_survey`` (a whole-model pass with no profile lines) to time it and
    count its bytes, so the extrapolation can scale it with the layer count."""

    def __init__(self):
        self.seconds, self.layers, self.bytes_read, self.bytes_written = 0.0, 0, 0, 0
        self.original = getattr(engine, "run_survey", None)

    def __enter__(self):
        if self.original is not None:
            def timed(method, adapter, cache, *args, **kw):
                r0, c0, w0 = adapter.reader.bytes_read, cache.bytes_read, cache.bytes_written
                t0 = time.perf_counter()
                try:
                    return self.original(method, adapter, cache, *args, **kw)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.layers += adapter.num_layers
                    self.bytes_read += adapter.reader.bytes_read - r0 + cache.bytes_read - c0
                    self.bytes_written += cache.bytes_written - w0
            engine.run_survey = timed
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            engine.run_survey = self.original


def run_prune(a: argparse.Namespace, source: Path, work: Path, method: str) -> tuple[dict, list[dict], SurveyTimer, float]:
    options = {}
    for pair in a.option or []:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    cfg = PruneConfig(source=source, out=work / "out", method=method, ratio=a.ratio, method_options=options,
                      calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, device=a.device, dtype=a.compute_dtype,
                      chunk_tokens=a.chunk_tokens, work_dir=work / "run", fresh=True, max_gpu_memory=a.max_gpu_memory,
                      progress=not a.no_progress)
    t0 = time.perf_counter()
    with SurveyTimer() as survey:
        report = engine.prune(cfg)
    total_s = time.perf_counter() - t0
    lines = (cfg.run_dir / "profile.jsonl").read_text().splitlines()
    return report, [json.loads(line) for line in lines], survey, total_s


def fmt_bytes(n, unit=GiB, spec=".2f") -> str:
    return "-" if n is None else format(n / unit, spec)


def main() -> None:
    a = parse_args()
    method = a.method if a.method in available() else "magnitude"
    if method != a.method and a.no_fallback:
        raise SystemExit(f"bench_layers: error: method {a.method!r} is not registered ({', '.join(available())}); "
                         "install the branch that adds it, or drop it from --method")
    if method != a.method:
        print(f"method {a.method!r} is not registered ({', '.join(available())}); using magnitude")
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_layers_", dir=a.work))
    try:
        if a.model is not None:
            source, shape_name = a.model, "external"
        else:
            cfg = make_synthetic.config_from_args(a)
            print(f"writing a {a.config}-shaped checkpoint ({a.layers} layers) in {work}")
            make_synthetic.write_checkpoint(work / "model", cfg, a.layers, make_synthetic.DTYPES[a.dtype], a.seed,
                                            a.tokenizer_vocab, log=lambda *_: None)
            source, shape_name = work / "model", a.config
        shard_sizes = sorted(p.stat().st_size for p in source.glob("*.safetensors"))
        bw = disk_bandwidth(work, max(a.bw_mib * MiB, BLOCK))
        report, prof, survey, total_s = run_prune(a, source, work, method)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    # ---- per-layer table ----------------------------------------------------------------
    L = len(prof)
    print(f"\n{shape_name} shapes, {report['layers']} layers, method {method} ratio {a.ratio} "
          f"(achieved {report['achieved_ratio']:.3f}), {a.nsamples}x{a.seqlen} calibration tokens, "
          f"{report['device']} {report['dtype'].removeprefix('torch.')}, max GPU memory {a.max_gpu_memory or '-'}")
    hdr = f"{'layer':>5} {'read s':>8} {'fwd s':>8} {'decide s':>8} {'write s':>8} {'wall s':>8} {'GPU alloc':>9} {'GPU resv':>9} {'RSS GiB':>8} {'MiB rd':>8} {'MiB wr':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in prof:
        print(f"{r['layer']:>5} {r.get('read_s', 0):8.3f} {r.get('forward_s', 0):8.3f} {r.get('decide_s', 0):8.3f} {r.get('write_s', 0):8.3f} "
              f"{r['wall_s']:8.3f} {fmt_bytes(r.get('gpu_peak_allocated_bytes')):>9} {fmt_bytes(r.get('gpu_peak_reserved_bytes')):>9} "
              f"{fmt_bytes(r['rss_bytes']):>8} {fmt_bytes(r['bytes_read'], MiB, '.1f'):>8} {fmt_bytes(r['bytes_written'], MiB, '.1f'):>8}")
    med = {k: statistics.median(r.get(k, 0.0) for r in prof) for k in ("read_s", "forward_s", "decide_s", "write_s", "wall_s")}
    print(f"{'med':>5} {med['read_s']:8.3f} {med['forward_s']:8.3f} {med['decide_s']:8.3f} {med['write_s']:8.3f} {med['wall_s']:8.3f}")

    # ---- disk and extrapolation -------------------------------------------------------------
    n = a.extrapolate_layers
    survey_per_layer = survey.seconds / survey.layers if survey.layers else 0.0
    fixed_s = max(0.0, total_s - sum(r["wall_s"] for r in prof) - survey.seconds)
    per_layer_s = med["wall_s"] + survey_per_layer
    extrapolated_s = per_layer_s * n + fixed_s
    rd = statistics.median(r["bytes_read"] for r in prof) + (survey.bytes_read / survey.layers if survey.layers else 0)
    wr = statistics.median(r["bytes_written"] for r in prof) + (survey.bytes_written / survey.layers if survey.layers else 0)
    floor_layer_s = rd / bw["read_bps"] + wr / bw["write_bps"]
    io_floor_s = floor_layer_s * n
    ratio = io_floor_s / extrapolated_s
    print(f"\ndisk ({bw['bytes'] / MiB:.0f} MiB fresh file in {a.work or tempfile.gettempdir()}): write+fsync {bw['write_bps'] / 1e9:.2f} GB/s, "
          f"read evicted {bw['read_bps'] / 1e9:.2f} GB/s, read page cache {bw['read_warm_bps'] / 1e9:.2f} GB/s"
          + ("  [!] evicted ~ page cache: eviction likely ignored, floor is optimistic" if bw["evict_suspect"] else ""))
    print(f"source shards: {len(shard_sizes)} files, largest {shard_sizes[-1] / MiB:.1f} MiB" if shard_sizes else "")
    print(f"run: {total_s:.2f} s total = {sum(r['wall_s'] for r in prof):.2f} s layer loop ({L} layers) + "
          f"{survey.seconds:.2f} s survey + {fixed_s:.2f} s fixed (calibration, boundary 0, finalize)")
    print(f"\n{'':28} {'per layer':>12} {f'x {n} layers':>14}")
    print(f"{'extrapolated wall time':28} {per_layer_s:11.3f}s {extrapolated_s:13.1f}s   (median layer {med['wall_s']:.3f} s"
          f" + survey {survey_per_layer:.3f} s; + {fixed_s:.1f} s fixed)")
    print(f"{'I/O floor':28} {floor_layer_s:11.3f}s {io_floor_s:13.1f}s   ({rd / MiB:.1f} MiB read, {wr / MiB:.1f} MiB written per layer)")
    print(f"{'floor / extrapolated':28} {ratio:12.3f}   (1.0 = as fast as the disk allows)")
    peak_rss = max(r["peak_rss_bytes"] for r in prof)
    gpu_alloc = max((r.get("gpu_peak_allocated_bytes", 0) for r in prof), default=0) or None
    gpu_resv = max((r.get("gpu_peak_reserved_bytes", 0) for r in prof), default=0) or None
    print(json.dumps({
        "bench": "layers", "config": shape_name, "layers": L, "method": method, "ratio": a.ratio, "device": report["device"],
        "dtype": report["dtype"], "nsamples": a.nsamples, "seqlen": a.seqlen, "max_gpu_memory": a.max_gpu_memory,
        "median_s": {k.removesuffix("_s"): round(v, 4) for k, v in med.items()},
        "survey_per_layer_s": round(survey_per_layer, 4), "fixed_s": round(fixed_s, 3), "total_s": round(total_s, 3),
        "extrapolate_layers": n, "extrapolated_s": round(extrapolated_s, 2),
        "bytes_read_per_layer": int(rd), "bytes_written_per_layer": int(wr),
        "disk_read_bps": round(bw["read_bps"]), "disk_read_page_cache_bps": round(bw["read_warm_bps"]),
        "disk_write_bps": round(bw["write_bps"]), "evict_suspect": bw["evict_suspect"],
        "io_floor_s": round(io_floor_s, 3), "io_floor_ratio": round(ratio, 4),
        "peak_rss_bytes": peak_rss, "gpu_peak_allocated_bytes": gpu_alloc, "gpu_peak_reserved_bytes": gpu_resv,
        "achieved_ratio": report["achieved_ratio"], "source": str(source), "shard_bytes": shard_sizes,
        "gpu_name": torch.cuda.get_device_name(report["device"]) if report["device"].startswith("cuda") else None,
        "per_layer": [{k: r[k] for k in PER_LAYER_KEYS if k in r} for r in prof],
    }, sort_keys=True))


if __name__ == "__main__":
    main()
