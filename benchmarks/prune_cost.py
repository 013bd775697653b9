"""Prune wall time and peak RSS per quality row, each in a fresh process, plus a determinism check.

    python benchmarks/prune_cost.py --rows olica-20,lorap-20,slimllm-20 [--source DIR] [--reference-dir DIR]

Each row (``quality.py`` syntax: ``METHOD-PCT[-nolc]``) is pruned by ``python -m streamprune
prune`` in its own process, so the report's peak RSS (the child's ``VmHWM``) is the prune's
alone: inside ``quality.py`` a prune that follows an evaluation in the same process inherits
the evaluation's high-water mark. Every output file but the report is then compared by
sha256 with the folder of the same name under ``--reference-dir`` (default: the outputs the
quality table was evaluated on), which shows that the table's models are what the current
code produces, byte for byte. Records go to ``benchmarks/results/prune_cost.jsonl``; prints
a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import parse_row, split_calibration  # noqa: E402

from streamprune.storage.checkpoint import file_sha256  # noqa: E402
from streamprune.inputs.demo_model import default_cache_dir, ensure_demo_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prune_cost.jsonl"
REPORT = "streamprune_report.json"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != REPORT}


def compare(out: Path, reference: Path) -> str:
    """"identical", "no reference" or "differs: FILE, ..." (every file but the report)."""
    if not (reference / REPORT).is_file():
        return "no reference"
    mine, theirs = digests(out), digests(reference)
    differ = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
    if not differ:
        return "identical"
    return "differs: " + ", ".join(differ[:2]) + (f" + {len(differ) - 2} more" if len(differ) > 2 else "")


def prune_row(row: str, source: Path, out: Path, nsamples: int | None, seqlen: int) -> dict:
    method, ratio, options = parse_row(row)
    options, row_nsamples = split_calibration(method, options)
    cmd = [sys.executable, "-m", "streamprune", "prune", str(source), "--out", str(out), "--method", method,
           "--ratio", str(ratio), "--calib", "c4", "--nsamples", str(nsamples or row_nsamples),
           "--seqlen", str(seqlen), "--no-progress", "--fresh"]
    for key, value in options.items():
        cmd += ["--option", f"{key}={value}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{row}: prune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / REPORT).read_text())
    return {"row": row, "process_wall_s": round(wall, 2), "prune_wall_s": report["run"]["wall_s"],
            "peak_rss_bytes": report["run"]["peak_rss_bytes"], "achieved_ratio": report["achieved_ratio"],
            "params": report["params_pruned"], "nsamples": report["calibration"]["nsamples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="olica-20,lorap-20,slimllm-20")
    ap.add_argument("--source", type=Path, default=None, help="model folder (default: the demo model)")
    ap.add_argument("--reference-dir", type=Path, default=None, help="default: the quality table's outputs")
    ap.add_argument("--nsamples", type=int, default=None, help="default: each method's (quality.py's)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs under this folder")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    source = args.source or ensure_demo_model()
    reference = args.reference_dir or default_cache_dir() / "quality"
    records = []
    with tempfile.TemporaryDirectory(prefix="prune-cost-") as tmp:
        base = args.keep or Path(tmp)
        for row in args.rows.split(","):
            out = base / row
            rec = prune_row(row, source, out, args.nsamples, args.seqlen)
            rec["vs_reference"] = compare(out, reference / row)
            records.append(rec)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
    print("| row | calibration | achieved ratio | prune wall s | process wall s | peak RSS GiB | output vs quality table's |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['row']} | {r['nsamples']} × {args.seqlen} | {r['achieved_ratio']:.4f} | {r['prune_wall_s']:.1f} | "
              f"{r['process_wall_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['vs_reference']} |")
    print(json.dumps(records, sort_keys=True))


if __name__ == "__main__":
    main()
