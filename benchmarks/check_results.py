"""Check that every figure of RESULTS.md's summary is backed by a record of today's configuration.

    python benchmarks/check_results.py [--results-md benchmarks/RESULTS.md] [--results-dir benchmarks/results]

Reads the tables of the ``## Summary`` section of ``benchmarks/RESULTS.md`` and, for every
cell that holds a figure, looks for a record in ``benchmarks/results/*.jsonl`` that gives the
same value, rounded as the cell prints it:

- a perplexity cell (column ``WikiText-2 @128``, ``WikiText-2 @2048``, ``PTB @128``, or a
  ``N %`` column of a table whose first header cell names the evaluation) needs a
  ``quality.jsonl`` record of the whole test set (``max_windows`` null) whose ``row`` is the
  name ``quality.py`` gives the method's **default** configuration: ``dense`` or
  ``METHOD-PCT`` with no options. A record of any other setting carries its options in its
  name (``cascade-20-recon_schedule=constant``), so it can never back a summary cell;
- a ``prune wall`` / ``peak RSS`` pair needs one record of that default row giving both:
  ``prune_cost.jsonl`` (``prune_wall_s``, ``peak_rss_bytes``; one fresh process per prune)
  or the prune of a ``quality.jsonl`` record (``prune_wall_s``, ``prune_peak_rss_bytes``).

A cell is a number with optional thousands separators, an optional unit (``s``, ``GiB``) and
optional ``**`` emphasis; ``–`` means not measured and is skipped. Prints one line per
problem and exits 1 if there is any, else prints how many figures were checked and exits 0.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {"dense": "dense", "magnitude": "magnitude", "olica": "olica", "lorap": "lorap", "slimllm": "slimllm",
           "cascade": "cascade", "cascade (ours)": "cascade"}
EVALS = {"wikitext-2 @128": "wikitext2:128", "wikitext-2 @2048": "wikitext2:2048", "ptb @128": "ptb:128"}
NOT_MEASURED = {"–", "-", ""}
CELL = re.compile(r"^(?P<num>\d{1,3}(?:,\d{3})*(?:\.\d+)?|\d+(?:\.\d+)?)\s*(?P<unit>s|GiB)?$")


@dataclass
class Claim:
    """One figure of the summary: what it says and where (``table``, ``line`` for messages)."""

    method: str
    pct: int
    kind: str  # an eval ("wikitext2:128") or "cost"
    text: str  # the cell as printed (for ppl) or "WALL s / RSS GiB" (for cost)
    line: int

    @property
    def row(self) -> str:
        """The record name of the method's default configuration (quality.py's grammar)."""
        return "dense" if self.method == "dense" else f"{self.method}-{self.pct}"


def summary_section(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the ``## Summary`` section (up to the next ``## `` heading)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().lower().startswith("## summary")), None)
    if start is None:
        raise ValueError("RESULTS.md has no '## Summary' section")
    out = []
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("## "):
            break
        out.append((i + 1, lines[i]))
    return out


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "").strip() for c in line.strip().strip("|").split("|")]


def tables(section: list[tuple[int, str]]) -> list[list[tuple[int, list[str]]]]:
    """Markdown tables of the section: each a list of (line number, cells), header first, the
    ``|---|`` separator dropped."""
    out, cur = [], []
    for no, line in section:
        if line.lstrip().startswith("|"):
            cells = _cells(line)
            if not all(set(c) <= set("-: ") for c in cells):
                cur.append((no, cells))
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _pct(cell: str) -> int | None:
    m = re.fullmatch(r"(\d+)\s*%", cell)
    return int(m.group(1)) if m else None


def parse_summary(text: str) -> tuple[list[Claim], list[str]]:
    """The summary's claims, and the problems found while reading it (unknown method, column
    or cell format)."""
    claims, problems = [], []
    for table in tables(summary_section(text)):
        (_, head), body = table[0], table[1:]
        table_eval = EVALS.get(head[0].lower())
        cols = [h.lower() for h in head]
        for no, cells in body:
            if len(cells) != len(head):
                problems.append(f"line {no}: {len(cells)} cells under a {len(head)}-column header")
                continue
            method = METHODS.get(cells[0].lower())
            if method is None:
                problems.append(f"line {no}: unknown method {cells[0]!r}")
                continue
            pct = _pct(cells[cols.index("removed")]) if "removed" in cols else None
            if method == "dense":
                pct = 0
            wall = rss = None
            for col, head_cell, cell in list(zip(cols, head, cells))[1:]:
                if col == "removed" or cell in NOT_MEASURED:
                    continue
                m = CELL.match(cell)
                if m is None:
                    problems.append(f"line {no}: cell {cell!r} under {head_cell!r} is not a figure")
                    continue
                if col == "prune wall":
                    wall = cell
                elif col == "peak rss":
                    rss = cell
                elif col in EVALS:
                    claims.append(Claim(method, pct, EVALS[col], m.group("num"), no))
                elif table_eval and _pct(head_cell) is not None:
                    claims.append(Claim(method, _pct(head_cell), table_eval, m.group("num"), no))
                else:
                    problems.append(f"line {no}: unknown column {head_cell!r}")
            if (wall is None) != (rss is None):
                problems.append(f"line {no}: a prune wall needs its peak RSS beside it (one record gives both)")
            elif wall is not None:
                claims.append(Claim(method, pct, "cost", f"{wall} / {rss}", no))
    return claims, problems


def _decimals(num: str) -> int:
    return len(num.split(".")[1]) if "." in num else 0


def _fmt(value: float, like: str) -> str:
    return f"{value:,.{_decimals(like)}f}" if "," in like else f"{value:.{_decimals(like)}f}"


def load_records(results_dir: Path) -> dict[str, list[dict]]:
    """file stem -> its records (``quality``, ``prune_cost``, ...)."""
    out = {}
    for path in sorted(results_dir.glob("*.jsonl")):
        out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def backing(claim: Claim, records: dict[str, list[dict]]) -> dict | None:
    """The first record that backs ``claim``, or None."""
    if claim.kind != "cost":
        for r in records.get("quality", []):
            if (r.get("row") == claim.row and r.get("eval") == claim.kind and r.get("max_windows") is None
                    and _fmt(r["ppl"], claim.text) == claim.text):
                return r
        return None
    wall, rss = (x.split()[0] for x in claim.text.split(" / "))
    pairs = [(r.get("prune_wall_s"), r.get("peak_rss_bytes")) for r in records.get("prune_cost", []) if r.get("row") == claim.row]
    pairs += [(r.get("prune_wall_s"), r.get("prune_peak_rss_bytes")) for r in records.get("quality", []) if r.get("row") == claim.row]
    for w, b in pairs:
        if w is not None and b is not None and _fmt(w, wall) == wall and _fmt(b / 2**30, rss) == rss:
            return {"prune_wall_s": w, "peak_rss_bytes": b}
    return None


def check(text: str, records: dict[str, list[dict]]) -> tuple[int, list[str]]:
    """(figures checked, problems)."""
    claims, problems = parse_summary(text)
    for c in claims:
        if backing(c, records) is None:
            what = "prune wall / peak RSS" if c.kind == "cost" else c.kind
            problems.append(f"line {c.line}: {c.row} {what} = {c.text}: no record of that row (today's default "
                            f"configuration) gives this value")
    figures = sum(2 if c.kind == "cost" else 1 for c in claims)
    if not claims:
        problems.append("the summary holds no figures")
    return figures, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    figures, problems = check(args.results_md.read_text(), load_records(args.results_dir))
    for p in problems:
        print(f"{args.results_md.name}: {p}")
    if problems:
        return 1
    print(f"{args.results_md.name}: all {figures} figures of the summary are backed by records of today's defaults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
