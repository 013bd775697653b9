"""``streamprune inspect WORK_DIR``: the state of a run, finished, running or crashed."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import StreamPruneError
from .journal import RunDir
from .profile import GiB
from .runlock import holder, run_lock_path

COLUMNS = ("read_s", "forward_s", "decide_s", "write_s", "wall_s")


def inspect_run(work_dir: str | Path, out=sys.stderr) -> dict:
    run = RunDir(work_dir)
    if not run.manifest_path.is_file():
        raise StreamPruneError(f"{work_dir} is not a streamprune run directory (no manifest.json)")
    manifest = run.manifest()
    records = run.records()
    layers = sorted(run.committed_layers(records))
    profile = run.profile()
    total = manifest.get("job", {}).get("num_layers")
    live = holder(run_lock_path(run.root))  # a probe: never blocks or disturbs a live run
    fp = manifest["fingerprint"]
    print(f"run       {run.root}", file=out)
    print(f"job       {manifest.get('job', {})}", file=out)
    print(f"method    {fp['method']}", file=out)
    print(f"calib     {fp['calibration']}", file=out)
    print(f"state     {'running (pid ' + str(live.get('pid')) + ' on ' + str(live.get('host')) + ', started ' + str(live.get('started')) + ')' if live is not None else 'not running'}", file=out)
    print(f"layers    {len(layers)} / {total} committed; survey {'done' if any(r.get('event') == 'survey' for r in records) else str(len(run.surveyed_layers(records))) + ' layers surveyed'}", file=out)
    if profile:
        print("layer " + " ".join(f"{c:>10}" for c in COLUMNS) + f" {'rss_GiB':>8} {'gpu_GiB':>8}", file=out)
        for rec in profile:
            cells = " ".join(f"{rec.get(c, 0.0):>10.3f}" for c in COLUMNS)
            gpu = rec.get("gpu_peak_allocated_bytes", 0) / GiB
            print(f"{rec['layer']:>5} {cells} {rec['rss_bytes'] / GiB:>8.3f} {gpu:>8.3f}", file=out)
    peaks = {
        "peak_rss_bytes": max((r.get("peak_rss_bytes", 0) for r in profile), default=0),
        "gpu_peak_allocated_bytes": max((r.get("gpu_peak_allocated_bytes", 0) for r in profile), default=0),
    }
    walls = sorted(r["wall_s"] for r in profile)
    return {
        "work_dir": str(run.root),
        "layers_done": len(layers),
        "num_layers": total,
        "complete": total is not None and len(layers) == total,
        "running": live,
        "fingerprint_sha256": manifest["fingerprint_sha256"],
        "median_layer_s": walls[len(walls) // 2] if walls else None,
        **peaks,
    }
