"""Quality table on the demo model: prune with each method, evaluate streamed perplexity.

    python benchmarks/quality.py --rows dense,magnitude-20,olica-20,olica-20-nolc,olica-50 \
        --evals wikitext2:128,wikitext2:2048,ptb:128 [--eval-dtype bfloat16] [--max-windows K]

Each finished (row, eval) is appended to ``benchmarks/results/quality.jsonl`` and skipped
on a rerun (the script resumes like the engine does). Prints a markdown table, then one
JSON line. Calibration: the bundled C4 sample, method defaults (Olica 256 x 128, seed 0).
Rows: ``dense`` or ``METHOD-PCT[-nolc]`` (``-nolc``: Olica with ``mlp_num=0``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from streamprune import EvalConfig, PruneConfig, perplexity, prune
from streamprune.demo_model import default_cache_dir, ensure_demo_model

RESULTS = Path(__file__).parent / "results" / "quality.jsonl"
NSAMPLES = {"olica": 256, "lorap": 256, "slimllm": 32, "magnitude": 32}  # papers' defaults (SlimLLM 32)


def parse_row(row: str) -> tuple[str | None, float, dict]:
    if row == "dense":
        return None, 0.0, {}
    parts = row.split("-")
    options = {"mlp_num": 0} if parts[2:] == ["nolc"] else {}
    return parts[0], int(parts[1]) / 100, options


def load_done() -> dict:
    done = {}
    if RESULTS.is_file():
        for line in RESULTS.read_text().splitlines():
            r = json.loads(line)
            done[(r["row"], r["eval"], r.get("max_windows"))] = r
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="dense,magnitude-20,olica-20,olica-20-nolc,olica-50")
    ap.add_argument("--evals", default="wikitext2:128,wikitext2:2048")
    ap.add_argument("--eval-dtype", default="bfloat16", help="evaluation compute dtype (bf16 is ~2x faster on CPU)")
    ap.add_argument("--max-windows", type=int, default=None, help="subset for quick looks (default: whole test set)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = ensure_demo_model()
    done = load_done()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table = {}
    for row in args.rows.split(","):
        method, ratio, options = parse_row(row)
        folder, report = model, None
        if method is not None:
            folder = default_cache_dir() / "quality" / row
            report = prune(PruneConfig(source=model, out=folder, method=method, ratio=ratio, method_options=options,
                                       calib="c4", nsamples=NSAMPLES.get(method, 128), seqlen=128, device=args.device))
        for ev in args.evals.split(","):
            dataset, seqlen = ev.split(":")
            key = (row, ev, args.max_windows)
            if key not in done:
                res = perplexity(EvalConfig(model=folder, dataset=dataset, seqlen=int(seqlen), max_windows=args.max_windows,
                                            device=args.device, dtype=args.eval_dtype))
                rec = {"row": row, "eval": ev, "max_windows": args.max_windows, "eval_dtype": args.eval_dtype, **res}
                if report is not None:
                    run = report.get("run", report)  # a finished output returns its stored report
                    rec.update(achieved_ratio=report["achieved_ratio"], prune_wall_s=run.get("wall_s"),
                               prune_peak_rss_bytes=run.get("peak_rss_bytes"), params=report["params_pruned"])
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                done[key] = rec
            table.setdefault(row, {})[ev] = done[key]
    evals = args.evals.split(",")
    print("| model | achieved ratio | " + " | ".join(f"{e.split(':')[0]} PPL @{e.split(':')[1]}" for e in evals) + " |")
    print("|---|---|" + "---|" * len(evals))
    for row, cells in table.items():
        ratio = next(iter(cells.values())).get("achieved_ratio", 0.0)
        print(f"| {row} | {ratio:.4f} | " + " | ".join(f"{cells[e]['ppl']:.2f}" for e in evals) + " |")
    print(json.dumps({row: {e: c["ppl"] for e, c in cells.items()} for row, cells in table.items()}))


if __name__ == "__main__":
    main()
