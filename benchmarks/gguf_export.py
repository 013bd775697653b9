"""The demo model through `streamprune.formats.gguf` into llama.cpp, against transformers.

For each GGUF type: export wall time, file size, llama.cpp's max relative logit error
(per window max |llama.cpp - transformers| / max |transformers|, fp32 logits; F32 runs
with an F32 KV cache, the others with llama.cpp's default F16 cache), perplexity on the
windows, and the greedy continuation of the first window's first 32 tokens. A table, then
one JSON line.

    .venv/bin/python benchmarks/gguf_export.py [--model DIR] [--windows 4] [--seqlen 128] [--types f32,f16,q8_0]

Needs the `llamacpp` extra. Run it from any folder (it imports no benchmark module).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def ppl(logits, windows) -> float:
    nll, n = 0.0, 0
    for lg, ids in zip(logits, windows):
        lp = torch.log_softmax(torch.as_tensor(lg[:-1], dtype=torch.float64), dim=-1)
        nll -= lp.gather(1, ids[1:, None]).sum().item()
        n += len(ids) - 1
    return math.exp(nll / n)


def main() -> None:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamprune.inputs.demo_model import ensure_demo_model
    from streamprune.formats.gguf import write_gguf
    from streamprune.inputs.textdata import eval_windows, resolve_text_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a dense Llama or nemotron-nas folder (default: the demo model)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--types", default="f32,f16,q8_0")
    args = ap.parse_args()
    folder = Path(args.model) if args.model else ensure_demo_model(progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    windows = eval_windows(tok, resolve_text_source("wikitext2"), args.seqlen, args.windows)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = [model(w[None]).logits[0].numpy() for w in windows]
    prompt = windows[0, :32].tolist()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[0, -1].argmax().view(1, 1)], dim=1)
    ref_greedy = ids[0, 32:].tolist()
    rows = [{"type": "transformers fp32", "ppl": ppl(ref, windows), "greedy": tok.decode(ref_greedy)}]
    with tempfile.TemporaryDirectory() as tmp:
        for typ in args.types.split(","):
            t0 = time.perf_counter()
            info = write_gguf(folder, Path(tmp) / f"{typ}.gguf", typ, progress=False)
            wall = time.perf_counter() - t0
            kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if typ == "f32" else {}
            llm = llama_cpp.Llama(model_path=info["path"], logits_all=True, n_ctx=args.seqlen + 40, n_threads=2, verbose=False, **kv)
            got = []
            for w in windows:
                llm.reset()
                llm.eval(w.tolist())
                got.append(np.array(llm.scores[: len(w)], dtype=np.float32))
            err = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref))
            out = []
            for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                out.append(int(t))
                if len(out) == 32:
                    break
            rows.append({"type": typ, "bytes": info["bytes"], "export_s": round(wall, 2), "max_rel_logit_err": err,
                         "ppl": ppl(got, windows), "greedy_equal": out == ref_greedy, "greedy": tok.decode(out)})
            del llm
    base = rows[0]["ppl"]
    print(f"{'type':<18} {'MiB':>8} {'export s':>9} {'max rel err':>12} {'PPL':>9} {'PPL/fp32':>9} greedy==")
    for r in rows:
        mib = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else "-"
        print(f"{r['type']:<18} {mib:>8} {r.get('export_s', '-')!s:>9} {r.get('max_rel_logit_err', 0):>12.2e} {r['ppl']:>9.3f} {r['ppl'] / base:>9.4f} {r.get('greedy_equal', '-')}")
    print(f"greedy (transformers fp32): {rows[0]['greedy']!r}")
    print(json.dumps({"model": str(folder), "windows": args.windows, "seqlen": args.seqlen, "rows": rows}))


if __name__ == "__main__":
    main()
