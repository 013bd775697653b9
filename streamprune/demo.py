"""The main job on the embedded default: SmolLM2-135M-Instruct, bundled text.

Converts (once) the demo model, prunes it at ``ratio`` with the best available method,
evaluates dense and pruned WikiText-2 perplexity (128-token windows; a fixed subset of
the first ``DEMO_WINDOWS`` windows unless ``full``), and prints a small table.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import PruneConfig
from .demo_model import default_cache_dir, ensure_demo_model
from .engine import prune
from .errors import OutputError
from .evaluate import EvalConfig, perplexity

DEMO_WINDOWS = 64
DEMO_NSAMPLES = 128


def best_method() -> str:
    return "olica" if importlib.util.find_spec("streamprune.methods.olica") else "magnitude"


def run_demo(method: str | None = None, ratio: float = 0.2, full: bool = False, out: Path | None = None, nsamples: int | None = None) -> dict:
    t0 = time.perf_counter()
    method = method or best_method()
    model = ensure_demo_model()
    own_out = out is None  # the demo's own cache folder may be replaced; a user's --out never is
    out = out or default_cache_dir() / "demo-out" / f"smollm2-{method}-{int(round(ratio * 100))}"
    windows = None if full else DEMO_WINDOWS
    dense = perplexity(EvalConfig(model=model, dataset="wikitext2", seqlen=128, max_windows=windows))
    cfg = PruneConfig(source=model, out=out, method=method, ratio=ratio, calib="c4", nsamples=nsamples or DEMO_NSAMPLES, seqlen=128)
    try:
        report = prune(cfg)
    except OutputError:
        if not own_out:
            raise
        shutil.rmtree(out)  # a demo output of an older version or other settings
        report = prune(replace(cfg, fresh=True))
    pruned = perplexity(EvalConfig(model=out, dataset="wikitext2", seqlen=128, max_windows=windows))
    run = report.get("run", report)
    rows = [
        ("model", "SmolLM2-135M-Instruct", f"{method} {ratio:.0%}"),
        ("params", f"{report['params_dense']:,}", f"{report['params_pruned']:,}"),
        ("achieved ratio", "0", f"{report['achieved_ratio']:.4f}"),
        (f"WikiText-2 PPL ({dense['windows']}x128)", f"{dense['ppl']:.3f}", f"{pruned['ppl']:.3f}"),
        ("prune wall time", "", f"{run.get('wall_s', 0):.1f} s"),
        ("prune peak RSS", "", f"{run.get('peak_rss_bytes', 0) / 2**20:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(file=sys.stderr)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>24}  {b:>24}", file=sys.stderr)
    return {
        "method": method,
        "ratio": ratio,
        "achieved_ratio": report["achieved_ratio"],
        "params_dense": report["params_dense"],
        "params_pruned": report["params_pruned"],
        "ppl_dense": dense["ppl"],
        "ppl_pruned": pruned["ppl"],
        "windows": dense["windows"],
        "prune_wall_s": run.get("wall_s"),
        "prune_peak_rss_bytes": run.get("peak_rss_bytes"),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
