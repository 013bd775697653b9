"""Greedy generation speed: dense transformers vs a pruned output with and without KV cache.

    python benchmarks/bench_generate.py --pruned /tmp/olica20            # the demo model, Olica 20 %
    python benchmarks/bench_generate.py --pruned OUT --dense SRC --batch 1 8 --repeats 3

``--dense`` defaults to the demo model (SmolLM2-135M-Instruct, converted once into the user
cache); ``--pruned`` is a streamprune output of it (``streamprune prune <demo> --method
olica --ratio 0.2 --out /tmp/olica20``). Each row of a batch is a different
``--prompt-tokens`` window of the bundled WikiText-2 text; every run generates exactly
``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``, greedy) and tokens/s =
batch x new tokens / wall seconds of ``generate`` (prefill included). Variants:

- ``dense``: ``LlamaForCausalLM`` (sdpa) with its default ``DynamicCache``;
- ``pruned+cache``: the pruned class (``load_pruned``) with its ``DynamicCache``;
- ``pruned-nocache``: the same with ``use_cache=False`` (each step re-runs the prefix).

The variants run in turn (dense, cached, uncached, dense, ...) ``--repeats`` times and the
median is reported, so a drift of a shared machine's speed hits them alike. Without the
cache a run costs ~(prompt + new/2) x new token-forwards; ``--nocache-new-tokens`` (default:
``--new-tokens``) may shorten only that variant, and then its row says so and its tokens/s
is NOT comparable. The greedy tokens of the cached and uncached pruned runs are compared
(same prompt, same model): ``same_tokens``.

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pruned", type=Path, required=True, help="a streamprune output folder")
    p.add_argument("--dense", type=Path, default=None, help="the dense source (default: the demo model)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--nocache-new-tokens", type=int, default=None, help="new tokens for the uncached variant (default: --new-tokens)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nocache-repeats", type=int, default=None, help="repeats of the uncached variant (default: --repeats)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--variants", nargs="+", default=["dense", "pruned+cache", "pruned-nocache"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args()


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """``batch`` different ``length``-token windows of the bundled WikiText-2 text."""
    from streamprune.inputs.textdata import BUNDLED

    ids = tokenizer(BUNDLED["wikitext2"].read_text()[:200_000], add_special_tokens=False)["input_ids"]
    assert len(ids) >= batch * length, "not enough bundled text for this batch"
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(batch)])


def timed_generate(model, ids: torch.Tensor, new_tokens: int, use_cache: bool, pad_id: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=pad_id,
        )
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt, out[:, ids.shape[1] :]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamprune import load_pruned

    if args.dense is None:
        from streamprune.inputs.demo_model import ensure_demo_model

        args.dense = ensure_demo_model(progress=False)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.dense)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    models = {}
    if "dense" in args.variants:
        models["dense"] = AutoModelForCausalLM.from_pretrained(args.dense, dtype=dtype, attn_implementation="sdpa").eval()
    if any(v.startswith("pruned") for v in args.variants):
        models["pruned"] = load_pruned(args.pruned, dtype=dtype).eval()
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    nocache_new = args.nocache_new_tokens or args.new_tokens
    plan = {
        "dense": ("dense", True, args.new_tokens),
        "pruned+cache": ("pruned", True, args.new_tokens),
        "pruned-nocache": ("pruned", False, nocache_new),
    }
    rows = []
    for batch in args.batch:
        ids = prompts(tok, batch, args.prompt_tokens)
        for name in args.variants:  # warm-up: one short run each (allocator, kernels)
            key, cache, _ = plan[name]
            timed_generate(models[key], ids, 4, cache, pad)
        times = {name: [] for name in args.variants}
        tokens = {}
        for r in range(args.repeats):
            for name in args.variants:
                key, cache, n = plan[name]
                if name == "pruned-nocache" and r >= (args.nocache_repeats or args.repeats):
                    continue
                dt, new = timed_generate(models[key], ids, n, cache, pad)
                times[name].append(dt)
                tokens[name] = new
        same = None
        if "pruned+cache" in tokens and "pruned-nocache" in tokens:
            n = min(tokens["pruned+cache"].shape[1], tokens["pruned-nocache"].shape[1])
            same = bool(torch.equal(tokens["pruned+cache"][:, :n], tokens["pruned-nocache"][:, :n]))
        for name in args.variants:
            key, cache, n = plan[name]
            med = statistics.median(times[name])
            rows.append({
                "variant": name, "batch": batch, "new_tokens": n, "params": params[key], "runs": len(times[name]),
                "median_s": round(med, 3), "min_s": round(min(times[name]), 3), "max_s": round(max(times[name]), 3),
                "tokens_per_s": round(batch * n / med, 2), "same_tokens": same if key == "pruned" else None,
            })
    ratios = {}
    for batch in args.batch:
        r = {x["variant"]: x for x in rows if x["batch"] == batch}
        if "pruned+cache" in r and "dense" in r:
            ratios[f"cache_vs_dense_b{batch}"] = round(r["pruned+cache"]["tokens_per_s"] / r["dense"]["tokens_per_s"], 2)
        if "pruned+cache" in r and "pruned-nocache" in r and r["pruned-nocache"]["new_tokens"] == args.new_tokens:
            ratios[f"cache_vs_nocache_b{batch}"] = round(r["pruned+cache"]["tokens_per_s"] / r["pruned-nocache"]["tokens_per_s"], 2)

    print(f"greedy generate, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of the runs")
    print(f"{'variant':<16}{'batch':>6}{'new':>6}{'params':>13}{'runs':>6}{'median s':>10}{'min s':>9}{'max s':>9}{'tok/s':>9}  same tokens")
    for x in rows:
        same = "" if x["same_tokens"] is None else str(x["same_tokens"])
        print(f"{x['variant']:<16}{x['batch']:>6}{x['new_tokens']:>6}{x['params']:>13,}{x['runs']:>6}{x['median_s']:>10.2f}{x['min_s']:>9.2f}{x['max_s']:>9.2f}{x['tokens_per_s']:>9.2f}  {same}")
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    print(json.dumps({"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "repeats": args.repeats, "pruned": str(args.pruned),
                      "rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    sys.exit(main())
