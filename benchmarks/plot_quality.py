"""Quality against size: WikiText-2 PPL (128-token windows) vs achieved ratio, one line per method.

    python benchmarks/plot_quality.py [--eval wikitext2:128] [--max-windows K] [--out benchmarks/results/quality_vs_ratio.png]

Reads ``benchmarks/results/quality.jsonl`` (written by ``benchmarks/quality.py``) and nothing
else: a row is drawn when its options leave the method at its default setting (``METHOD-PCT``,
or options equal to the defaults); the newest record of a ratio wins; the dense model is the
point at ratio 0 of every line. Missing points are simply absent (run
``quality.py --rows olica-10,olica-30,...`` to add them). Log-scale PPL axis. The legend names
each line's configuration: the default's (cascade's reconstruction setting read from its
config), and ``--also LABEL=ROW,...`` draws another setting's rows dashed under LABEL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import NSAMPLES, parse_row, split_calibration  # noqa: E402  (sibling script: the row names' grammar)

RESULTS = Path(__file__).parent / "results" / "quality.jsonl"
LABELS = {"olica": "Olica", "lorap": "LoRAP", "slimllm": "SlimLLM", "cascade": "cascade (ours)", "magnitude": "magnitude"}


def default_label(method: str) -> str:
    """The legend of a method's default line: its name and, for cascade, the reconstruction
    setting it stands for (read from the config, so the legend follows the defaults)."""
    name = LABELS.get(method, method)
    if method != "cascade":
        return name
    from streamprune.methods import build_method

    c = build_method(method, 0.2, {}).config
    steps = {"auto": "bf16 steps where native", "bfloat16": "bf16 steps", "float32": "float32 steps"}.get(c.recon_precision, c.recon_precision)
    return f"{name}: {c.recon_epochs} × {c.recon_batch_tokens}-token epochs, {c.recon_schedule} rate, {steps}"


def is_default(method: str, options: dict) -> bool:
    """Whether ``options`` leave ``method`` at its default configuration (e.g. a row named
    after a default's value, like ``cascade-20-recon_target=dense_layer``)."""
    from streamprune.methods import build_method

    try:
        options, nsamples = split_calibration(method, options)
        if nsamples != NSAMPLES.get(method, 128):
            return False  # another calibration size is another setting
        return build_method(method, 0.2, options).config == build_method(method, 0.2, {}).config
    except (TypeError, ValueError):
        return False


def points(records: list[dict], ev: str, max_windows: int | None) -> dict[str, list[tuple[float, float]]]:
    """method -> sorted (achieved ratio, ppl) of its default setting (the newest record of
    each ratio); the dense model is the point at ratio 0 of every line."""
    dense = next((r["ppl"] for r in records if r["row"] == "dense" and r["eval"] == ev and r.get("max_windows") == max_windows), None)
    newest: dict[tuple[str, int], tuple[float, float]] = {}
    for r in records:
        if r["row"] == "dense" or r["eval"] != ev or r.get("max_windows") != max_windows:
            continue
        method, ratio, options = parse_row(r["row"])
        if options and not is_default(method, options):
            continue
        newest[(method, round(100 * ratio))] = (r["achieved_ratio"], r["ppl"])  # later records win
    out: dict[str, list[tuple[float, float]]] = {}
    for (method, _), pt in newest.items():
        out.setdefault(method, []).append(pt)
    for pts in out.values():
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
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=ROW,ROW",
                    help="an extra dashed line through the named rows (e.g. an earlier default)")
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
        ax.plot([100 * x for x in xs], ys, marker="o", label=default_label(method),
                lw=2.2 if method == "cascade" else 1.4, zorder=3 if method == "cascade" else 2)
    dense = next((p for pts in series.values() for p in pts if p[0] == 0.0), None)
    for spec in args.also:
        label, rows = spec.split("=", 1)
        pts = [(r["achieved_ratio"], r["ppl"]) for r in records
               if r["row"] in rows.split(",") and r["eval"] == args.eval and r.get("max_windows") == args.max_windows]
        pts = sorted(dict(pts).items()) if pts else []
        if pts:
            xs, ys = zip(*([dense] if dense else []) + pts)
            ax.plot([100 * x for x in xs], ys, marker="s", ms=4, ls="--", lw=1.0, alpha=0.75, label=label, zorder=1)
    dataset, seqlen = args.eval.split(":")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (% of total, achieved)")
    name = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}.get(dataset, dataset)
    ax.set_ylabel(f"{name} PPL @{seqlen}" + (f" (first {args.max_windows} windows)" if args.max_windows else " (whole test set)"))
    ax.set_title("SmolLM2-135M-Instruct: quality vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(json.dumps({"out": str(args.out), "series": {m: len(p) for m, p in series.items()}}))


if __name__ == "__main__":
    main()
