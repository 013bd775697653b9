"""Quality against size: WikiText-2 PPL (128-token windows) vs achieved ratio, one line per method.

    python benchmarks/plot_quality.py [--eval wikitext2:128] [--max-windows K] [--out benchmarks/results/quality_vs_ratio.png]

Reads ``benchmarks/results/quality.jsonl`` (written by ``benchmarks/quality.py``) and nothing
else: rows ``METHOD-PCT`` with no extra options are each method's default setting; the dense
model is the point at ratio 0 of every line. Missing points are simply absent (run
``quality.py --rows olica-10,olica-30,...`` to add them). Log-scale PPL axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quality.jsonl"
LABELS = {"olica": "Olica", "lorap": "LoRAP", "slimllm": "SlimLLM", "cascade": "cascade (ours)", "magnitude": "magnitude"}


def points(records: list[dict], ev: str, max_windows: int | None) -> dict[str, list[tuple[float, float]]]:
    """method -> sorted (achieved ratio, ppl), default-option rows only."""
    dense = next((r["ppl"] for r in records if r["row"] == "dense" and r["eval"] == ev and r.get("max_windows") == max_windows), None)
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        parts = r["row"].split("-")
        if r["eval"] != ev or r.get("max_windows") != max_windows or len(parts) != 2:
            continue
        out.setdefault(parts[0], []).append((r["achieved_ratio"], r["ppl"]))
    for method, pts in out.items():
        if dense is not None:
            pts.append((0.0, dense))
        pts.sort()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", default="wikitext2:128")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS.parent / "quality_vs_ratio.png")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    series = points(records, args.eval, args.max_windows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in sorted(series, key=lambda m: (m != "cascade", m)):
        if method == "magnitude":
            continue  # ~1e6 at 20 %: off the useful scale
        xs, ys = zip(*series[method])
        ax.plot([100 * x for x in xs], ys, marker="o", label=LABELS.get(method, method), lw=2.2 if method == "cascade" else 1.4)
    dataset, seqlen = args.eval.split(":")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (% of total, achieved)")
    ax.set_ylabel(f"{dataset} PPL @{seqlen}" + (f" (first {args.max_windows} windows)" if args.max_windows else " (whole test set)"))
    ax.set_title("SmolLM2-135M-Instruct: quality vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(json.dumps({"out": str(args.out), "series": {m: len(p) for m, p in series.items()}}))


if __name__ == "__main__":
    main()
