"""Quality table on the demo model: prune with each method, evaluate streamed perplexity.

    python benchmarks/quality.py --rows dense,magnitude-20,olica-20,olica-20-nolc,olica-50 \
        --evals wikitext2:128,wikitext2:2048,ptb:128 [--eval-dtype float32] [--max-windows K]

Each finished (row, eval) is appended to ``benchmarks/results/quality.jsonl`` and skipped
on a rerun (the script resumes like the engine does). Prints a markdown table, then one
JSON line. Calibration: the bundled C4 sample, method defaults (Olica 256 x 128, seed 0).
Rows: ``dense`` or ``METHOD-PCT[-nolc][-KEY=VALUE ...]`` (``-nolc``: Olica with ``mlp_num=0``;
``KEY=VALUE``: a method option as ``--option`` takes it, e.g. ``cascade-20-recon=false``, or
``nsamples=N``: N calibration sequences instead of the method's default, e.g.
``cascade-20-nsamples=512``).

    python benchmarks/quality.py --rows olica-10,olica-30 --prune-only   # prune now, evaluate in a later run

    python benchmarks/quality.py --table [--rows ...] [--evals ...]

renders the table of ``benchmarks/RESULTS.md`` from the records alone (no pruning, no
evaluation; a missing cell says "not run").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from streamprune import EvalConfig, PruneConfig, perplexity, prune
from streamprune.config import resolve_dtype
from streamprune.inputs.demo_model import default_cache_dir, ensure_demo_model
from streamprune.errors import StreamPruneError

RESULTS = Path(__file__).parent / "results" / "quality.jsonl"
NSAMPLES = {"olica": 256, "lorap": 256, "slimllm": 32, "magnitude": 32, "cascade": 256}  # papers' defaults (SlimLLM 32)


def parse_row(row: str) -> tuple[str | None, float, dict]:
    if row == "dense":
        return None, 0.0, {}
    method, pct, *rest = row.split("-")
    options = {}
    for part in rest:
        if part == "nolc":
            options["mlp_num"] = 0
        else:
            key, value = part.split("=", 1)
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
    return method, int(pct) / 100, options


def split_calibration(method: str, options: dict) -> tuple[dict, int]:
    """(the method's options, calibration sequences) of a parsed row: ``nsamples`` is the
    calibration's, not the method's (default: the paper's, :data:`NSAMPLES`)."""
    options = dict(options)
    nsamples = options.pop("nsamples", NSAMPLES.get(method, 128))
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"row option nsamples must be an int >= 1, got {nsamples!r}")
    return options, nsamples


def load_done() -> dict:
    done = {}
    if RESULTS.is_file():
        for line in RESULTS.read_text().splitlines():
            r = json.loads(line)
            done[(r["row"], r["eval"], r.get("max_windows"))] = r
    return done


def row_label(row: str) -> str:
    if row == "dense":
        return "dense"
    method, pct, *rest = row.split("-")
    name = {"olica": "Olica", "lorap": "LoRAP", "slimllm": "SlimLLM", "cascade": "**cascade (ours)**"}.get(method, method)
    label = f"{name} {pct} %" + (", no LC (`mlp_num=0`)" if "nolc" in rest else "")
    label += "".join(f", `{p}`" for p in rest if p != "nolc")
    return label + (f" ({NSAMPLES[method]} × 128 calibration)" if NSAMPLES.get(method, 256) != 256 and method != "magnitude" else "")


def render_table(done: dict, rows: list[str], evals: list[str], max_windows: int | None = None) -> str:
    """The RESULTS.md quality table: one line per row, one PPL column per eval."""
    # Dense records carry no parameter count; any pruned one gives it back exactly:
    # achieved_ratio = 1 - params / dense.
    dense_params = next((round(r["params"] / (1 - r["achieved_ratio"])) for r in done.values() if "params" in r), None)
    head = ["model", "params", "achieved ratio"]
    for ev in evals:
        dataset, seqlen = ev.split(":")
        windows = next((r["windows"] for (row, e, mw), r in done.items() if e == ev and mw == max_windows), None)
        name = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}.get(dataset, dataset)
        head.append(f"{name} PPL @{seqlen}" + (f" ({windows} windows)" if windows else ""))
    head.append("prune wall")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = {ev: done.get((row, ev, max_windows)) for ev in evals}
        any_rec = next((c for c in cells.values() if c is not None), None)
        if row == "dense":
            params, ratio, wall = f"{dense_params:,}" if dense_params else "–", "0", "–"
        elif any_rec is None:
            params, ratio, wall = "not run", "–", "–"
        else:
            params, ratio = f"{any_rec['params']:,}", f"{any_rec['achieved_ratio']:.4f}"
            wall = f"{any_rec['prune_wall_s']:.0f} s" if any_rec.get("prune_wall_s") is not None else "–"
        ppl = [f"{c['ppl']:,.2f}" if c is not None and c["ppl"] < 1e4 else f"{c['ppl']:,.0f}" if c is not None else "not run"
               for c in cells.values()]
        lines.append("| " + " | ".join([row_label(row), params, ratio, *ppl, wall]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rows; a prune stopped by SIGTERM/SIGINT (after its layer in flight is committed)
    or refused by the engine ends with its one-line message and exit code, no traceback."""
    try:
        run(argv)
    except StreamPruneError as e:
        print(f"quality.py: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


def run(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="dense,magnitude-20,olica-20,olica-20-nolc,olica-50")
    ap.add_argument("--evals", default="wikitext2:128,wikitext2:2048")
    ap.add_argument("--eval-dtype", default=None,
                    help="evaluation compute dtype (default: the engine's, float32 on CPU, bfloat16 on CUDA). bfloat16 "
                         "is ~2x faster on a CPU with AVX512-BF16/AMX, but ~40x slower on an AVX2-only one")
    ap.add_argument("--max-windows", type=int, default=None, help="subset for quick looks (default: whole test set)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--table", action="store_true", help="only print the RESULTS.md table from the records")
    ap.add_argument("--prune-only", action="store_true", help="prune the rows (resumable) and evaluate nothing: the evaluations come later")
    args = ap.parse_args(argv)
    done = load_done()
    if args.table:
        print(render_table(done, args.rows.split(","), args.evals.split(","), args.max_windows))
        return
    model = ensure_demo_model()
    eval_dtype = str(resolve_dtype(args.eval_dtype, torch.device(args.device))).removeprefix("torch.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table = {}
    for row in args.rows.split(","):
        method, ratio, options = parse_row(row)
        folder, report = model, None
        if method is not None:
            folder = default_cache_dir() / "quality" / row
            options, nsamples = split_calibration(method, options)
            report = prune(PruneConfig(source=model, out=folder, method=method, ratio=ratio, method_options=options,
                                       calib="c4", nsamples=nsamples, seqlen=128, device=args.device))
            if args.prune_only:
                print(json.dumps({"row": row, "achieved_ratio": report["achieved_ratio"]}), flush=True)
                continue
        elif args.prune_only:
            continue
        for ev in args.evals.split(","):
            dataset, seqlen = ev.split(":")
            key = (row, ev, args.max_windows)
            if key not in done:
                res = perplexity(EvalConfig(model=folder, dataset=dataset, seqlen=int(seqlen), max_windows=args.max_windows,
                                            device=args.device, dtype=args.eval_dtype))
                rec = {"row": row, "eval": ev, "max_windows": args.max_windows, "eval_dtype": eval_dtype, **res}
                if report is not None:
                    run = report.get("run", report)  # a finished output returns its stored report
                    rec.update(achieved_ratio=report["achieved_ratio"], prune_wall_s=run.get("wall_s"),
                               prune_peak_rss_bytes=run.get("peak_rss_bytes"), params=report["params_pruned"])
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                done[key] = rec
            table.setdefault(row, {})[ev] = done[key]
    if args.prune_only:
        return
    evals = args.evals.split(",")
    print("| model | achieved ratio | " + " | ".join(f"{e.split(':')[0]} PPL @{e.split(':')[1]}" for e in evals) + " |")
    print("|---|---|" + "---|" * len(evals))
    for row, cells in table.items():
        ratio = next(iter(cells.values())).get("achieved_ratio", 0.0)
        print(f"| {row} | {ratio:.4f} | " + " | ".join(f"{cells[e]['ppl']:.2f}" for e in evals) + " |")
    print(json.dumps({row: {e: c["ppl"] for e, c in cells.items()} for row, cells in table.items()}))


if __name__ == "__main__":
    sys.exit(main())
